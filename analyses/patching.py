"""The patched forwards of causal tracing: `PatchRunner` and its records.

A patched run is a composition of intervention primitives on the hook runtime
(`interventions.runtime`): record the clean run, then run the corrupted input with a `Patch`
(the clean source's site values for a token set, at every layer of a window) plus the user's
``interventions=``. How the exact sweep saves work (every condition gives the same numbers as
a full patched forward; ``tests/test_tracing.py`` checks it against a plain loop); the KV
caches that make it possible live in `interventions.runtime.kv_cache`:

1. one clean forward per clip caches the site only at the positions some token set patches;
2. one corrupted forward records the residual stream (each layer's input), each layer's
   post-rotary keys/values and the keyword arguments the model passed to its layers
   (`kv_cache.recording`);
3. a condition whose first patched layer is ``l`` and first patched position is ``p`` resumes
   from the recorded residual at layer ``l`` (layers below it equal the corrupted run) and
   computes only positions ``>= p`` (earlier positions cannot see the patch under causal
   attention), attending to the recorded keys/values of positions ``< p`` (`kv_cache.resume`
   with a `PrefixKV`); the LM head runs on the last position only. Conditions with the same
   first layer are batched, one `Patch` per batch row;
4. at ``input_layernorm`` / ``resid_pre``, a window reaching the last layer does not compute
   the positions it overwrites at all (`PatchRunner._can_skip`; a `ScatterKV` serves the
   clean keys/values for them); such conditions with the same first layer are batched too,
   each row computing its own positions (`PatchRunner._skipping_batches` picks the batches).

``interventions=`` adds a user's interventions (e.g. head knockouts) to every clean,
corrupted and patched forward: the runtime maps positions to rows through the KV cache, so
the sweep stays exact and as fast (the skipping of step 4 is turned off with them). Inputs
made by ``ablate(..., method="encoder")`` get their `ablation_intervention` in the full
forwards (the patched runs resume from layers their ablation already reached). Sinks and
their split are still taken from the plain clean run.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Sequence

import torch
from jaxtyping import Float, Int

from interventions.base import Compose, as_intervention
from interventions.cache import ActivationCache, layout_signature
from interventions.primitives import Patch
from interventions.runtime.hooks import applied, gradients_from, observed
from interventions.runtime.kv_cache import (KVRecorder, LayerRecord, PrefixKV, ScatterKV, cache_in_layers,
                                            pad_rows, recording, resume)
from interventions.site import ALIASES, Site, canonical_role
from nnsight_av.batching import to_device
from nnsight_av.errors import InputError

from .ablation import ablation_intervention
from .batching import take_row
from .options import last_logits_only, letter_probs, normalize_options, on_device, option_token_ids
from .token_sets import Condition

if TYPE_CHECKING:
    from nnsight_av import AVInputs, AVModel

__all__ = ["SITES", "canonical_site", "PatchRunner", "CleanRecord", "CorruptRecord"]

#: Where clean activations are written. ``input_layernorm``: the normalised input to attention
#: (the paper's default); ``resid_pre`` / ``resid_post``: a layer's input / output;
#: ``attn_output`` / ``mlp_output``: the attention block's / MLP's output.
SITES = ("input_layernorm", "resid_pre", "resid_post", "attn_output", "mlp_output")
#: The per-row set a patched run's `Patch` selects its tokens from.
PATCHED_SET = "patched"


def canonical_site(site: str) -> str:
    """``site`` with aliases resolved (the one table, `interventions.site.ALIASES`); `InputError` on an
    unknown site or one that cannot be patched.

    >>> canonical_site("layer_input"), canonical_site("input_layernorm")
    ('resid_pre', 'input_layernorm')
    """
    try:
        name = canonical_role(site)
    except InputError:
        name = None
    if name not in SITES:
        raise InputError(f"unknown site {site!r} for patching; choose one of {SITES} (aliases: "
                         f"{sorted(a for a, r in ALIASES.items() if r in SITES)})")
    return name


# ---------------------------------------------------------------------------------------
# the engine
# ---------------------------------------------------------------------------------------
@dataclass
class CleanRecord:
    """The clean run: letter probabilities and the site's values at ``positions`` for ``layers``.

    ``keys`` / ``kv_values`` (when recorded) hold each layer's post-rotary keys / values, which
    the exact sweep uses for positions it need not compute (see `PatchRunner`).
    """

    probs: Float[torch.Tensor, "options"]
    positions: Int[torch.Tensor, "positions"]
    values: dict[int, torch.Tensor]                   # layer -> [n, hidden] on the model's device
    keys: dict[Any, torch.Tensor] | None = None
    kv_values: dict[Any, torch.Tensor] | None = None


@dataclass
class CorruptRecord(LayerRecord):
    """The corrupted run, recorded so a patched condition can resume at any layer and position.

    A `LayerRecord` (length, residual stream, keys/values, layer keyword arguments, deltas)
    with the run's letter ``probs`` and its inputs ``item`` (build it with keywords).
    """

    probs: Float[torch.Tensor, "options"] | None = None
    item: Any = None


class PatchRunner:
    """Runs the clean, corrupted and patched forwards of one model for one site.

    ``causal_trace`` and the dataset pipeline build one; use it directly to share the
    clean/corrupted runs between analyses (see `analyses.runner.analyze_clip`).
    """

    def __init__(self, model: "AVModel", site: str = "input_layernorm", options: Any = "ABCD",
                 skip_overwritten: bool = True, interventions: Any = None) -> None:
        self.model = model
        self.skip_overwritten = skip_overwritten
        self.site = canonical_site(site)
        self.interventions = as_intervention(interventions)
        if self.interventions is not None:
            clash = sorted({s.point for s in self.interventions.sites()} & {self.site})
            if clash:
                raise InputError(f"interventions= edit the patched site {clash[0]!r} itself; patch one site and "
                                 f"intervene at others")
        self.options = normalize_options(options)
        self.token_ids = option_token_ids(model.tokenizer, self.options)
        self.layers = model.raw("layers")
        self.final_norm = model.raw("final_norm")
        self.lm_head = model.raw("lm_head")
        self.num_layers = model.num_layers
        self.attn_impl = model.attn_implementation
        self._memo: tuple[CleanRecord, CorruptRecord, ActivationCache] | None = None

    def _can_skip(self) -> bool:
        """Whether this site and attention kernel allow skipping overwritten positions.

        At ``input_layernorm`` / ``resid_pre`` a position patched at every layer from the
        window's first to the last one has the clean run's keys/values at each of them, and its
        own states are never read again (they are overwritten at the next layer, and only the
        last position reaches the LM head): such positions are not computed at all. The
        queries left are not contiguous, which needs an explicit mask (sdpa or eager).
        """
        return self.skip_overwritten and self.site in ("input_layernorm", "resid_pre") and \
            self.attn_impl in ("sdpa", "eager") and self.interventions is None

    def extra(self, item: "AVInputs") -> ContextManager[Any]:
        """The user's ``interventions`` on the hook runtime for forwards of ``item``'s layout (else nothing)."""
        if self.interventions is None:
            return nullcontext()
        return applied(self.model, item, self.interventions)

    def _ablation(self, item: "AVInputs") -> ContextManager[Any]:
        """``item``'s `ablation_intervention` on the hook runtime (opened last, so it edits first)."""
        iv = ablation_intervention(item)
        return nullcontext() if iv is None else applied(self.model, item, iv)

    # -- plain forwards -------------------------------------------------------------
    def _forward(self, item: "AVInputs", extra: bool = True) -> torch.Tensor:
        """One full forward of ``item``; last-position logits ``[vocab]``.

        ``extra``: apply the user's interventions here (off when the caller opened them first).
        """
        item = on_device(self.model, item)
        with last_logits_only(self.model, [len(item) - 1]), (self.extra(item) if extra else nullcontext()), \
                self._ablation(item):
            logits = self.model.raw()(**self.model.module_inputs(item), use_cache=False).logits
        return logits[0, -1]

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        return letter_probs(logits, self.token_ids).cpu()

    def corrupt_probs(self, item: "AVInputs") -> torch.Tensor:
        """Letter probabilities of one plain forward of ``item``."""
        with torch.no_grad():
            return self.probs(self._forward(item))

    def _observe(self, layers: Sequence[int], keep: Callable[[int, torch.Tensor], None]) -> ContextManager[None]:
        """``keep(layer, value)`` sees the patched site of each of ``layers`` (the runtime's `observed`)."""
        return observed(self.model, self.site, layers, keep)

    def record_clean(self, item: "AVInputs", positions: torch.Tensor, layers: Sequence[int],
                     kv: bool | None = None) -> CleanRecord:
        """Clean forward; the site's values at ``positions`` (sorted) for ``layers``.

        ``kv`` also keeps every layer's keys/values (default: when the site allows skipping
        overwritten positions, see `PatchRunner`).
        """
        positions = torch.unique(torch.as_tensor(positions, dtype=torch.long).flatten().cpu())
        values: dict[int, torch.Tensor] = {}

        def keep(layer: int, t: torch.Tensor) -> None:
            values[layer] = t[0, to_device(positions, t.device)].detach().clone()
        recorder = KVRecorder() if (self._can_skip() if kv is None else kv) else None
        with torch.no_grad(), self._observe(layers, keep), \
                (cache_in_layers(self.layers, recorder) if recorder is not None else nullcontext()):
            logits = self._forward(item)
        return CleanRecord(self.probs(logits), positions, values,
                           recorder.keys if recorder is not None else None,
                           recorder.values if recorder is not None else None)

    def record_clean_during(self, during: Callable[[], Any], item: "AVInputs", positions: torch.Tensor,
                            layers: Sequence[int]) -> tuple[CleanRecord, Any]:
        """`record_clean` riding on another prefill of ``item`` that ``during()`` runs (e.g. the sink analysis).

        That prefill may stop inside the last layer (it needs no logits): the site is read before
        attention, so every layer's value is there, and the last layer is then finished for the
        last position alone from the recorded keys/values. Only for the ``input_layernorm`` and
        ``resid_pre`` sites; when anything is missing the clean run is made separately.
        Returns the record and what ``during()`` returned.
        """
        records, result = self.record_clean_batch_during(during, [item], [positions], layers)
        return records[0], result

    def record_clean_batch_during(self, during: Callable[[], Any], items: Sequence["AVInputs"],
                                  positions: Sequence[torch.Tensor], layers: Sequence[int]
                                  ) -> tuple[list[CleanRecord], Any]:
        """`record_clean_during` for ``items`` that ``during()`` runs as one right-padded batch (in this order).

        Each clip's record is cut out of the batch (`analyses.batching.take_row`) and equals, to
        float rounding, the record of a prefill of that clip alone.
        """
        items = list(items)
        last = self.num_layers - 1
        if self.site not in ("input_layernorm", "resid_pre") or self.interventions is not None \
                or any(ablation_intervention(it) is not None for it in items):
            result = during()
            return [self.record_clean(it, p, layers) for it, p in zip(items, positions)], result
        positions = [torch.unique(torch.as_tensor(p, dtype=torch.long).flatten().cpu()) for p in positions]
        batch, total = len(items), max(len(it) for it in items)
        values: list[dict[int, torch.Tensor]] = [{} for _ in items]

        def keep(layer: int, t: torch.Tensor) -> None:
            if t.shape[0] == batch and t.shape[1] == total:
                for row, pos in enumerate(positions):
                    values[row][layer] = t[row, to_device(pos, t.device)].detach().clone()
        with self._observe(layers, keep), recording(self.layers, starts=[last]) as recorder:
            result = during()
        seen = recorder.resid.get(last)
        complete = ((batch == 1 or batch < total) and all(set(layers) <= set(v) for v in values)
                    and recorder.used_every_layer() and seen is not None and seen.shape[:2] == (batch, total))
        if not complete:
            return [self.record_clean(it, p, layers) for it, p in zip(items, positions)], result
        whole = recorder.record(total, deltas=False)
        records = []
        for row, item in enumerate(items):
            partial = whole if batch == 1 else self._row_record(whole, row, batch, len(item))
            records.append(self._finish_clean(positions[row], values[row], partial))
        return records, result

    def _row_record(self, record: LayerRecord, row: int, batch: int, length: int) -> LayerRecord:
        """Row ``row`` of a right-padded batch's `LayerRecord`, cut to that clip's ``length``."""
        total = record.length
        deltas = [None if d is None else d[row:row + 1, :length] for d in record.deltas]
        return LayerRecord(length, {l: r[row:row + 1, :length] for l, r in record.resid.items()},
                           {k: v[row:row + 1, :, :length] for k, v in record.keys.items()},
                           {k: v[row:row + 1, :, :length] for k, v in record.values.items()},
                           [{k: take_row(v, row, batch, total, length) for k, v in kw.items()} for kw in record.kwargs],
                           [d if d is not None and bool(d.abs().max() > 0) else None for d in deltas])

    def _finish_clean(self, positions: torch.Tensor, values: dict[int, torch.Tensor], partial: LayerRecord
                      ) -> CleanRecord:
        """The clean record of a prefill that stopped inside the last layer: that layer is finished for the
        last position alone from the recorded keys/values."""
        last, total = self.num_layers - 1, partial.length
        with torch.no_grad():
            hidden = resume(self.layers, partial, last, partial.resid[last][:, total - 1:],
                            PrefixKV(partial.keys, partial.values, total - 1), attn_impl=self.attn_impl, p0=total - 1)
            logits = self._logits(hidden)[0]
        return CleanRecord(self.probs(logits), positions, values, partial.keys, partial.values)

    def record_corrupt(self, item: "AVInputs", starts: Sequence[int] | None = None) -> CorruptRecord:
        """Corrupted forward caching the residual at ``starts`` (default: every layer), the keys/values
        and the layer keyword arguments."""
        # The user's interventions are opened first: the recorder reads each layer's input before
        # them (resuming a layer re-applies them), after the input's own ablation.
        with self.extra(item), torch.no_grad(), recording(self.layers, starts) as recorder:
            logits = self._forward(item, extra=False)
        record = recorder.record(len(item))
        return CorruptRecord(**{f.name: getattr(record, f.name) for f in fields(record)}, probs=self.probs(logits),
                             item=item)

    def _one_by_one(self, items: Sequence["AVInputs"]) -> bool:
        """Whether ``items`` go one forward each: a single clip, user interventions or an encoder ablation."""
        return len(items) == 1 or self.interventions is not None \
            or any(ablation_intervention(it) is not None for it in items)

    def record_corrupt_batch(self, items: Sequence["AVInputs"], starts: Sequence[int] | None = None
                             ) -> list[CorruptRecord]:
        """`record_corrupt` of each of ``items`` from one right-padded forward; each record equals, to float
        rounding, that of the clip alone. Encoder-ablated inputs and runs with ``interventions`` go one by one."""
        items = list(items)
        if self._one_by_one(items) or len(items) >= min(len(it) for it in items):
            return [self.record_corrupt(it, starts) for it in items]
        with torch.no_grad(), recording(self.layers, starts) as recorder:
            logits = self._forward_batch(items)
        batch, total = len(items), max(len(it) for it in items)
        whole = recorder.record(total)
        probs = self.probs(logits)
        records = []
        for row, item in enumerate(items):
            record = self._row_record(whole, row, batch, len(item))
            records.append(CorruptRecord(**{f.name: getattr(record, f.name) for f in fields(record)},
                                         probs=probs[row], item=item))
        return records

    def corrupt_probs_batch(self, items: Sequence["AVInputs"]) -> list[torch.Tensor]:
        """`corrupt_probs` of each of ``items`` from one right-padded forward (one by one where `record_corrupt_batch`
        would go one by one)."""
        items = list(items)
        if self._one_by_one(items):
            return [self.corrupt_probs(it) for it in items]
        with torch.no_grad():
            return list(self.probs(self._forward_batch(items)))

    def _forward_batch(self, items: Sequence["AVInputs"]) -> torch.Tensor:
        """Plain forward of ``items`` (no interventions) as one right-padded batch: each one's last-position
        logits ``[B, vocab]``."""
        items = [on_device(self.model, it) for it in items]
        with last_logits_only(self.model, [len(it) - 1 for it in items]):
            logits = self.model.raw()(**self.model.module_inputs(items), use_cache=False).logits
        return logits[:, -1]

    # -- patched continuation -------------------------------------------------------------
    def _source(self, clean: CleanRecord, corrupt: CorruptRecord) -> ActivationCache:
        """The clean values as a `Patch` source: per layer, a table over the corrupted run's positions."""
        if corrupt.item is None:
            raise InputError("the corrupted record has no inputs (item=); make it with PatchRunner.record_corrupt")
        memo = self._memo
        if memo is not None and memo[0] is clean and memo[1] is corrupt:
            return memo[2]
        site = Site(self.site)
        acts = {}
        for layer, values in clean.values.items():
            table = values.new_zeros((corrupt.length, *values.shape[1:]))
            table[to_device(clean.positions, values.device)] = values
            acts[site.key(layer)] = table
        source = ActivationCache(acts, layout_signature(corrupt.item), name="clean")
        self._memo = (clean, corrupt, source)
        return source

    def _patching(self, clean: CleanRecord, corrupt: CorruptRecord, batch: Sequence[Condition]) -> ContextManager:
        """One `Patch` per batch row (its condition's tokens and layers), composed with the user's interventions."""
        source = self._source(clean, corrupt)
        rows = []
        for cond in batch:
            patch = Patch(source=source, site=self.site, layers=list(cond.layers), tokens=PATCHED_SET)
            rows.append(patch if self.interventions is None else Compose([patch, self.interventions]))
        sets = [{PATCHED_SET: cond.positions} for cond in batch]
        return applied(self.model, [corrupt.item] * len(batch), rows, sets=sets)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.final_norm(hidden[:, -1:]))[:, 0]

    def _run_batch(self, clean: CleanRecord, corrupt: CorruptRecord, batch: list[Condition]) -> torch.Tensor:
        start = min(c.start for c in batch)
        p0 = min(int(c.positions[0]) for c in batch)
        base = corrupt.resid.get(start)
        if base is None:
            raise InputError(f"the corrupted run cached no residual at layer {start}")
        hidden = base[:, p0:].expand(len(batch), -1, -1).clone()
        with self._patching(clean, corrupt, batch):
            hidden = resume(self.layers, corrupt, start, hidden, PrefixKV(corrupt.keys, corrupt.values, p0),
                            attn_impl=self.attn_impl, p0=p0)
        return self._logits(hidden)

    def _skippable(self, clean: CleanRecord, corrupt: CorruptRecord, cond: Condition) -> bool:
        return (self._can_skip() and clean.keys is not None and cond.positions.numel() > 0
                and cond.layers == tuple(range(cond.start, self.num_layers))
                and bool((cond.positions != corrupt.length - 1).any()))

    def _skipping_rows(self, corrupt: CorruptRecord, cond: Condition) -> torch.Tensor:
        """The positions a skipping run of ``cond`` computes: from its first patched one on, minus the
        patched ones (the last position is always computed)."""
        total, positions = corrupt.length, cond.positions
        keep = torch.ones(total, dtype=torch.bool)
        keep[: int(positions[0])] = False
        keep[positions[positions != total - 1]] = False
        return torch.nonzero(keep).flatten()

    def _run_skipping(self, clean: CleanRecord, corrupt: CorruptRecord, batch: Sequence[Condition]) -> torch.Tensor:
        """Conditions whose windows reach the last layer from the same first layer, computing only the
        positions they must, one batch row each; ``[B, vocab]`` last-position logits.

        Each row computes `_skipping_rows` (rows with fewer positions are padded, `pad_rows`).
        The keys/values of its computed positions come from this run, those of its patched
        positions from the clean run, those of earlier positions from the corrupted run.
        """
        total = corrupt.length
        base = corrupt.resid[batch[0].start]
        found = [self._skipping_rows(corrupt, cond) for cond in batch]
        rows = pad_rows(found, total)                                          # on the host: no waiting
        cache = ScatterKV(clean.keys, clean.kv_values, corrupt.keys, corrupt.values,
                          [int(c.positions[0]) for c in batch], rows)
        with self._patching(clean, corrupt, batch):
            hidden = resume(self.layers, corrupt, batch[0].start, base[0][cache.rows.clamp(max=total - 1)], cache,
                            attn_impl=self.attn_impl, rows=rows)
        last = to_device(torch.tensor([len(r) - 1 for r in found]), hidden.device)    # each row's last position
        return self._logits(hidden[torch.arange(len(batch), device=hidden.device), last][:, None])

    def _skipping_batches(self, corrupt: CorruptRecord, conditions: Sequence[Condition], todo: Sequence[int],
                          batch_size: int) -> list[list[int]]:
        """``todo`` (indices of skippable conditions) in batches of at most ``batch_size`` with the same first layer.

        A batch costs its rows padded to its widest row, plus a fixed cost per forward (the host's
        work, a few dozen ms: here half a sequence of rows); by first layer, the conditions sorted
        by width are cut where that total is least (a small dynamic programme).
        """
        width = {i: int(self._skipping_rows(corrupt, conditions[i]).numel()) for i in todo}
        fixed = corrupt.length / 2
        batches: list[list[int]] = []
        for start in sorted({conditions[i].start for i in todo}):
            items = sorted((i for i in todo if conditions[i].start == start), key=lambda i: -width[i])
            best, cut = [0.0] + [float("inf")] * len(items), [0] * (len(items) + 1)
            for end in range(1, len(items) + 1):
                for begin in range(max(0, end - batch_size), end):
                    cost = best[begin] + (end - begin) * width[items[begin]] + fixed
                    if cost < best[end]:
                        best[end], cut[end] = cost, begin
            end, found = len(items), []
            while end:
                found.append(items[cut[end]:end])
                end = cut[end]
            batches.extend(reversed(found))
        return batches

    def run(self, clean: CleanRecord, corrupt: CorruptRecord, conditions: Sequence[Condition], *,
            batch_size: int = 4, progress: bool = False) -> Float[torch.Tensor, "conditions options"]:
        """Letter probabilities of each patched condition (the exact sweep described above)."""
        from tqdm.auto import tqdm

        if batch_size < 1:
            raise InputError(f"batch_size must be at least 1, got {batch_size}")
        out = torch.zeros(len(conditions), len(self.options))
        todo = [i for i, c in enumerate(conditions) if c.positions.numel()]
        for i, c in enumerate(conditions):
            if not c.positions.numel():
                out[i] = corrupt.probs            # nothing patched: the corrupted run itself
        skipping = [i for i in todo if self._skippable(clean, corrupt, conditions[i])]
        todo = [i for i in todo if i not in set(skipping)]
        todo.sort(key=lambda i: (conditions[i].start, int(conditions[i].positions[0])))
        batches: list[list[int]] = []
        for i in todo:
            if batches and len(batches[-1]) < batch_size and conditions[batches[-1][0]].start == conditions[i].start:
                batches[-1].append(i)
            else:
                batches.append([i])
        runs = [(self._run_skipping, batch) for batch in self._skipping_batches(corrupt, conditions, skipping,
                                                                                 batch_size)]
        runs += [(self._run_batch, batch) for batch in batches]
        bar = tqdm(total=len(todo) + len(skipping), desc="patched runs", leave=False,
                   disable=not progress or len(todo) + len(skipping) < 2)
        pending: tuple[list[int], torch.Tensor] | None = None

        def collect() -> None:
            # read one batch behind: the next batch is queued before the host waits for this one,
            # so the GPU never idles while the host sets a batch up
            if pending is not None:
                out[pending[0]] = pending[1].cpu()
                bar.update(len(pending[0]))
        try:
            with torch.no_grad():
                for method, batch in runs:
                    probs = letter_probs(method(clean, corrupt, [conditions[i] for i in batch]), self.token_ids)
                    collect()
                    pending = (batch, probs)
                collect()
        finally:
            self._memo = None               # the clean tables are large: kept for one sweep only
            bar.close()
        return out

    # -- reference and first-order methods ------------------------------------------------
    def run_naive(self, clean: CleanRecord, corrupt_item: "AVInputs", conditions: Sequence[Condition], *,
                  progress: bool = False) -> Float[torch.Tensor, "conditions options"]:
        """One full nnsight forward of the corrupted input per condition (the slow reference)."""
        import nnsight
        from tqdm.auto import tqdm

        item = on_device(self.model, corrupt_item)
        out = torch.zeros(len(conditions), len(self.options))
        for i, cond in enumerate(tqdm(conditions, desc="patched runs (naive)", leave=False,
                                      disable=not progress or len(conditions) < 2)):
            with torch.no_grad(), self.extra(item), self._ablation(item), self.model.trace(item, use_cache=False):
                if cond.positions.numel():
                    index = torch.searchsorted(clean.positions, cond.positions)
                    for layer in cond.layers:
                        target = self._site_envoy(layer)
                        target[:, cond.positions] = clean.values[layer][index.to(clean.values[layer].device)]
                logits = nnsight.save(self.model.logits[0, -1])
            out[i] = self.probs(logits)
        return out

    def _site_envoy(self, layer: int) -> Any:
        view = self.model.layers[layer]
        if self.site == "resid_pre":
            return view.input
        if self.site == "resid_post":
            return view.output
        if self.site == "input_layernorm":
            return view.input_layernorm.output
        if self.site == "attn_output":
            return view.self_attn.output[0]
        return view.mlp.output

    def attribution(self, clean: CleanRecord, corrupt_item: "AVInputs", layers: Sequence[int],
                    clean_answer: int | None = None, corrupt_answer: int | None = None) -> dict[str, Any]:
        """First-order effects per (layer, clean-cached position) from one corrupted forward + backward.

        Returns ``probs`` (the corrupted run's letter probabilities) and ``clean`` / ``corrupt``:
        ``[layer, position]`` contributions to IE_clean / IE_corrupt (rows follow ``layers``,
        columns ``clean.positions``).
        """
        layers = sorted(set(layers))
        acts: dict[int, torch.Tensor] = {}

        def keep(layer: int, t: torch.Tensor) -> None:
            acts[layer] = t
        # The encoders run without a graph; one is recorded from the layer-0 input on.
        with self._observe(layers, keep), gradients_from(self.model, 0):
            with torch.no_grad():
                logits = self._forward(corrupt_item)
            with torch.enable_grad():
                probs = letter_probs(logits, self.token_ids)
                k_clean = int(clean.probs.argmax()) if clean_answer is None else clean_answer
                k_corr = int(probs.detach().argmax()) if corrupt_answer is None else corrupt_answer
                tensors = [acts[l] for l in layers]
                g_clean = torch.autograd.grad(probs[k_clean], tensors, retain_graph=True, allow_unused=True)
                g_corr = torch.autograd.grad(probs[k_corr], tensors, allow_unused=True)
        index = clean.positions
        rows_clean, rows_corr = [], []
        for layer, gc, gx in zip(layers, g_clean, g_corr):
            a = acts[layer].detach()[0, index.to(acts[layer].device)].float()
            diff = clean.values[layer].float() - a
            zero = torch.zeros(index.numel(), device=diff.device)
            rows_clean.append((diff * gc[0, index.to(gc.device)].float()).sum(-1) if gc is not None else zero)
            rows_corr.append(-(diff * gx[0, index.to(gx.device)].float()).sum(-1) if gx is not None else zero)
        return {"probs": self.probs(logits.detach()), "clean": torch.stack(rows_clean).cpu(),
                "corrupt": torch.stack(rows_corr).cpu(), "layers": layers, "k_clean": k_clean, "k_corrupt": k_corr}
