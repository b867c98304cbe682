"""Convenience runners: `run` (one forward, logits) and `generate` (interventions at chosen steps)."""

from __future__ import annotations

import warnings
from typing import Any, Iterable, Mapping, Sequence

import nnsight
import torch

from nnsight_av.errors import InputError
from nnsight_av.inputs import AVInputs

from .base import Compose, Intervention, as_intervention
from .params import integer
from .primitives import Patch

__all__ = ["run", "generate"]


def _inputs_list(inputs: Any) -> tuple[list[AVInputs], bool]:
    single = isinstance(inputs, AVInputs)
    items = [inputs] if single else list(inputs)
    if not items:
        raise InputError("no inputs given")
    for k, item in enumerate(items):
        if not isinstance(item, AVInputs):
            raise InputError(f"input {k} is a {type(item).__name__}, not AVInputs (from model.prepare)")
    return items, single


def _per_input_sets(sets: Any, n: int) -> list[Mapping[str, Any] | None]:
    if sets is None or isinstance(sets, Mapping):
        return [sets] * n
    sets = list(sets)
    if len(sets) != n:
        raise InputError(f"sets= has {len(sets)} entries for {n} inputs (pass one mapping, or one per input)")
    return sets


def _plan(iv: Intervention | None, n: int, targets: Iterable[int] | None) -> list[Intervention | None]:
    """What each invoke applies: the intervention for targets; for others, only `Patch` recordings they source."""
    if iv is None:
        return [None] * n
    chosen = set(range(n)) if targets is None else {int(t) for t in targets}
    bad = sorted(t for t in chosen if not 0 <= t < n)
    if bad:
        raise InputError(f"targets {bad} are out of range for {n} inputs")
    children = list(iv) if isinstance(iv, Compose) else [iv]
    plan: list[Intervention | None] = []
    for index in range(n):
        if index in chosen:
            plan.append(iv)
            continue
        sources = [c for c in children if isinstance(c, Patch) and isinstance(c.source, int) and c.source == index]
        plan.append(Compose(sources) if sources else None)
    return plan


def run(model: Any, inputs: AVInputs | Sequence[AVInputs], interventions: Any = None, *,
        targets: Iterable[int] | None = None, sets: Any = None, grad: bool = False,
        **trace_kwargs: Any) -> Any:
    """Logits of ``inputs`` with ``interventions`` applied, in one batched forward.

    ``inputs``: one `AVInputs` (returns ``[1, T, V]``) or a list (returns a list of
    ``[1, T_i, V]``, each cut to its own length). ``interventions``: one, a list (composed
    in order) or ``None``. ``targets``: indices of the inputs it applies to (default: all);
    the source invoke of a ``Patch(source=k)`` always records. ``sets``: named position
    sets (one mapping for all inputs, or one per input).

    Also available as ``model.run(inputs, interventions)``.
    """
    items, single = _inputs_list(inputs)
    plan = _plan(as_intervention(interventions), len(items), targets)
    per_sets = _per_input_sets(sets, len(items))
    with torch.set_grad_enabled(grad), model.trace(**trace_kwargs) as tracer:
        logits = nnsight.save([])
        for index, ex in enumerate(items):
            with tracer.invoke(ex):
                if plan[index] is not None:
                    plan[index].apply(model, ex, sets=per_sets[index])
                logits.append(model.logits[:, :len(ex)])
    return logits[0] if single else list(logits)


def generate(model: Any, inputs: AVInputs | Sequence[AVInputs], interventions: Any = None, *,
             steps: Iterable[int] | None = None, targets: Iterable[int] | None = None, sets: Any = None,
             max_new_tokens: int = 16, return_logits: bool = False, **generate_kwargs: Any) -> Any:
    """Generate with ``interventions`` applied at every step (``steps=None``) or the chosen ones.

    Step 0 is the prefill (the prompt), step ``s`` the forward that produces new token ``s``.
    Returns the token ids (prompt + new, left-padded when batched), or ``(ids, logits)`` with
    ``return_logits=True``, where ``logits[i]`` is ``[steps_run, V]``: the next-token logits
    of input ``i`` at each step. Other keywords go to ``model.generate`` (greedy unless
    ``do_sample=True``).
    """
    max_new_tokens = integer(max_new_tokens, "max_new_tokens", lo=1)
    items, single = _inputs_list(inputs)
    iv = as_intervention(interventions)
    plan = _plan(iv, len(items), targets)
    per_sets = _per_input_sets(sets, len(items))
    chosen = None if steps is None else {integer(s, "a generation step") for s in steps}
    if chosen is not None and any(s < 0 for s in chosen):
        raise InputError(f"generation steps must be >= 0, got {sorted(chosen)}")
    generate_kwargs.setdefault("do_sample", False)
    loop = return_logits or any(p is not None for p in plan)
    with warnings.catch_warnings():
        # A loop over max_new_tokens steps outruns a generation that stopped at EOS; nnsight warns.
        warnings.filterwarnings("ignore", message=".*was never reached.*")
        with torch.no_grad(), model.generate(max_new_tokens=max_new_tokens, **generate_kwargs) as tracer:
            step_logits = nnsight.save([])
            for index, ex in enumerate(items):
                with tracer.invoke(ex):
                    mine = []
                    step_logits.append(mine)
                    if loop:
                        for step in tracer.iter[0:max_new_tokens]:
                            if plan[index] is not None and (chosen is None or step in chosen):
                                plan[index].apply(model, ex, sets=per_sets[index])
                            if return_logits:
                                mine.append(model.logits[0, -1].detach().clone())
            with tracer.invoke():
                ids = tracer.result.save()
    if not return_logits:
        return ids
    logits = [torch.stack(per) if per else torch.zeros(0) for per in step_logits]
    return ids, (logits[0] if single else logits)
