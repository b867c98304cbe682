"""Convenience runners: `run` (one forward, logits) and `generate` (interventions at chosen steps).

Both run the interventions on either runtime: ``runtime="nnsight"`` (a trace, as in a
notebook) or ``runtime="hooks"`` (`interventions.runtime`: plain PyTorch hooks, no trace;
what the analyses use). The same intervention gives the same outputs on both.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import nnsight
import torch

from nnsight_av.batching import as_list, collate_right, pad_id
from nnsight_av.errors import InputError
from nnsight_av.inputs import AVInputs

from .base import Compose, Intervention, as_intervention
from .params import integer
from .primitives import Patch
from .runtime.decoder import Decoder
from .runtime.hooks import applied

if TYPE_CHECKING:
    from nnsight_av.model import AVModel

__all__ = ["run", "generate", "RUNTIMES", "batch_data"]

RUNTIMES = ("nnsight", "hooks")


def _check_runtime(runtime: str) -> None:
    if runtime not in RUNTIMES:
        raise InputError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")


def _per_input_sets(sets: Any, n: int) -> list[Mapping[str, Any] | None]:
    if sets is None or isinstance(sets, Mapping):
        return [sets] * n
    sets = list(sets)
    if len(sets) != n:
        raise InputError(f"sets= has {len(sets)} entries for {n} inputs (pass one mapping, or one per input)")
    return sets


#: One plain forward's keyword arguments for a list of inputs (right padded when several), as a
#: trace batches them: the core's `nnsight_av.batching.collate_right` under this module's older name.
batch_data = collate_right


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


def run(model: "AVModel", inputs: AVInputs | Sequence[AVInputs], interventions: Any = None, *,
        targets: Iterable[int] | None = None, sets: Any = None, grad: bool = False, runtime: str = "nnsight",
        **trace_kwargs: Any) -> Any:
    """Logits of ``inputs`` with ``interventions`` applied, in one batched forward.

    ``inputs``: one `AVInputs` (returns ``[1, T, V]``) or a list (returns a list of
    ``[1, T_i, V]``, each cut to its own length). ``interventions``: one, a list (composed
    in order) or ``None``. ``targets``: indices of the inputs it applies to (default: all);
    the source invoke of a ``Patch(source=k)`` always records. ``sets``: named position
    sets (one mapping for all inputs, or one per input).

    ``runtime="hooks"`` runs one plain forward of the batch with the interventions on PyTorch
    hooks (``trace_kwargs`` go to the module's forward).

    Also available as ``model.run(inputs, interventions)``.
    """
    _check_runtime(runtime)
    items, single = as_list(inputs)
    plan = _plan(as_intervention(interventions), len(items), targets)
    per_sets = _per_input_sets(sets, len(items))
    if runtime == "hooks":
        decoder = Decoder(model)
        with torch.set_grad_enabled(grad), applied(model, items, plan, sets=per_sets):
            out = decoder.module(**decoder.data(list(items)), **trace_kwargs).logits
        logits = [out[i:i + 1, :len(ex)] for i, ex in enumerate(items)]
        return logits[0] if single else logits
    with torch.set_grad_enabled(grad), model.trace(**trace_kwargs) as tracer:
        logits = nnsight.save([])
        for index, ex in enumerate(items):
            with tracer.invoke(ex):
                if plan[index] is not None:
                    plan[index].apply(model, ex, sets=per_sets[index])
                logits.append(model.logits[:, :len(ex)])
    return logits[0] if single else list(logits)


def generate(model: "AVModel", inputs: AVInputs | Sequence[AVInputs], interventions: Any = None, *,
             steps: Iterable[int] | None = None, targets: Iterable[int] | None = None, sets: Any = None,
             max_new_tokens: int = 16, return_logits: bool = False, runtime: str = "nnsight",
             **generate_kwargs: Any) -> Any:
    """Generate with ``interventions`` applied at every step (``steps=None``) or the chosen ones.

    Step 0 is the prefill (the prompt), step ``s`` the forward that produces new token ``s``.
    Returns the token ids (prompt + new, left-padded when batched), or ``(ids, logits)`` with
    ``return_logits=True``, where ``logits[i]`` is ``[steps_run, V]``: the next-token logits
    of input ``i`` at each step. Other keywords go to ``model.generate`` (greedy unless
    ``do_sample=True``).

    ``runtime="hooks"``: greedy decoding on the fast runtime (`interventions.runtime.Decoder`:
    KV cache, no trace); inputs of one length run as one batch, others one at a time, and ids
    are left-padded into one tensor as ``model.generate`` returns them. It takes no other keywords.
    """
    _check_runtime(runtime)
    max_new_tokens = integer(max_new_tokens, "max_new_tokens", lo=1)
    items, single = as_list(inputs)
    iv = as_intervention(interventions)
    plan = _plan(iv, len(items), targets)
    per_sets = _per_input_sets(sets, len(items))
    chosen = None if steps is None else {integer(s, "a generation step") for s in steps}
    if chosen is not None and any(s < 0 for s in chosen):
        raise InputError(f"generation steps must be >= 0, got {sorted(chosen)}")
    if runtime == "hooks":
        if generate_kwargs.get("do_sample"):
            raise InputError("runtime='hooks' decodes greedily; do_sample=True needs runtime='nnsight'")
        unknown = sorted(set(generate_kwargs) - {"do_sample"})
        if unknown:
            raise InputError(f"runtime='hooks' takes no generate keywords, got {unknown}")
        every = set(range(max_new_tokens)) if chosen is None else chosen
        if len({len(ex) for ex in items}) == 1:      # one batch (a live Patch(source=k) needs its source row)
            runs = _greedy_hooks(model, items, plan, per_sets, every, max_new_tokens)
        else:                                         # unpadded, one input at a time
            children = [c for p in plan if p is not None for c in (p if isinstance(p, Compose) else [p])]
            if any(isinstance(c, Patch) and isinstance(c.source, int) for c in children):
                raise InputError("Patch(source=<invoke>) patches between inputs of one layout; these differ in length")
            runs = [_greedy_hooks(model, [ex], [plan[i]], [per_sets[i]], every, max_new_tokens)[0]
                    for i, ex in enumerate(items)]
        ids = _left_pad([r[0] for r in runs], pad_id(model))
        if not return_logits:
            return ids
        logits = [r[1] for r in runs]
        return ids, (logits[0] if single else logits)
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


def _greedy_hooks(model: "AVModel", items: list[AVInputs], plan: list[Intervention | None], sets: list[Any],
                  chosen: set[int], max_new_tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Greedy decoding of equal-length inputs as one batch on the hook runtime.

    Per input: ``(prompt + new ids [T'], next-token logits per step [steps, V])``; as in
    ``model.generate``, a row that reached EOS is fed the pad token until every row is done.
    """
    decoder = Decoder(model)
    data = collate_right(model, items)
    new: list[torch.Tensor] = []
    step_logits: list[torch.Tensor] = []
    done = torch.zeros(len(items), dtype=torch.bool)
    with torch.no_grad(), applied(model, items, plan, sets=sets) as executor:
        executor.enabled = 0 in chosen
        prefill = decoder.prefill(decoder.data(data))
        logits = prefill.logits
        for step in range(max_new_tokens):
            step_logits.append(logits)
            token = logits.argmax(-1).cpu()
            token = torch.where(done, torch.full_like(token, pad_id(model)), token)
            new.append(token)
            done |= torch.tensor([int(t) in decoder.eos for t in token])
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            executor.enabled = step + 1 in chosen
            logits = decoder.step(token.to(logits.device), prefill, step, prefill.cache)
    ids = torch.stack(new, 1)
    out = []
    for row, ex in enumerate(items):
        prompt = ex.data["input_ids"][0].cpu()
        out.append((torch.cat([prompt, ids[row].to(prompt.dtype)]),
                    torch.stack([l[row] for l in step_logits]).detach()))
    return out


def _left_pad(rows: list[torch.Tensor], pad_id: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.stack([torch.cat([torch.full((width - len(r),), pad_id, dtype=r.dtype), r]) for r in rows])
