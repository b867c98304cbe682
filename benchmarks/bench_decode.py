"""Decoding at memory-bandwidth speed (issue 17): ms per token of the static-cache / CUDA-graph path.

    python benchmarks/bench_decode.py                         # H200: full-size Qwen2.5-Omni-7B thinker, bf16
    python benchmarks/bench_decode.py --small --device cpu    # smoke test

Methods, timed round-robin in one process: HF ``generate``, greedy on the DynamicCache loop
(``greedy_dynamic``, today's path), greedy on the static cache with eager steps
(``greedy_static_eager``) and with CUDA graph replays (``greedy``, the default path), and ASD
(given sink sets), VCD and FMD on the default (static) path, plus ASD on the DynamicCache loop.

Per-token decode time excludes the prefill (and the graph capture): every method runs with
``--new-tokens`` N and with 2 new tokens, and ``decode_ms_per_token = (t_N - t_2) / (N - 2)``.
``call_ms_per_token`` is the whole call over N (what a user waits for).

The floor is the time to read the decoder's weights once per token: bytes of the decoder stack
and the LM head over the GPU's nominal memory bandwidth (a table by GPU name; ``--bandwidth``
in TB/s overrides it). Goals: greedy <= 2x the floor, ASD <= 1.1x greedy, greedy < HF generate.
EOS is switched off (random weights would stop at arbitrary places).

Kernels per step (``kernels_per_step``): on CUDA the kernels the profiler sees per generated token of
the static path's eager step (``graph=False``: the same kernels a graph replay runs), for greedy and
ASD, fused decode layers (the default) and transformers' own layers (``fuse=False``); on the CPU the
aten ops per step (`interventions.runtime.op_count`). Token agreement: random bf16 weights give
nearly tied logits, so the bf16 paths may part at a rounding; ``float32_agreement`` repeats the
greedy-vs-DynamicCache and ASD comparisons on the small model in float32 on the same device, where
any difference is a bug, not rounding.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import av_input, full_size_model, interleaved, parser, report  # noqa: E402

from analyses.asd import ASDConfig, asd_generate, asd_sink_sets  # noqa: E402
from analyses.decoding import fmd_generate, greedy_generate, vcd_generate  # noqa: E402
from interventions.runtime import static_decoder  # noqa: E402
from interventions.runtime.op_count import ops_per_step  # noqa: E402

#: Nominal memory bandwidth (TB/s) by a substring of ``torch.cuda.get_device_name()``; first match wins.
BANDWIDTH_TBPS = (
    ("H200", 4.8), ("H100 PCIe", 2.0), ("H100", 3.35), ("H800", 3.35), ("GH200", 4.0), ("B200", 8.0),
    ("A100-SXM4-80GB", 2.039), ("A100 80GB PCIe", 1.935), ("A100", 1.555), ("L40S", 0.864), ("L40", 0.864),
    ("L4", 0.3), ("A10G", 0.6), ("A10", 0.6), ("RTX 4090", 1.008), ("RTX 3090", 0.936), ("V100", 0.9), ("T4", 0.32),
)


def nominal_bandwidth(name: str) -> float | None:
    """TB/s of the first `BANDWIDTH_TBPS` entry whose key occurs in ``name`` (None if unknown)."""
    for key, value in BANDWIDTH_TBPS:
        if key in name:
            return value
    return None


def weight_bytes(model) -> int:
    """Bytes read per decode step: the decoder stack's and the LM head's parameters (tied ones once)."""
    seen, total = set(), 0
    for module in (model.raw("stack"), model.raw("lm_head")):
        for param in module.parameters():
            if param.data_ptr() not in seen:
                seen.add(param.data_ptr())
                total += param.numel() * param.element_size()
    return total


def kernels_per_step(run, cuda: bool) -> float:
    """Per generated token: CUDA kernels (profiler) on CUDA, aten ops on the CPU; ``run(n)`` makes n tokens."""
    if not cuda:
        with torch.inference_mode():
            return ops_per_step(run)
    from torch.profiler import ProfilerActivity, profile

    def kernels(n: int) -> int:
        run(n)                                     # compile / autotune outside the profile
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run(n)
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)

    return (kernels(6) - kernels(2)) / 4


def unfused(call):
    """``call()`` with the static decoder on transformers' own layer forward (``fuse=False``)."""
    original = static_decoder.StaticDecoder.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **{**kwargs, "fuse": False})

    static_decoder.StaticDecoder.__init__ = init
    try:
        return call()
    finally:
        static_decoder.StaticDecoder.__init__ = original


