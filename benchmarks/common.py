"""Shared set-up for benchmarks: a full-size Qwen2.5-Omni-7B thinker text stack with random weights.

The decoder matches Qwen2.5-Omni-7B (28 layers, hidden 3584, 28 heads, 4 KV heads, MLP 18944,
vocab 152064); the audio and vision encoders are shrunk to one layer each, since every benchmark
here measures the language model, which is where the cost is. Inputs go through the real
processor path (`model.prepare`) with frames sized to give the requested token count.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import contextmanager
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import nnsight_av as nav  # noqa: E402
from nnsight_av.testing.tiny import tiny_processor, tiny_qwen2_5_omni_config  # noqa: E402

#: The keys of `analyses.column_math.TRITON_CONFIG`, in the order ``--triton-config`` takes them.
TRITON_KEYS = ("block_s", "block_q", "num_warps", "num_stages", "fma_exp", "trans_q", "reverse", "heads_first")


def parse_triton_config(text: str) -> dict[str, int]:
    """``"128,64,8,3"``, optionally followed by fma_exp, trans_q, reverse, heads_first -> a partial TRITON_CONFIG."""
    try:
        parts = [int(x) for x in text.split(",")]
    except ValueError:
        parts = []
    if not 4 <= len(parts) <= len(TRITON_KEYS):
        raise SystemExit(f"a Triton config is {','.join(TRITON_KEYS[:4])}[,{','.join(TRITON_KEYS[4:])}] (integers, "
                         f"trailing ones optional); got {text!r}")
    return dict(zip(TRITON_KEYS, parts))


SEVEN_B_TEXT = dict(hidden=3584, layers=28, heads=28, kv_heads=4, intermediate_size=18944, vocab_size=152064)


def full_size_model(device: str = "cuda", dtype: torch.dtype = torch.bfloat16, attn: str = "sdpa",
                    small: bool = False, seed: int = 0) -> "nav.AVModel":
    """Qwen2.5-Omni-7B-shaped thinker (random weights). ``small=True`` gives a CPU-sized stand-in."""
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    from nnsight_av.adapters.qwen2_5_omni import Qwen25OmniAdapter

    processor = tiny_processor()
    spec = dict(SEVEN_B_TEXT) if not small else dict(hidden=256, layers=4, heads=8, kv_heads=2,
                                                     intermediate_size=512, vocab_size=1024)
    config = tiny_qwen2_5_omni_config(processor.tokenizer, hidden=spec["hidden"], layers=spec["layers"],
                                      heads=spec["heads"], kv_heads=spec["kv_heads"],
                                      intermediate_size=spec["intermediate_size"], vocab_size=spec["vocab_size"])
    config.audio_config.encoder_layers = 1
    config.vision_config.depth = 1
    config.vision_config.fullatt_block_indexes = [0]
    for sub in (config, config.text_config, config.audio_config, config.vision_config):
        sub._attn_implementation = attn
    torch.manual_seed(seed)
    with torch.device(device):
        module = Qwen2_5OmniThinkerForConditionalGeneration(config)
    module = module.to(dtype).eval()
    # Random init gives logits of no particular scale; shrink the residual writes so bf16 stays finite.
    return nav.AVModel(module, adapter=Qwen25OmniAdapter, processor=processor, checkpoint="bench:qwen2_5_omni_7b",
                       default_system="You are a helpful assistant.",
                       processor_kwargs={"videos_kwargs": {"size": {"shortest_edge": 56 * 56,
                                                                    "longest_edge": 4096 * 28 * 28}}})


def av_input(model: "nav.AVModel", tokens: int = 1700, seed: int = 0,
             text: str = "What is making the sound? Answer with one letter.") -> "nav.AVInputs":
    """A clip whose prompt is about ``tokens`` long, ~85% video and ~15% audio tokens as in the paper.

    Duration grows with the budget (10 s at 1.7k tokens); the frame size sets the video share.
    """
    seconds = max(2, int(round(10 * tokens / 1700 / 2)) * 2)
    audio_tokens = 25 * min(seconds, 30)      # the audio feature extractor keeps the first 30 s
    video_per_patch = max(4, int((tokens - audio_tokens - 40) / (seconds / 1.0)))  # one temporal patch per second
    # merged tokens per patch = (h/28) * (w/28); pick a near-square grid
    side = max(2, int(np.sqrt(video_per_patch)))
    other = max(2, video_per_patch // side)
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 255, size=(seconds * 2, side * 28, other * 28, 3), dtype=np.uint8)
    audio = (0.1 * rng.standard_normal(16000 * seconds)).astype(np.float32)
    return model.prepare(video=frames, audio=audio, text=text)


def cuda_timer(fn: Callable[[], Any], warmup: int = 2, repeat: int = 5) -> dict[str, float]:
    """Median wall time (ms) and peak extra memory (GiB) of ``fn`` on the current device."""
    for _ in range(warmup):
        fn()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else float("nan")
    return {"ms": float(np.median(times)), "peak_extra_gib": float(peak)}


def interleaved(calls: dict[str, Callable[[], Any]], repeat: int = 5, warmup: int = 2) -> dict[str, dict[str, float]]:
    """`cuda_timer` for several methods at once, round-robin: drift in clocks or host load hits all alike.

    Per method: median ms over ``repeat`` rounds, and the peak extra GiB of one call on its own.
    """
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeat):
        for name, fn in calls.items():
            times[name].append(cuda_timer(fn, warmup=0, repeat=1)["ms"])
    return {name: {"ms": float(np.median(times[name])), "min_ms": float(min(times[name])),
                   "peak_extra_gib": cuda_timer(fn, warmup=0, repeat=1)["peak_extra_gib"]}
            for name, fn in calls.items()}


def gpu_busy(fn: Callable[[], Any], repeat: int = 3) -> dict[str, float] | None:
    """GPU time of one call of ``fn`` from torch.profiler (medians over ``repeat`` calls; None without CUDA).

    ``busy_ms``: the union of the intervals in which a kernel or copy ran (what the device did);
    ``span_ms``: first device activity to last; ``kernel_ms``: the kernels' summed durations.
    """
    if not torch.cuda.is_available():
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    busy, span, kernels = [], [], []
    for _ in range(repeat):
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        intervals = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                           if e.device_type == DeviceType.CUDA)
        if not intervals:
            return None
        total, (start, end) = 0.0, intervals[0]
        for a, b in intervals[1:]:
            if a > end:
                total += end - start
                start, end = a, b
            else:
                end = max(end, b)
        total += end - start
        busy.append(total / 1000)
        span.append((max(b for _, b in intervals) - intervals[0][0]) / 1000)
        kernels.append(sum(b - a for a, b in intervals) / 1000)
    return {"busy_ms": float(np.median(busy)), "span_ms": float(np.median(span)),
            "kernel_ms": float(np.median(kernels))}


def top_kernels(fn: Callable[[], Any], top: int = 12) -> dict[str, Any] | None:
    """One profiled call of ``fn``: wall ms, the summed kernel ms and the ``top`` kernels by total time."""
    if not torch.cuda.is_available():
        return None
    import time

    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) * 1000
    totals: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            entry = totals.setdefault(e.name[:90], [0.0, 0])
            entry[0] += (e.time_range.end - e.time_range.start) / 1000
            entry[1] += 1
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])
    return {"wall_ms": wall, "kernel_ms": sum(v[0] for v in totals.values()),
            "kernels": sum(v[1] for v in totals.values()),
            "top": [{"name": k, "ms": round(v[0], 3), "calls": v[1]} for k, v in ranked[:top]]}


def idle_split(activities: list[tuple[float, float, float]], marker: float | None = None) -> dict[str, float]:
    """Where the device waited between its kernels, from ``(queued, start, end)`` per device activity (µs).

    ``queued``: when the host's launch call returned. A gap before a kernel that was queued only
    after the device ran dry is host-bound (the device waited for the host to issue it); the rest of
    a gap, and every gap before a kernel queued in time, is the device's own launch latency.
    ``marker`` (a host time) splits the host-bound idle into before and after it (e.g. the
    decoder's first layer). Returns ms: ``busy``, ``host_bound_before``, ``host_bound_after``,
    ``device_gaps``, and ``count``.

    >>> idle_split([(0, 1, 5), (3, 5, 9), (12, 13, 15)], marker=10)
    {'busy': 0.01, 'host_bound_before': 0.0, 'host_bound_after': 0.003, 'device_gaps': 0.001, 'count': 3}
    """
    order = sorted(activities, key=lambda a: a[1])
    busy = before = after = device = 0.0
    frontier = None                                    # end of the device's work so far
    for queued, start, end in order:
        if frontier is None or start >= frontier:
            if frontier is not None:
                gap = start - frontier
                waited = min(gap, max(0.0, queued - frontier))
                if marker is not None and queued >= marker:
                    after += waited
                else:
                    before += waited
                device += gap - waited
            busy += end - start
            frontier = end
        elif end > frontier:                           # overlaps the previous work (another stream)
            busy += end - frontier
            frontier = end
    return {"busy": busy / 1000, "host_bound_before": before / 1000, "host_bound_after": after / 1000,
            "device_gaps": device / 1000, "count": len(order)}


@contextmanager
def marked(module: torch.nn.Module, name: str = "nav:marker"):
    """A profiler mark (``record_function(name)``) each time ``module`` is entered, while the block runs."""
    from torch.profiler import record_function

    def mark(*_: Any) -> None:
        with record_function(name):
            pass

    handle = module.register_forward_pre_hook(mark)
    try:
        yield
    finally:
        handle.remove()


def gpu_timeline(fn: Callable[[], Any], marker: torch.nn.Module | None = None) -> dict[str, float] | None:
    """`idle_split` of one call of ``fn`` from a torch.profiler trace (None without CUDA).

    ``marker``: a module whose first entry splits the host-bound idle (``host_bound_before``: the
    device waited while the host issued everything before it). Also ``host_to_marker_ms``: when the
    host reached it, from the first launch.
    """
    if not torch.cuda.is_available():
        return None
    import tempfile
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with marked(marker) if marker is not None else no_op():
            fn()
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as handle:
        prof.export_chrome_trace(handle.name)
        events = json.load(open(handle.name))["traceEvents"]
    device, mark, first_launch = device_activities(events)
    if not device:
        return None
    split = idle_split(device, mark)
    if mark is not None:
        split["host_to_marker_ms"] = (mark - first_launch) / 1000
    return split


def device_activities(events: list[dict[str, Any]], marker: str = "nav:marker"
                      ) -> tuple[list[tuple[float, float, float]], float | None, float | None]:
    """``(queued, start, end)`` per device activity of a Chrome trace's ``traceEvents``, the first mark, the first launch.

    A kernel, copy or memset is queued when the runtime call with its correlation id returns.

    >>> events = [{"cat": "cuda_runtime", "ts": 1.0, "dur": 2.0, "args": {"correlation": 7}},
    ...           {"cat": "user_annotation", "name": "nav:marker", "ts": 4.0},
    ...           {"cat": "kernel", "ts": 5.0, "dur": 1.5, "args": {"correlation": 7}}]
    >>> device_activities(events)
    ([(3.0, 5.0, 6.5)], 4.0, 3.0)
    """
    launches = {e["args"]["correlation"]: e["ts"] + e.get("dur", 0) for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    device = [(launches.get(e.get("args", {}).get("correlation"), e["ts"]), e["ts"], e["ts"] + e.get("dur", 0))
              for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    marks = [e["ts"] for e in events if e.get("name") == marker]
    return device, (min(marks) if marks else None), (min(launches.values()) if launches else None)


def host_to(fn: Callable[[], Any], module: torch.nn.Module, repeat: int = 10) -> float:
    """Median ms from the start of ``fn`` until the host first enters ``module`` (no profiler)."""
    times: list[float] = []
    reached: list[float] = []

    def mark(*_: Any) -> None:
        if not reached:
            reached.append(time.perf_counter())

    handle = module.register_forward_pre_hook(mark)
    try:
        for _ in range(repeat):
            reached.clear()
            start = time.perf_counter()
            fn()
            if reached:
                times.append((reached[0] - start) * 1000)
    finally:
        handle.remove()
    return float(np.median(times)) if times else float("nan")


def cuda_syncs(fn: Callable[[], Any]) -> int | None:
    """How many synchronising CUDA calls one call of ``fn`` makes (`nnsight_av.testing.cuda_sync_calls`)."""
    if not torch.cuda.is_available():
        return None
    from nnsight_av.testing import cuda_sync_calls

    return len(cuda_sync_calls(fn))


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--small", action="store_true", help="CPU-sized model (smoke test of the script)")
    p.add_argument("--tokens", type=int, nargs="*", default=[1700])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--out", default=None, help="write the JSON results here")
    return p


def report(results: dict[str, Any], out: str | None) -> None:
    text = json.dumps(results, indent=2)
    print(text)
    if out:
        with open(out, "w") as handle:
            handle.write(text)


@contextmanager
def no_op():
    yield


@contextmanager
def no_grad():
    with torch.inference_mode(False), torch.no_grad():
        yield
