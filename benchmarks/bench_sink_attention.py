"""Sinks + MDS from sink-column attention vs a plain SDPA forward vs eager attention maps.

    python benchmarks/bench_sink_attention.py                        # H200: 7B thinker, bf16, 1.7k/8k/16k/32k
    python benchmarks/bench_sink_attention.py --small --device cpu   # smoke test of the script

Per length, in one run on one model (random weights):
  (a) ``sink_analysis``: one prefill giving the sink mask, the global sinks and their MDS
      (default ``defer``: q/k kept and only the sinks' columns reduced after the last layer;
      ``_streamed``: every video/audio column reduced on the fly; see docs/sinks.md); also
      ``modality_dominance`` alone with K = T/2 sinks given (the worst case: columns at the
      start of the sequence, tau = 0 makes every token a sink);
  (b) a plain HF forward under SDPA (logits included, as HF computes them);
  (c) the eager way: HF forward with ``output_attentions=True`` under eager attention, then
      V/A of the same sinks read off the maps (out-of-memory is caught and reported).
Each entry: median ms and peak extra GiB over the memory held before the call. Ratios:
  time_vs_sdpa = (a) / (b)          goal <= 1.3 at every length
  eager_speedup = (c) / (a)         goal >= 3 at 8k
  memory_vs_eager = extra(a) / extra(c)   goal <= 0.1 at 8k
At the first length, ``check`` compares (a)'s V/A with (c)'s (bf16: relative to the largest value).
"""

from __future__ import annotations

import gc
import time

import torch

from common import av_input, cuda_timer, full_size_model, interleaved, parse_triton_config, parser, report

import analyses  # noqa: E402  (common puts the repo root on the path)


def _oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _safe(fn, warmup: int, repeat: int) -> dict:
    """`cuda_timer`, with out-of-memory and other failures reported instead of raised."""
    _free()
    try:
        return cuda_timer(fn, warmup=warmup, repeat=repeat)
    except Exception as error:  # noqa: BLE001  (a benchmark reports, it does not stop)
        _free()
        return {"error": "out of memory" if _oom(error) else f"{type(error).__name__}: {error}"[:300]}


