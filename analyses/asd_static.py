"""ASD over a static KV cache: statistics, strength schedule and mixing on the device, no host sync per step.

`asd_generate`'s DynamicCache loop reads the attention statistics to the host every token to
compute the strength (`analyses.asd_schedule`). Here the same arithmetic runs on the device in
float64 (the host's precision) inside the step of `interventions.runtime.static_decoder`, so the
step (both rows, the decode kernel with the boost and statistics, the schedule, the mixed
argmax) is one CUDA graph replay. The per-step diagnostics go to a device buffer read once at the end.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from interventions.runtime.decoder import Decoder, Prefill
from interventions.runtime.static_decoder import StaticDecoder

from .asd_config import SINK_SETS, ASDConfig
from .asd_hook import ASDHook

__all__ = ["device_statistics", "device_strength_target", "static_asd_loop"]

#: Columns of the per-step diagnostics buffer (``reason`` is derived from ``fallback`` on the host).
TRACE = ("s", "target", "w", "m", "C", "U", "fallback", "changed")


def device_statistics(values: torch.Tensor, config: ASDConfig) -> tuple[torch.Tensor, ...]:
    """`analyses.asd_hook.step_statistics` on the device: ``(w, m, C, U)`` as 0-d float64 tensors.

    >>> import numpy as np
    >>> from analyses.asd_hook import step_statistics
    >>> values = np.random.default_rng(0).random((3, 5))
    >>> ours = [float(t) for t in device_statistics(torch.tensor(values), ASDConfig())]
    >>> np.allclose(ours, step_statistics(values, ASDConfig()))
    True
    """
    index = {name: i for i, name in enumerate(SINK_SETS)}
    values = values.double()
    c = sum(values[:, index[s]].sum() for s in config.cross_sets)
    u = sum(values[:, index[s]].sum() for s in config.unimodal_sets)
    zero = values.new_zeros(())
    c, u = zero + c, zero + u
    m = values[:, 4].mean()
    w = c / (c + u + config.eps)
    return w, m, c, u


def device_strength_target(w: torch.Tensor, m: torch.Tensor, config: ASDConfig) -> torch.Tensor:
    """`analyses.asd_schedule.strength_target` on 0-d tensors (no host branch on their values).

    >>> from analyses.asd_schedule import strength_target
    >>> [round(float(device_strength_target(torch.tensor(w), torch.tensor(m), ASDConfig())), 6)
    ...  for w, m in [(1.0, 0.0), (1.0, 0.5), (0.3, 0.0)]] == [strength_target(1.0, 0.0), 0.25, 0.0375]
    True
    """
    target = torch.clamp(config.lam * w, max=config.cap)
    r = torch.clamp((m - config.text_mass_threshold) / config.text_mass_width, max=1.0)
    decay = (1.0 + torch.cos(math.pi * r)) / 2.0
    target = torch.where(m > config.text_mass_threshold, target * decay, target)
    gated = target * (w / config.gate) ** config.gate_power
    return torch.where(w < config.gate, gated, target)


def _mix(unguided: torch.Tensor, guided: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mixed argmax and whether it differs from the unguided one (``s == 0``: the unguided row itself)."""
    mixed = torch.where(s == 0, unguided, unguided + s.float() * (guided - unguided))
    token = mixed.argmax()
    return token, token != unguided.argmax()


def static_asd_loop(decoder: Decoder, prefill: Prefill, cache: Any, hook: ASDHook, config: ASDConfig,
                    guided_on: bool, unguided: torch.Tensor, guided: torch.Tensor,
                    first: tuple[float, float, float, float], max_new_tokens: int, graph: bool | None = None
                    ) -> tuple[list[int], bool, dict[str, list[Any]], str]:
    """ASD's decode loop over a static cache (the same choices as `asd_generate`'s DynamicCache loop).

    ``cache``: the two-row (or, without guidance, one-row) cache after the prefill;
    ``unguided``/``guided``: the first token's log-probabilities; ``first``: the prompt's
    ``(w, m, C, U)``. Returns the ids, whether EOS ended them, the per-step diagnostics
    (`ASDOutput.steps` minus ``reason``) and "static" or "graph".
    """
    loop = StaticDecoder(decoder, prefill, Decoder.kv(cache), max_new_tokens, graph)
    device = decoder.device
    trace = torch.zeros(max_new_tokens, len(TRACE), dtype=torch.float64, device=device)
    s0 = float(config.first_strength) if guided_on else 0.0
    previous = torch.tensor(s0, dtype=torch.float64, device=device)
    token, changed = _mix(unguided, guided, previous)
    w, m, c, u = first
    trace[0] = torch.stack([previous, previous.new_tensor(0.0), *(previous.new_tensor(x) for x in (w, m, c, u)),
                            previous.new_tensor(float(not guided_on)), changed.double()])

    def decide(logits: torch.Tensor, values: torch.Tensor, previous: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        both = torch.log_softmax(logits, -1)
        unguided = both[0]
        guided = both[1] if guided_on else unguided
        w, m, c, u = device_statistics(values, config)
        zero = previous.new_zeros(())
        if guided_on:
            ok = torch.isfinite(w) & torch.isfinite(m) & (c + u > 0)
            target = torch.where(ok, device_strength_target(w, m, config), zero)
            s = torch.where(ok, config.momentum * previous + (1.0 - config.momentum) * target, zero)
        else:
            ok = torch.zeros((), dtype=torch.bool, device=previous.device)
            target = s = zero
        token, changed = _mix(unguided, guided, s)
        return token, torch.stack([s, target, w, m, c, u, (~ok).double(), changed.double()]), s

    # ~50 tiny kernels written out (float64 scalars); one compiled function is a few on CUDA
    if device.type == "cuda":
        decide = torch.compile(decide, fullgraph=True, dynamic=False)

    def choose(logits: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        token, row, s = decide(logits, hook.decode_buffer.mean(1), previous)
        trace.index_copy_(0, step.reshape(1), row[None])
        previous.copy_(s)
        return token

    hook.length = loop.count
    try:
        ids, finished = loop.generate(token, choose, state=[trace, previous])
    finally:
        hook.length = None
    rows = trace[: len(ids)].tolist()
    steps = {name: [row[j] for row in rows] for j, name in enumerate(TRACE)}
    steps["fallback"] = [bool(x) for x in steps["fallback"]]
    steps["changed"] = [bool(x) for x in steps["changed"]]
    return ids, finished, steps, "graph" if loop.used_graph else "static"
