"""Count the tensor operations a piece of code dispatches (a CPU proxy for kernels per decode step).

Inside a CUDA graph a decode step's time beyond the weight reads is roughly its number of kernels;
on a machine without a GPU the aten operations that compute something (views excluded) are what
can be counted, and `ops_per_step` turns two runs into the count per generated token.
"""

from __future__ import annotations

import functools
from collections import Counter
from typing import Any, Callable, TypeVar

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["count_ops", "ops_per_step", "one_kernel"]

F = TypeVar("F", bound=Callable[..., Any])
_ACTIVE: list["_Counter"] = []


def _is_view(func: Any) -> bool:
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


class _Counter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.paused = False

    def __enter__(self):
        _ACTIVE.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        _ACTIVE.remove(self)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused and not _is_view(func):
            self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def one_kernel(fn: F) -> F:
    """Mark ``fn`` as one kernel where it runs: `count_ops` counts a call as one op ``fused:<name>``.

    For the eager versions of functions that run compiled (one fused kernel) on the GPU.

    >>> norm, x = one_kernel(lambda x: x / x.pow(2).mean().sqrt()), torch.ones(4)
    >>> dict(count_ops(lambda: norm(x)))
    {'fused:<lambda>': 1}
    """
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        counter = _ACTIVE[-1] if _ACTIVE else None
        if counter is None or counter.paused:
            return fn(*args, **kwargs)
        counter.counts[f"fused:{getattr(fn, '__name__', 'fn')}"] += 1
        counter.paused = True
        try:
            return fn(*args, **kwargs)
        finally:
            counter.paused = False
    return wrapper  # type: ignore[return-value]


def count_ops(fn: Callable[[], Any]) -> Counter:
    """Run ``fn()`` and return how often each computing aten operation ran (views not counted).

    >>> counts = count_ops(lambda: (torch.ones(3) * 2).t().sum())
    >>> counts["mul"], counts["sum"], "t" in counts
    (1, 1, False)
    """
    counter = _Counter()
    with counter:
        fn()
    return counter.counts


def ops_per_step(run: Callable[[int], Any], short: int = 2, long: int = 6) -> float:
    """Operations per generated token: ``(ops(run(long)) - ops(run(short))) / (long - short)``.

    ``run(n)`` generates ``n`` tokens; what does not depend on ``n`` (prefill, setup) cancels.
    """
    total = sum(count_ops(lambda: run(long)).values()) - sum(count_ops(lambda: run(short)).values())
    return total / (long - short)
