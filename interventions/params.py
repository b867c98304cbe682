"""Checks for the numeric and flag parameters of interventions, at construction time.

A parameter that is not finite or out of range would otherwise surface as NaN logits (or
a torch error) deep inside a forward; these checks name it while the intervention is built
or deserialised.
"""

from __future__ import annotations

import math
from typing import Any

from nnsight_av.errors import InputError

__all__ = ["real", "integer", "flag"]


def real(value: Any, name: str, lo: float | None = None, hi: float | None = None) -> float:
    """``value`` as a finite float in ``[lo, hi]``, else `InputError` naming ``name``.

    >>> real(0.5, "alpha", lo=0)
    0.5
    >>> real(float("nan"), "scale")
    Traceback (most recent call last):
    ...
    nnsight_av.errors.InputError: scale must be a finite number, got nan
    """
    if isinstance(value, (bool, str, bytes)) or value is None:
        raise InputError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number, got {type(value).__name__}") from None
    if not math.isfinite(number):
        raise InputError(f"{name} must be a finite number, got {number}")
    if lo is not None and number < lo:
        raise InputError(f"{name} must be >= {lo}, got {number}")
    if hi is not None and number > hi:
        raise InputError(f"{name} must be <= {hi}, got {number}")
    return number


def integer(value: Any, name: str, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` as an int in ``[lo, hi)`` (a bool or a float is refused, not rounded).

    >>> integer(3, "seed", lo=0)
    3
    """
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise InputError(f"{name} must be an integer, got {value!r}")
    number = int(value.__index__())
    if lo is not None and number < lo:
        raise InputError(f"{name} must be >= {lo}, got {number}")
    if hi is not None and number >= hi:
        raise InputError(f"{name} must be < {hi}, got {number}")
    return number


def flag(value: Any, name: str) -> bool:
    """``value`` if it is a bool (``"no"`` or ``2`` are refused, not read as true)."""
    if not isinstance(value, bool):
        raise InputError(f"{name} must be True or False, got {value!r}")
    return value
