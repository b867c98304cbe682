"""Find the host<->device synchronisations in a piece of PyTorch code, on any machine.

On a GPU the host queues kernels and runs ahead; an op whose *result on the host* depends on
device data (``.item()``, ``.tolist()``, ``if tensor:``, ``torch.nonzero``, boolean-mask
indexing, ``torch.unique``, ``repeat_interleave`` with tensor repeats, a blocking copy between
host and device, ...) makes the host wait until the device has finished everything queued
before it. A forward with such waits takes host time + GPU time instead of about the larger of
the two. `watch_syncs` records every such op with where it was called from::

    with nav.testing.watch_syncs() as syncs:
        model._module(**ex.data)
    print(syncs.summary())          # "3 host syncs: 2 x Tensor.tolist at modeling_x.py:635 in forward ..."

Without a GPU it counts as if every tensor lived on the device (``device_only=False``, the
default): the ops that *would* wait there. On a GPU pass ``device_only=True`` to count only
ops on device tensors (``torch.cuda.set_sync_debug_mode("warn")`` is the CUDA runtime's own
check; it sees only CUDA tensors and names no Python caller).
"""

from __future__ import annotations

import sys
import threading
import traceback
import weakref
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["SyncEvent", "SyncLog", "watch_syncs", "cuda_sync_calls"]

_aten = torch.ops.aten
#: aten ops whose output (a Python scalar, or a shape) needs device data on the host. Under
#: ``torch.inference_mode`` the composite ``item``/``is_nonzero`` reach the mode undecomposed.
_SCALAR_OPS = {_aten._local_scalar_dense.default, _aten.item.default, _aten.is_nonzero.default,
               _aten.equal.default, _aten.allclose.default}
_SHAPE_OPS = {_aten.nonzero.default, _aten.argwhere.default, _aten.masked_select.default, _aten._unique.default,
              _aten._unique2.default, _aten.unique_dim.default, _aten.unique_consecutive.default,
              _aten.unique_dim_consecutive.default}
_REPEAT_OPS = {_aten.repeat_interleave.Tensor, _aten.repeat_interleave.self_Tensor}
_INDEX_OPS = {_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default, _aten._index_put_impl_.default}
_COPY_OPS = {_aten._to_copy.default, _aten.copy_.default}
#: Tensor methods that copy device data to the host without passing through the dispatcher on a CPU tensor.
_HOST_METHODS = {"tolist", "numpy"}
#: Frames of these packages are left out of the reported call site (the caller is what one fixes).
_SKIP_FRAMES = ("/torch/", "/nnsight_av/testing/syncs.py", "/contextlib.py")


@dataclass(frozen=True)
class SyncEvent:
    """One op that makes the host wait for the device: what (``op``), the caller (``site``), the ``stack``."""

    op: str
    site: str
    stack: tuple[str, ...] = field(repr=False)


@dataclass
class SyncLog:
    """The syncs `watch_syncs` saw, in call order."""

    events: list[SyncEvent] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.events)

    @property
    def count(self) -> int:
        return len(self.events)

    def by_site(self) -> Counter:
        """``(op, site) -> how many times``, most frequent first."""
        return Counter((e.op, e.site) for e in self.events)

    def summary(self, limit: int = 20) -> str:
        """One line per distinct (op, call site), with counts; ``"no host syncs"`` when empty."""
        if not self.events:
            return "no host syncs"
        lines = [f"{self.count} host sync{'s' if self.count != 1 else ''}:"]
        for (op, site), n in self.by_site().most_common(limit):
            lines.append(f"  {n} x {op} at {site}")
        return "\n".join(lines)


def _tensors(args: Any) -> Iterator[torch.Tensor]:
    for value in args:
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from _tensors(value)


