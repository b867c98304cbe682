"""ASD decoding speed: ms per generated token of ASD vs greedy (and VCD, FMD, HF generate), same run.

    python benchmarks/bench_asd.py                         # H200: full-size Qwen2.5-Omni-7B thinker, bf16
    python benchmarks/bench_asd.py --small --device cpu    # smoke test

Goal (issue 6): ASD <= 1.3x greedy ms/token at ~1.7k prompt tokens and 64 new tokens. Every
method generates exactly ``--new-tokens`` tokens (EOS is switched off: random weights would stop
at arbitrary places). ASD's time includes its sink analysis (one extra prefill); random weights
have no massive activations, so the sinks are found with ``tau=0`` on channel 0 (every token
passes, the top ``T / 3`` positions are kept), which gives a realistic number of boosted columns.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import av_input, full_size_model, interleaved, parser, report  # noqa: E402

from analyses.asd import ASDConfig, asd_generate, asd_sink_sets  # noqa: E402
from analyses.decoding import fmd_generate, greedy_generate, vcd_generate  # noqa: E402


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--methods", nargs="*", default=["greedy", "asd", "vcd", "fmd", "hf_generate"])
    args = p.parse_args()
    if args.small:
        args.tokens = [t if t != 1700 else 300 for t in args.tokens]
        args.new_tokens = min(args.new_tokens, 8)
        args.repeat = min(args.repeat, 2)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = full_size_model(args.device, dtype, small=args.small)
    model._module.generation_config.eos_token_id = []      # always generate exactly --new-tokens
    config = ASDConfig(tau=0.0, sink_dims=(0,))
    n = args.new_tokens
    results = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
               "new_tokens": n, "asd_config": config.to_dict(), "runs": []}
    for tokens in args.tokens:
        ex = av_input(model, tokens).to(args.device)
        sets = asd_sink_sets(model, ex, config)
        run = {"tokens": len(ex), "sink_sets": {k: int(v.numel()) for k, v in sets.items()}, "ms_per_token": {},
               "outputs": {}}

        def hf() -> None:
            with torch.inference_mode():
                out = model._module.generate(**ex.data, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            assert out.shape[1] == len(ex) + n

        calls = {
            "greedy": lambda: greedy_generate(model, ex, n),
            "asd": lambda: asd_generate(model, ex, n, config),
            "asd_given_sinks": lambda: asd_generate(model, ex, n, config, sinks=sets),
            "vcd": lambda: vcd_generate(model, ex, n),
            "fmd": lambda: fmd_generate(model, ex, n),
            "hf_generate": hf,
        }
        methods = list(dict.fromkeys(["greedy", *args.methods]))
        unknown = [name for name in methods if name not in calls]
        if unknown:
            raise SystemExit(f"unknown methods {unknown}; choose from {sorted(calls)}")
        for name in methods:                       # warm-up, and the outputs for the report
            out = calls[name]()
            if name != "hf_generate":
                assert out.num_new_tokens == n, (name, out.num_new_tokens)
                run["outputs"][name] = out.token_ids[:16]
                if name == "asd":
                    run["asd_mean_strength"] = float(out.s.mean())
                    run["asd_fallback_steps"] = int(out.fallback.sum())
        # Round-robin repeats: clock and load drift on a shared machine hit every method alike.
        timings = interleaved({name: calls[name] for name in methods}, repeat=args.repeat, warmup=0)
        for name in methods:
            run["ms_per_token"][name] = timings[name]["ms"] / n
            run.setdefault("peak_extra_gib", {})[name] = timings[name]["peak_extra_gib"]
            print(f"{name}: {run['ms_per_token'][name]:.2f} ms/token", file=sys.stderr, flush=True)
        base = run["ms_per_token"]["greedy"]
        run["ratio_vs_greedy"] = {k: v / base for k, v in run["ms_per_token"].items()}
        results["runs"].append(run)
    report(results, args.out)


if __name__ == "__main__":
    main()
