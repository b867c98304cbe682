"""ASD's adaptive strength schedule: the per-token mixing weight from the attention statistics."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from nnsight_av.errors import InputError

from .asd_config import ASDConfig

__all__ = ["strength_target", "next_strength", "strength_schedule"]

# ---------------------------------------------------------------------------------------
# the strength schedule
# ---------------------------------------------------------------------------------------
def strength_target(w: float, m: float, config: ASDConfig = ASDConfig()) -> float:
    """The step's target strength from the adaptive weight ``w`` and the text mass ``m``.

    >>> strength_target(1.0, 0.0)          # min(0.6, 0.5 * 1)
    0.5
    >>> round(strength_target(1.0, 0.5), 6)   # r = 0.5: halved by the cosine decay
    0.25
    >>> round(strength_target(0.3, 0.0), 6)   # 0.15 * (0.3 / 0.6)^2
    0.0375
    """
    target = min(config.cap, config.lam * w)
    if m > config.text_mass_threshold:
        r = min(1.0, (m - config.text_mass_threshold) / config.text_mass_width)
        target *= (1.0 + math.cos(math.pi * r)) / 2.0
    if w < config.gate:
        target *= (w / config.gate) ** config.gate_power
    return float(target)


def next_strength(previous: float, w: float, m: float, config: ASDConfig = ASDConfig()) -> float:
    """``s_t = momentum * s_{t-1} + (1 - momentum) * target(w_t, m_t)``."""
    return float(config.momentum * previous + (1.0 - config.momentum) * strength_target(w, m, config))


def strength_schedule(w: Sequence[float], m: Sequence[float], config: ASDConfig = ASDConfig(),
                      valid: Sequence[bool] | None = None) -> np.ndarray:
    """Strengths ``s_1 .. s_n`` for recorded statistics (what `asd_generate` applies step by step).

    ``s_1 = config.first_strength`` (0: the first token is never altered); a step with
    ``valid[t]`` False (no usable statistics) falls back to greedy, ``s_t = 0``, and the
    momentum restarts from 0.

    >>> strength_schedule([1.0, 1.0, 1.0], [0.0, 0.0, 0.0]).round(4).tolist()
    [0.0, 0.25, 0.375]
    """
    if len(w) != len(m):
        raise InputError(f"w and m must have the same length, got {len(w)} and {len(m)}")
    valid = [True] * len(w) if valid is None else list(valid)
    out, previous = [], 0.0
    for t, (wt, mt) in enumerate(zip(w, m)):
        if t == 0:
            s = float(config.first_strength)
        elif not valid[t]:
            s = 0.0
        else:
            s = next_strength(previous, float(wt), float(mt), config)
        out.append(s)
        previous = s
    return np.asarray(out, dtype=np.float64)
