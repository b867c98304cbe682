"""Trace overhead: saving every layer's output in an nnsight trace vs HF's output_hidden_states.

    python benchmarks/bench_trace.py                 # H200: full-size Qwen2.5-Omni-7B thinker, bf16
    python benchmarks/bench_trace.py --small --device cpu   # smoke test

Goal (issue 2): trace time / HF time <= 1.05 at ~1.7k tokens.
"""

from __future__ import annotations

import nnsight
import torch

from common import av_input, cuda_timer, full_size_model, parser, report


def main() -> None:
    args = parser(__doc__).parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = full_size_model(args.device, dtype, small=args.small)
    results = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "runs": []}
    for tokens in args.tokens:
        ex = av_input(model, tokens).to(args.device)
        data = ex.data

        def hf() -> None:
            with torch.no_grad():
                out = model._module(**data, output_hidden_states=True)
            assert len(out.hidden_states) == model.num_layers + 1

        def traced() -> None:
            with torch.no_grad(), model.trace(ex):
                saved = nnsight.save([model.layers[i].output for i in range(model.num_layers)])
            assert len(saved) == model.num_layers

        base = cuda_timer(hf, repeat=args.repeat)
        ours = cuda_timer(traced, repeat=args.repeat)
        results["runs"].append({"tokens": len(ex), "hf_output_hidden_states": base, "trace_save_all_layers": ours,
                                "time_ratio": ours["ms"] / base["ms"]})
    report(results, args.out)


if __name__ == "__main__":
    main()
