"""Cached M-RoPE position ids and media plan: one ~1.6k-token forward with and without them, round-robin.

    python benchmarks/bench_rope.py                          # H200: full-size Qwen2.5-Omni-7B thinker, bf16
    python benchmarks/bench_rope.py --small --device cpu     # smoke test

``uncached`` passes the processor tensors alone, so the thinker runs transformers'
``get_rope_index`` (a Python walk over the tokens with host syncs) inside the forward;
``cached`` passes the ``position_ids`` that ``model.prepare`` computed once. Both run as a
plain module forward and as an nnsight trace. Per variant: ``ms`` / ``min_ms`` (wall, the
device synchronised after the call) and ``host_ms`` (median time until the call returns,
before that synchronisation: the host's share, which on a GPU overlaps the kernels). The
index alone is timed too: transformers' ``get_rope_index`` on the device tensors vs the
adapter's vectorised one on the prepared (host) tensors, moved to the device.

``trace_default`` is ``model.trace(ex)`` as a user writes it (no KV cache built since a trace
asks for none); ``trace_kv_cache`` asks for one (``use_cache=True``, the old default).

``planned`` / ``trace_cached`` also pass the prepared input's media plan (issue 17 item 4:
no host<->device sync in the forward); ``trace_unplanned`` is the trace without it. For
these, ``gpu`` is the GPU-busy time of one call from torch.profiler and
``wall_over_gpu_busy`` the goal's ratio (<= 1.15); ``cuda_syncs`` counts synchronising CUDA
calls (``torch.cuda.set_sync_debug_mode``) and ``host_syncs`` what `nav.testing.watch_syncs`
sees (on a CPU: the ops that would wait on a GPU), with the call sites of the first ones.

Where the rest of the gap lies (issue 17 item 4): ``host_to_layer0_ms`` is when the host
first enters decoder layer 0 (no profiler; the encoders and the embedding merge before it
issue small kernels the device finishes at once), ``ops`` the aten ops (views excluded) per
forward, and ``idle`` (CUDA) splits the device's idle time in one profiled call into
``host_bound_before`` / ``host_bound_after`` layer 0 (it waited for the host to issue the next
kernel) and ``device_gaps`` (the kernel was queued: the device's own launch latency).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import (av_input, cuda_syncs, full_size_model, gpu_busy, gpu_timeline, host_to, interleaved,  # noqa: E402
                    parser, report)

from interventions.runtime.op_count import count_ops  # noqa: E402

from nnsight_av.testing import watch_syncs  # noqa: E402


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def host_times(calls: dict, device: str, repeat: int) -> dict[str, float]:
    """Median ms until each call returns (device idle at the start; synchronised after, untimed), round-robin."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeat):
        for name, fn in calls.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1000)
            _sync(device)
    return {name: float(np.median(values)) for name, values in times.items()}