def _caller(depth: int = 12) -> tuple[str, tuple[str, ...]]:
    frames = [f for f in traceback.extract_stack()[:-1] if not any(s in f.filename for s in _SKIP_FRAMES)]
    stack = tuple(f"{_short(f.filename)}:{f.lineno} in {f.name}" for f in reversed(frames[-depth:]))
    return (stack[0] if stack else "?"), stack


def _short(path: str) -> str:
    for marker in ("site-packages/", "/nnsight_av/", "/interventions/", "/analyses/", "/benchmarks/", "/tests/"):
        if marker in path:
            head = "" if marker == "site-packages/" else marker.strip("/") + "/"
            return head + path.split(marker, 1)[1]
    return path


class _Watcher:
    def __init__(self, device_only: bool, host: Iterable[torch.Tensor], host_code: Iterable[Any]) -> None:
        self.device_only = device_only
        self.host_code = {getattr(f, "__code__", f) for f in host_code}
        self.log = SyncLog()
        self.local = threading.local()
        # Tensors that stay on the host by design, and whatever is computed from them alone.
        self.host: dict[int, weakref.ref] = {}
        for t in host:
            self.mark_host(t)

    def mark_host(self, tensor: torch.Tensor) -> None:
        self.host[id(tensor)] = weakref.ref(tensor)

    def is_host(self, tensor: torch.Tensor) -> bool:
        ref = self.host.get(id(tensor))
        return ref is not None and ref() is tensor

    def on_device(self, value: Any) -> bool:
        if not isinstance(value, torch.Tensor):
            return False
        if self.device_only:
            return value.device.type not in ("cpu", "meta")
        return not self.is_host(value)

    def propagate(self, args: Any, out: Any) -> None:
        """Mark ``out`` host-side when every tensor it came from is."""
        inputs = list(_tensors(args))
        if inputs and all(self.is_host(t) for t in inputs):
            for t in _tensors(out if isinstance(out, (list, tuple)) else [out]):
                self.mark_host(t)

    def in_host_code(self) -> bool:
        frame = sys._getframe(2)
        while frame is not None:
            if frame.f_code in self.host_code:
                return True
            frame = frame.f_back
        return False

    def record(self, op: str) -> None:
        if self.host_code and self.in_host_code():
            return
        site, stack = _caller()
        self.log.events.append(SyncEvent(op, site, stack))

    def aten_sync(self, func: Any, args: tuple, kwargs: dict) -> str | None:
        """The name of the sync ``func(*args, **kwargs)`` makes, or None."""
        tensors = [t for t in _tensors(list(args) + list(kwargs.values()))]
        on_device = any(self.on_device(t) for t in tensors)
        if func in _SCALAR_OPS or func in _SHAPE_OPS:
            return str(func) if on_device else None
        if func in _REPEAT_OPS:
            return str(func) if on_device and kwargs.get("output_size") is None else None
        if func in _INDEX_OPS:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            masks = [t for t in indices if isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8)]
            return f"{func} (boolean mask)" if masks and self.on_device(args[0]) else None
        if func in _COPY_OPS:
            return self._copy(func, args, kwargs)
        return None

    def _copy(self, func: Any, args: tuple, kwargs: dict) -> str | None:
        if kwargs.get("non_blocking") or (func is _aten.copy_.default and len(args) > 2 and args[2]):
            return None
        if func is _aten._to_copy.default:
            source, target = args[0].device, kwargs.get("device")
        else:
            target, source = args[0].device, args[1].device
        if target is None or torch.device(target).type == torch.device(source).type:
            return None
        # Host <-> device, blocking: the host waits (for a device->host copy, for all queued work).
        return f"{func} {torch.device(source).type}->{torch.device(target).type}"


