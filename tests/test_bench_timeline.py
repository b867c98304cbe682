"""The benchmarks' split of a device's idle time (issue 17 item 4: where a forward's wall time beyond GPU-busy goes).

`benchmarks/common.py:idle_split` turns a profiler trace's (queued, start, end) per kernel into
the time the device waited for the host and its own launch gaps; the H200 figures of
docs/benchmarks.md rest on it, so its arithmetic is checked here on made-up timelines.
"""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def common():
    spec = importlib.util.spec_from_file_location("bench_common", os.path.join(ROOT, "benchmarks", "common.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_device_that_never_waits_has_only_launch_gaps(common):
    # Every kernel queued long before the previous one ends: 1 µs gaps are the device's own.
    kernels = [(0, 10 * i + (1 if i else 0), 10 * i + 10) for i in range(5)]
    split = common.idle_split(kernels)
    assert split["host_bound_before"] == split["host_bound_after"] == 0
    assert split["device_gaps"] == pytest.approx(0.004) and split["busy"] == pytest.approx(0.046)


def test_host_bound_idle_is_split_at_the_marker(common):
    # The host issues a 2 µs kernel every 10 µs (the device waits 7 of each 8 µs gap for it, 1 µs is
    # its launch), then from the marker at 50 on 10 µs kernels 1 µs apart: the host is ahead.
    small = [(10 * i, 10 * i + 1, 10 * i + 3) for i in range(5)]
    big = [(50 + i, 51 + 10 * i if i else 51, 61 + 10 * i) for i in range(4)]
    split = common.idle_split(small + big, marker=50)
    assert split["host_bound_before"] == pytest.approx(0.028)     # 4 gaps of 8 µs, 7 of each host-bound
    assert split["host_bound_after"] == pytest.approx(0.007)      # the first big kernel, queued at 50
    assert split["device_gaps"] == pytest.approx(0.005)
    total = split["host_bound_before"] + split["host_bound_after"] + split["device_gaps"]
    span = (max(e for _, _, e in small + big) - 1) / 1000
    assert split["busy"] + total == pytest.approx(span)


def test_overlapping_streams_count_once(common):
    split = common.idle_split([(0, 0, 10), (0, 5, 12), (0, 6, 8)])
    assert split["busy"] == pytest.approx(0.012) and split["device_gaps"] == 0


def test_kernels_are_matched_to_their_launch_calls(common):
    events = [{"cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 10.0, "dur": 4.0, "args": {"correlation": 1}},
              {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 20.0, "dur": 4.0, "args": {"correlation": 2}},
              {"cat": "kernel", "ts": 30.0, "dur": 5.0, "args": {"correlation": 2}},
              {"cat": "kernel", "ts": 15.0, "dur": 5.0, "args": {"correlation": 1}},
              {"cat": "ac2g", "ts": 15.0, "args": {"correlation": 1}}]
    device, mark, first = common.device_activities(events)
    assert sorted(device) == [(14.0, 15.0, 20.0), (24.0, 30.0, 35.0)] and mark is None and first == 14.0
    # The device ran dry at 20 and the second kernel was queued at 24: 4 µs waiting for the host, 6 launch.
    split = common.idle_split(device)
    assert split["host_bound_before"] == pytest.approx(0.004) and split["device_gaps"] == pytest.approx(0.006)


def test_the_marker_lands_in_a_real_profiler_trace(common, tmp_path):
    import json

    import torch
    from torch.profiler import ProfilerActivity, profile

    layer = torch.nn.Linear(4, 4)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with common.marked(layer):
            layer(torch.ones(2, 4))
        layer(torch.ones(2, 4))             # after the block: no second mark
    path = tmp_path / "trace.json"
    prof.export_chrome_trace(str(path))
    events = json.loads(path.read_text())["traceEvents"]
    device, mark, _ = common.device_activities(events)
    assert device == [] and mark is not None
    assert sum(e.get("name") == "nav:marker" for e in events) == 1
    assert not layer._forward_pre_hooks
