"""The sink-column kernel alone against the attention kernel of the same layer, per length and tile config.

    python benchmarks/bench_column_kernel.py                                   # H200: 7B attention shapes
    python benchmarks/bench_column_kernel.py --device cpu --tokens 1000 --repeat 2   # smoke test (torch path)

For each length T: q ``[1, 28, T, 128]``, k/v ``[1, 4, T, 128]`` in bf16 (Qwen2.5-Omni-7B's
attention), two row groups (~85% / 15% of the rows, like video and audio) and the columns of
``--columns``: ``all`` (default: every non-text position, what `sink_analysis` reduces at each
layer, since the global sinks are known only after the last one), ``early-half`` (the first T/2
positions: `modality_dominance` given K = T/2 sinks that tie, as in the benchmark's tau = 0), or
``random-half``. Timed, median of ``--repeat``:

- ``attention``: one `attention_with_lse` call, the attention the fused prefill runs anyway;
- ``columns[config]``: one `column_sums` call per Triton tile config
  (``block_s,block_q,num_warps,num_stages`` then optionally ``fma_exp,trans_q,reverse,heads_first``, see
  `analyses.column_math.TRITON_CONFIG`; the first is the shipped one).

``ratio`` = columns / attention is what the sink analysis adds per layer on the GPU; issue 4 wants
the whole analysis <= 1.3x a forward at 32k. Each
config is checked against the torch path at lengths <= ``--check-max`` tokens (relative to the
largest sum). This is the quick loop for working on the kernel; `bench_sink_attention.py` measures
the whole analysis.
"""

from __future__ import annotations

import torch

from common import TRITON_KEYS, cuda_timer, parse_triton_config, parser, report

from analyses import column_math as attn  # noqa: E402  (common puts the repo root on the path)
from interventions.attention_math import attention_with_lse  # noqa: E402

SHIPPED = ",".join(str(attn.TRITON_CONFIG[k]) for k in TRITON_KEYS)


TEXT_PREFIX = 20


def layer_inputs(tokens: int, device: str, dtype: torch.dtype, columns: str = "all", seed: int = 0,
                 ) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(1, 28, tokens, 128, generator=g).to(device, dtype)
    k = torch.randn(1, 4, tokens, 128, generator=g).to(device, dtype)
    v = torch.randn(1, 4, tokens, 128, generator=g).to(device, dtype)
    if columns == "all":
        cols = torch.arange(TEXT_PREFIX, tokens)
    elif columns == "early-half":
        cols = torch.arange(TEXT_PREFIX, TEXT_PREFIX + tokens // 2)
    elif columns == "random-half":
        cols = torch.sort(TEXT_PREFIX + torch.randperm(tokens - TEXT_PREFIX, generator=g)[: tokens // 2]).values
    else:
        raise SystemExit(f"--columns must be all, early-half or random-half; got {columns!r}")
    groups = (torch.rand(tokens, generator=g) < 0.15).to(torch.int32)             # 0: "video", 1: "audio"
    groups[:TEXT_PREFIX] = -1
    return {"q": q, "k": k, "v": v, "columns": cols[None].to(device, torch.int32), "groups": groups[None].to(device)}


def main() -> None:
    p = parser(__doc__)
    p.set_defaults(tokens=[8000, 16000, 32000], repeat=5)
    p.add_argument("--configs", nargs="*", default=[SHIPPED, "128,32,4,3,0,0,0,0", "128,32,4,2,0,1,1,1", "128,32,4,1,1,1,1,1"],
                   help="Triton configs block_s,block_q,num_warps,num_stages[,fma_exp,trans_q,reverse,heads_first] (first: baseline; the second is the kernel before 2026-12-02)")
    p.add_argument("--columns", default="all", help="all | early-half | random-half (see above)")
    p.add_argument("--check-max", type=int, default=8000, help="check against the torch path up to this length")
    args = p.parse_args()
    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    backend = "triton" if cuda else "torch"
    configs = args.configs if cuda else ["torch"]
    shipped = dict(attn.TRITON_CONFIG)
    results = {"device": torch.cuda.get_device_name() if cuda else "cpu", "shipped_config": SHIPPED,
               "columns": args.columns, "runs": []}
    for tokens in args.tokens:
        x = layer_inputs(tokens, args.device, dtype, args.columns)
        scale = 128 ** -0.5
        _, lse = attention_with_lse(x["q"], x["k"], x["v"], scale)
        run = {"tokens": tokens, "columns": int(x["columns"].shape[1]),
               "attention": cuda_timer(lambda: attention_with_lse(x["q"], x["k"], x["v"], scale),
                                       repeat=args.repeat)}
        reference = None
        if tokens <= args.check_max:
            reference = attn.column_sums(x["q"], x["k"], lse, x["columns"], x["groups"], 2, scale, True, "torch")
        for text in configs:
            if text != "torch":
                attn.TRITON_CONFIG = {**shipped, **parse_triton_config(text)}
            try:
                call = lambda: attn.column_sums(x["q"], x["k"], lse, x["columns"], x["groups"], 2, scale,  # noqa: E731
                                                True, backend, validate=False)
                entry = cuda_timer(call, repeat=args.repeat)
                entry["ratio_vs_attention"] = entry["ms"] / run["attention"]["ms"]
                if reference is not None:
                    diff = (call() - reference).abs().max() / reference.abs().max().clamp(min=1e-12)
                    entry["relative_error"] = float(diff)
            except Exception as error:  # noqa: BLE001  (a config that does not compile is reported, not fatal)
                entry = {"error": f"{type(error).__name__}: {error}"[:300]}
            finally:
                attn.TRITON_CONFIG = shipped
            run[f"columns[{text}]"] = entry
            print(f"{tokens} tokens, {text}: {entry}", flush=True)
        results["runs"].append(run)
        del x, lse, reference
        if cuda:
            torch.cuda.empty_cache()
    report(results, args.out)


if __name__ == "__main__":
    main()