class _Dispatch(TorchDispatchMode):
    def __init__(self, watcher: _Watcher) -> None:
        super().__init__()
        self.watcher = watcher

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not getattr(self.watcher.local, "inside", False):
            op = self.watcher.aten_sync(func, args, kwargs)
            if op is not None:
                self.watcher.record(op)
        out = func(*args, **kwargs)
        watcher = self.watcher
        if not watcher.device_only and watcher.host_code and watcher.in_host_code():
            for t in _tensors(out if isinstance(out, (list, tuple)) else [out]):
                watcher.mark_host(t)   # made by host code: a host tensor
        elif watcher.host and not watcher.device_only:
            watcher.propagate(list(args) + list(kwargs.values()), out)
        return out


class _Function(TorchFunctionMode):
    def __init__(self, watcher: _Watcher) -> None:
        super().__init__()
        self.watcher = watcher

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _HOST_METHODS and args and self.watcher.on_device(args[0]):
            self.watcher.record(f"Tensor.{name}")
            # The copy to the host underneath is the same sync: do not count it twice.
            self.watcher.local.inside = True
            try:
                return func(*args, **kwargs)
            finally:
                self.watcher.local.inside = False
        device = kwargs.get("device")
        data = args[0] if args else kwargs.get("data")
        empty = isinstance(data, (list, tuple)) and not data  # nothing to copy, no wait
        if name in ("tensor", "as_tensor") and device is not None and not torch.is_tensor(data) and not empty:
            # Host data put on a device: a blocking host-to-device copy on a GPU.
            if not self.watcher.device_only or torch.device(device).type not in ("cpu", "meta"):
                self.watcher.record(f"torch.{name}(host data, device=...)")
        return func(*args, **kwargs)


@contextmanager
def watch_syncs(device_only: bool = False, host: Iterable[torch.Tensor] = (),
                host_code: Iterable[Any] = ()) -> Iterator[SyncLog]:
    """Record every op in the block that makes the host wait for the device; yields the `SyncLog`.

    ``device_only=False`` (the default, for CPU runs) counts every such op as if its tensors were
    on the device; ``device_only=True`` counts only ops on non-CPU tensors (use it on a GPU,
    where host-side tensors cost no wait). ``host``: tensors that stay on the host by design
    (e.g. `MediaPlan.host_tensors`); without ``device_only`` they, and tensors computed from
    them alone, are not counted either; nor is anything inside the functions ``host_code``
    (code that works on host tensors by design, such as
    `nnsight_av.adapters.media_plan.HOST_WORK`). Caught: ``item``/``tolist``/``bool``/``int`` of a
    tensor, ``nonzero``, ``masked_select``, boolean-mask indexing, ``unique``,
    ``repeat_interleave`` with tensor repeats and no ``output_size``, ``equal``/``allclose``,
    blocking host<->device copies and (on CPU) ``torch.tensor(data, device=...)``.
    ``masked_scatter`` is not counted: on CUDA its size check runs on the device.

    >>> import torch
    >>> with watch_syncs() as syncs:
    ...     x = torch.arange(6)
    ...     n = int(x.sum())             # a device tensor read on the host
    ...     y = x[x > 2]                 # output size depends on the data
    ...     z = x * 2                    # no sync
    >>> syncs.count, [e.op for e in syncs.events]
    (2, ['aten._local_scalar_dense.default', 'aten.index.Tensor (boolean mask)'])
    """
    watcher = _Watcher(device_only, host, host_code)
    with _Dispatch(watcher), _Function(watcher):
        yield watcher.log


def cuda_sync_calls(fn: Any) -> list[str]:
    """The synchronising CUDA calls one call of ``fn()`` makes, as CUDA reports them; ``[]`` without CUDA.

    The messages of ``torch.cuda.set_sync_debug_mode("warn")`` (the one-off notice that the mode
    is a prototype is not a sync). Unlike `watch_syncs` this sees what the CUDA runtime itself
    waits for (e.g. a copy from pageable host memory), but not where it came from.

    >>> cuda_sync_calls(lambda: torch.ones(3) * 2)       # host work only: nothing waits for a GPU
    []
    """
    if not torch.cuda.is_available():
        return []
    import warnings

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()
            and "prototype feature" not in str(w.message)]