def main() -> None:
    p = parser(__doc__)
    p.set_defaults(tokens=[1600], repeat=20)
    args = p.parse_args()
    if args.small:
        args.tokens = [t if t != 1600 else 400 for t in args.tokens]
        args.repeat = min(args.repeat, 5)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = full_size_model(args.device, dtype, small=args.small)
    module = model._module
    results = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "runs": []}
    for tokens in args.tokens:
        prepared = av_input(model, tokens)
        ex = prepared.to(args.device)
        cached = dict(ex.data)
        plain = {k: v for k, v in cached.items() if k != "position_ids"}
        mask = plain["feature_attention_mask"]

        def forward(data):
            def run() -> None:
                with torch.inference_mode():
                    module(**data, use_cache=False)
            return run

        def traced(inputs, trace_kwargs=None):
            trace_kwargs = {"use_cache": False} if trace_kwargs is None else trace_kwargs

            def run() -> None:
                with torch.inference_mode(), model.trace(inputs, **trace_kwargs):
                    model.logits.save()
            return run

        def hf_index() -> None:
            module.get_rope_index(plain["input_ids"], None, plain["video_grid_thw"], plain["attention_mask"], True,
                                  mask.sum(-1), plain["video_second_per_grid"])

        def our_index() -> None:
            positions, _ = model.adapter.position_ids(prepared.data)
            positions.to(args.device, non_blocking=True)

        # What a trace passes to the module: the plan, and no all-ones attention mask.
        planned = model.module_inputs(ex)
        calls = {"forward_uncached": forward(plain), "forward_cached": forward(cached),
                 "forward_planned": forward(planned), "trace_uncached": traced(plain),
                 "trace_unplanned": traced(dataclasses.replace(ex, plan=None)), "trace_cached": traced(ex),
                 "trace_default": traced(ex, {}), "trace_kv_cache": traced(ex, {"use_cache": True})}
        wall = interleaved(calls, repeat=args.repeat)
        host = host_times(calls, args.device, args.repeat)
        index = interleaved({"hf_get_rope_index": hf_index, "vectorised_index": our_index}, repeat=args.repeat)
        run = {"tokens": len(ex), "wall": wall, "host_ms": host, "rope_index": index}
        measured = ("forward_cached", "forward_planned", "trace_unplanned", "trace_cached", "trace_default",
                    "trace_kv_cache")
        busy = {name: gpu_busy(calls[name]) for name in measured}
        # Where the gap is: the host's time to reach the first decoder layer (the encoders and the
        # embedding merge issue small kernels the device finishes at once), and the device's idle
        # split into host-bound (before / after that layer) and its own launch latency.
        first_layer = model.raw("layer", 0)
        run["host_to_layer0_ms"] = {name: host_to(calls[name], first_layer, args.repeat) for name in measured}
        run["ops"] = {name: sum(count_ops(calls[name]).values()) for name in ("forward_planned", "trace_cached")}
        timeline = {name: gpu_timeline(calls[name], first_layer) for name in measured}
        if all(timeline.values()):
            run["idle"] = timeline
        if all(busy.values()):
            run["gpu"] = busy
            run["wall_over_gpu_busy"] = {name: wall[name]["ms"] / busy[name]["busy_ms"] for name in measured}
        run["cuda_syncs"] = {name: cuda_syncs(calls[name]) for name in measured}
        run["host_syncs"] = {}
        host_side = ex.plan.host_tensors() if ex.plan is not None else []
        for name in measured:
            with watch_syncs(device_only=args.device != "cpu", host=host_side) as syncs:
                calls[name]()
            run["host_syncs"][name] = {"count": syncs.count, "sites": syncs.summary(limit=6).splitlines()[1:]}
        for kind in ("forward", "trace"):
            run[f"{kind}_cached_over_uncached"] = wall[f"{kind}_cached"]["ms"] / wall[f"{kind}_uncached"]["ms"]
            run[f"{kind}_saved_ms"] = wall[f"{kind}_uncached"]["ms"] - wall[f"{kind}_cached"]["ms"]
        run["index_speedup"] = index["hf_get_rope_index"]["ms"] / index["vectorised_index"]["ms"]
        results["runs"].append(run)
    report(results, args.out)
    for run in results["runs"]:
        syncs = {name: value["count"] for name, value in run["host_syncs"].items()}
        print(f"{run['tokens']} tokens: host syncs {syncs}; CUDA syncs {run['cuda_syncs']}")
        for name, ratio in run.get("wall_over_gpu_busy", {}).items():
            print(f"  {name}: wall {run['wall'][name]['ms']:.1f} ms / GPU busy {run['gpu'][name]['busy_ms']:.1f} ms "
                  f"= {ratio:.2f} (goal <= 1.15)")
        for name, idle in run.get("idle", {}).items():
            print(f"  {name}: host reaches layer 0 at {run['host_to_layer0_ms'][name]:.1f} ms; device idle waiting for "
                  f"the host {idle['host_bound_before']:.1f} ms before layer 0, {idle['host_bound_after']:.1f} after; "
                  f"launch gaps {idle['device_gaps']:.1f} ms over {idle['count']} kernels")


if __name__ == "__main__":
    main()