def first_difference(a: list[int], b: list[int]) -> int | None:
    same = [x == y for x, y in zip(a, b)]
    return same.index(False) if False in same else None


def float32_agreement(device: str, n: int) -> dict[str, int | None]:
    """First differing step of the static path vs the DynamicCache loop, small model in float32."""
    model = full_size_model(device, torch.float32, small=True)
    model._module.generation_config.eos_token_id = []
    ex = av_input(model, 300).to(device)
    config = ASDConfig(tau=0.0, sink_dims=(0,))
    sets = asd_sink_sets(model, ex, config)
    return {"greedy_vs_greedy_dynamic": first_difference(greedy_generate(model, ex, n).token_ids,
                                                         greedy_generate(model, ex, n, static=False).token_ids),
            "asd_vs_asd_dynamic": first_difference(asd_generate(model, ex, n, config, sinks=sets).token_ids,
                                                   asd_generate(model, ex, n, config, sinks=sets,
                                                                static=False).token_ids)}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--bandwidth", type=float, default=None, help="nominal memory bandwidth in TB/s (overrides the table)")
    p.add_argument("--no-counts", action="store_true", help="skip the kernels-per-step and float32 checks")
    p.add_argument("--methods", nargs="*", default=["hf_generate", "greedy_dynamic", "greedy_static_eager", "greedy",
                                                     "asd", "asd_dynamic", "vcd", "fmd"])
    args = p.parse_args()
    if args.small:
        args.tokens = [t if t != 1700 else 300 for t in args.tokens]
        args.new_tokens = min(args.new_tokens, 8)
        args.repeat = min(args.repeat, 2)
    if args.new_tokens < 4:
        raise SystemExit("--new-tokens must be at least 4 (the decode time is t_N - t_2)")
    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    model = full_size_model(args.device, dtype, small=args.small)
    model._module.generation_config.eos_token_id = []      # always generate exactly --new-tokens
    name = torch.cuda.get_device_name() if cuda else "cpu"
    bandwidth = args.bandwidth if args.bandwidth is not None else (nominal_bandwidth(name) if cuda else None)
    n = args.new_tokens
    nbytes = weight_bytes(model)
    floor = nbytes / (bandwidth * 1e12) * 1000 if bandwidth else None
    config = ASDConfig(tau=0.0, sink_dims=(0,))
    results = {"device": name, "new_tokens": n, "weight_bytes_per_token": nbytes, "bandwidth_tbps": bandwidth,
               "floor_ms_per_token": floor, "runs": []}
    print(f"weights read per token: {nbytes / 1e9:.2f} GB; bandwidth {bandwidth} TB/s; "
          f"floor {floor if floor is None else round(floor, 3)} ms/token", file=sys.stderr, flush=True)
    for tokens in args.tokens:
        ex = av_input(model, tokens).to(args.device)
        sets = asd_sink_sets(model, ex, config)

        def hf(k: int):
            def call() -> None:
                with torch.inference_mode():
                    out = model._module.generate(**ex.data, max_new_tokens=k, min_new_tokens=k, do_sample=False)
                assert out.shape[1] == len(ex) + k
            return call

        factories = {
            "hf_generate": hf,
            "greedy_dynamic": lambda k: lambda: greedy_generate(model, ex, k, static=False),
            "greedy_static_eager": lambda k: lambda: greedy_generate(model, ex, k, graph=False),
            "greedy": lambda k: lambda: greedy_generate(model, ex, k),
            "asd": lambda k: lambda: asd_generate(model, ex, k, config, sinks=sets),
            "asd_dynamic": lambda k: lambda: asd_generate(model, ex, k, config, sinks=sets, static=False),
            "vcd": lambda k: lambda: vcd_generate(model, ex, k),
            "fmd": lambda k: lambda: fmd_generate(model, ex, k),
        }
        methods = list(dict.fromkeys(["greedy", *args.methods]))
        unknown = [m for m in methods if m not in factories]
        if unknown:
            raise SystemExit(f"unknown methods {unknown}; choose from {sorted(factories)}")
        run = {"tokens": len(ex), "decode": {}, "outputs": {}, "decode_ms_per_token": {}, "call_ms_per_token": {},
               "min_decode_ms_per_token": {}}
        for method in methods:                     # warm-up, and the outputs for the report
            out = factories[method](n)()
            if out is not None:
                assert out.num_new_tokens == n, (method, out.num_new_tokens)
                run["outputs"][method] = out.token_ids
                run["decode"][method] = out.meta.get("decode")
        outs = run["outputs"]
        for a, b in (("greedy", "greedy_dynamic"), ("asd", "asd_dynamic"), ("greedy", "greedy_static_eager")):
            if a in outs and b in outs:
                run[f"{a}_vs_{b}_first_difference"] = first_difference(outs[a], outs[b])
        if not args.no_counts:
            counts = {
                "greedy": kernels_per_step(lambda k: greedy_generate(model, ex, k, graph=False), cuda),
                "greedy_unfused": kernels_per_step(lambda k: unfused(lambda: greedy_generate(model, ex, k, graph=False)),
                                                   cuda),
                "asd": kernels_per_step(lambda k: asd_generate(model, ex, k, config, sinks=sets, graph=False), cuda),
                "asd_unfused": kernels_per_step(
                    lambda k: unfused(lambda: asd_generate(model, ex, k, config, sinks=sets, graph=False)), cuda),
            }
            run["kernels_per_step" if cuda else "ops_per_step"] = counts
            run["float32_agreement"] = float32_agreement(args.device, min(n, 32))
            print(f"{'kernels' if cuda else 'ops'} per step: {counts}; float32 first differences (None: the same "
                  f"tokens): {run['float32_agreement']}", file=sys.stderr, flush=True)
        run["outputs"] = {k: v[:16] for k, v in outs.items()}
        calls = {}
        for method in methods:
            calls[f"{method}@{n}"] = factories[method](n)
            calls[f"{method}@2"] = factories[method](2)
        timings = interleaved(calls, repeat=args.repeat, warmup=0)
        for method in methods:
            long, short = timings[f"{method}@{n}"], timings[f"{method}@2"]
            run["decode_ms_per_token"][method] = (long["ms"] - short["ms"]) / (n - 2)
            run["min_decode_ms_per_token"][method] = (long["min_ms"] - short["min_ms"]) / (n - 2)
            run["call_ms_per_token"][method] = long["ms"] / n
            print(f"{method}: {run['decode_ms_per_token'][method]:.2f} ms/token decode, "
                  f"{run['call_ms_per_token'][method]:.2f} per token of the call", file=sys.stderr, flush=True)
        per = run["decode_ms_per_token"]
        greedy = per["greedy"]
        ratios = {"greedy_vs_floor": greedy / floor if floor else None}
        if "asd" in per:
            ratios["asd_vs_greedy"] = per["asd"] / greedy
        if "hf_generate" in per:
            ratios["greedy_vs_hf_generate"] = greedy / per["hf_generate"]
        for method in ("greedy_dynamic", "greedy_static_eager", "vcd", "fmd", "asd_dynamic"):
            if method in per:
                ratios[f"{method}_vs_greedy"] = per[method] / greedy
        run["ratios"] = ratios
        run["goals_met"] = {"greedy <= 2x floor": None if floor is None else ratios["greedy_vs_floor"] <= 2.0,
                            "asd <= 1.1x greedy": ratios.get("asd_vs_greedy", float("inf")) <= 1.1,
                            "greedy < hf_generate": ratios.get("greedy_vs_hf_generate", float("inf")) < 1.0}
        print(f"ratios: {ratios}; goals: {run['goals_met']}", file=sys.stderr, flush=True)
        results["runs"].append(run)
    report(results, args.out)


if __name__ == "__main__":
    main()