def eager_va(model, ex, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """V and A of ``positions`` from eager full attention maps (the way that does not scale)."""
    module = model._module
    module.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = module(**ex.data, output_attentions=True, use_cache=False)
        device = out.attentions[0].device
        cols = positions.to(device)
        labels = ex.spans.modality_of()
        group = torch.tensor([0 if m == "video" else 1 if m == "audio" else -1 for m in labels], device=device)
        rows = torch.arange(len(ex), device=device)
        after = rows[:, None] > cols[None, :]                                      # [T, S]
        v_out, a_out = [], []
        for maps in out.attentions:                                                # [1, h, T, T]
            picked = maps[0][:, :, cols].float().sum(0) * after                    # [T, S], summed over heads
            sums = [(picked * (group == g)[:, None]).sum(0) for g in (0, 1)]
            counts = [((group == g)[:, None] & after).sum(0) * maps.shape[1] for g in (0, 1)]
            v_out.append(torch.where(counts[0] > 0, sums[0] / counts[0].clamp(min=1), 0.0))
            a_out.append(torch.where(counts[1] > 0, sums[1] / counts[1].clamp(min=1), 0.0))
        del out
        return torch.stack(v_out).cpu(), torch.stack(a_out).cpu()
    finally:
        module.set_attn_implementation("sdpa")


def with_config(text: str, fn):
    """``fn`` run with the column kernel's config replaced by ``text`` (restored afterwards)."""
    from analyses import column_math

    def run() -> None:
        shipped = column_math.TRITON_CONFIG
        column_math.TRITON_CONFIG = {**shipped, **parse_triton_config(text)}
        try:
            fn()
        finally:
            column_math.TRITON_CONFIG = shipped
    return run


def main() -> None:
    p = parser(__doc__)
    p.set_defaults(tokens=None, repeat=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-eager", action="store_true", help="skip the eager-maps baseline")
    p.add_argument("--tau", type=float, default=0.0,
                   help="sink threshold: 0 makes every token a sink (K = T/2, the worst case); with random "
                        "weights ~3.5 leaves a few hundred sinks, as in a real model")
    p.add_argument("--triton-config", help="override the column kernel's config (bench_column_kernel.py's format)")
    p.add_argument("--compare-config", help="also time sink_analysis with this kernel config, round-robin with the rest")
    args = p.parse_args()
    if args.triton_config:
        from analyses import column_math

        column_math.TRITON_CONFIG = {**column_math.TRITON_CONFIG, **parse_triton_config(args.triton_config)}
    tokens = args.tokens or ([160, 320] if args.small else [1700, 8000, 16000, 32000])
    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    started = time.perf_counter()
    model = full_size_model(args.device, dtype, small=args.small)
    dims = model.adapter.known_sink_dims() or [0, 1]
    results = {"device": torch.cuda.get_device_name() if cuda else "cpu", "dtype": str(dtype),
               "layers": model.num_layers, "hidden": model.hidden_size, "sink_dims": dims,
               "tau": args.tau, "note": "tau=0: every token is a sink, K = T/2 (worst case for the MDS columns)",
               "triton_config": dict(analyses.column_math.TRITON_CONFIG), "runs": []}
    for n_tokens in tokens:
        ex = av_input(model, n_tokens).to(args.device)
        data = ex.data
        run = {"tokens": len(ex), "video": len(ex.spans.video), "audio": len(ex.spans.audio)}
        holder: dict = {}

        def ours() -> None:
            holder["result"] = analyses.sink_analysis(model, ex, dims=dims, tau=args.tau, progress=False)

        def ours_streamed() -> None:
            analyses.sink_analysis(model, ex, dims=dims, tau=args.tau, defer=False, progress=False)

        def sdpa() -> None:
            with torch.no_grad():
                model._module(**data, use_cache=False)

        calls = {"ours_sink_analysis": ours, "ours_sink_analysis_streamed": ours_streamed, "sdpa_forward": sdpa}
        if args.compare_config:
            calls[f"ours_sink_analysis[{args.compare_config}]"] = with_config(args.compare_config, ours)
        _free()
        try:
            ours()                                   # the sinks, for the MDS-only entry
            sinks = holder["result"].sinks
            run["sinks_K"] = sinks.K
            run["mds_columns"] = int(sinks.positions.numel())
            calls["ours_mds_given_sinks"] = lambda: analyses.modality_dominance(model, ex, sinks, progress=False)
            run.update(interleaved(calls, repeat=args.repeat, warmup=args.warmup))   # round-robin: same drift
        except Exception:  # noqa: BLE001  (a benchmark reports, it does not stop: each alone, errors caught)
            _free()
            sinks = holder["result"].sinks if "result" in holder else None
            for name, fn in calls.items():
                run[name] = _safe(fn, args.warmup, args.repeat)
        if not args.no_eager and sinks is not None:
            positions = holder["result"].mds.positions
            run["eager_maps"] = _safe(lambda: holder.__setitem__("eager", eager_va(model, ex, positions)),
                                      min(args.warmup, 1), 1 if n_tokens > 4000 else args.repeat)
            if n_tokens == tokens[0] and "eager" in holder:
                v_ref, a_ref = holder["eager"]
                mds = holder["result"].mds
                scale = float(torch.cat([v_ref, a_ref]).abs().max().clamp(min=1e-12))
                run["check"] = {"max_abs_diff_V": float((mds.V - v_ref).abs().max()),
                                "max_abs_diff_A": float((mds.A - a_ref).abs().max()), "max_value": scale,
                                "relative": float(max((mds.V - v_ref).abs().max(), (mds.A - a_ref).abs().max())) / scale}
            holder.pop("eager", None)
        a, b, c = run.get("ours_sink_analysis", {}), run.get("sdpa_forward", {}), run.get("eager_maps", {})
        if "ms" in a and "ms" in b:
            run["time_vs_sdpa"] = a["ms"] / b["ms"]
            run["deferred"] = bool(analyses.mds._should_defer(model, [ex], None))
        streamed = run.get("ours_sink_analysis_streamed", {})
        if "ms" in streamed and "ms" in b:
            run["time_vs_sdpa_streamed"] = streamed["ms"] / b["ms"]
        other = run.get(f"ours_sink_analysis[{args.compare_config}]", {})
        if "ms" in other and "ms" in b:
            run[f"time_vs_sdpa[{args.compare_config}]"] = other["ms"] / b["ms"]
        if "ms" in a and "ms" in c:
            run["eager_speedup"] = c["ms"] / a["ms"]
            if cuda and c["peak_extra_gib"] > 0:
                run["memory_vs_eager"] = a["peak_extra_gib"] / c["peak_extra_gib"]
        results["runs"].append(run)
        holder.clear()
        del ex, data
        _free()
        print(f"[{time.perf_counter() - started:.0f}s] {run['tokens']} tokens done", flush=True)
    results["wall_s"] = time.perf_counter() - started
    report(results, args.out)


if __name__ == "__main__":
    main()
