"""Per-invoke state of one ``apply``: which input, its padding, the cache length at each layer.

``apply(model, inputs=None)`` finds the invoke it runs in through nnsight's running
worker (its batch group); from that it knows the invoke's index, its `AVInputs` (when
``inputs`` is not given) and how far batching shifted its positions (left padding in
batched generation). Positions are converted between the input's own coordinates and
rows of the tensors the model produces at each layer, which during generation with a KV
cache hold only the new tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import torch

from nnsight_av.batching import to_device
from nnsight_av.errors import InputError
from nnsight_av.inputs import AVInputs
from nnsight_av.spans import MODALITIES

from .selectors import normalize_selector, resolve_tokens

if TYPE_CHECKING:
    from nnsight_av.model import AVModel

__all__ = ["ApplyContext", "current_invoke", "MODALITIES"]


def _mediator() -> Any:
    try:
        from greenlet import getcurrent
    except ImportError:  # pragma: no cover - nnsight depends on greenlet
        return None
    ref = getattr(getcurrent(), "mediator", None)
    return ref() if ref is not None else None


def current_invoke(model: "AVModel") -> tuple[int | None, list[Any]]:
    """``(index, inputs_of_every_invoke)`` of the invoke whose code is running now.

    ``index`` is ``None`` outside a trace, or when nnsight's internals do not tell.
    """
    mediator = _mediator()
    if mediator is None:
        raise InputError("apply() must be called inside a trace: `with model.trace(ex): iv.apply(model)` "
                         "(or use interventions.run / generate)")
    interleaver = getattr(mediator, "interleaver", None)
    batcher = getattr(interleaver, "batcher", None)
    group = getattr(mediator, "batch_group", None)
    if batcher is None:
        return (0 if group is None else None), []
    invokes = list(getattr(batcher, "invokes", []))
    inputs = [inv[0][0] if inv and inv[0] else None for inv in invokes]
    if group is None:
        return None, inputs
    start, row = group[0], 0
    for index, (args, kwargs) in enumerate(invokes):
        if row == start:
            return index, inputs
        row += model._batch_size(*args, **kwargs)
    return None, inputs


def visit_stamp(location: str) -> tuple[int, int] | None:
    """An id of the model's current visit to ``location``: the same for every invoke served there."""
    mediator = _mediator()
    interleaver = getattr(mediator, "interleaver", None)
    counts = getattr(interleaver, "counts", None)
    if counts is None:
        return None
    return id(interleaver), int(counts.get(location, 0))


class ApplyContext:
    """State of one ``apply`` call in one invoke (see module docstring)."""

    def __init__(self, model: "AVModel", inputs: AVInputs | None = None, sets: Mapping[str, Any] | None = None, *,
                 invoke: tuple[int | None, list[Any]] | None = None, offset: int | None = None) -> None:
        """``invoke``: ``(index, inputs_of_every_row)`` when not running inside an nnsight invoke (the
        hook runtime); ``offset``: the input's padding shift (default: from the model's last batch)."""
        self.model = model
        index, all_inputs = current_invoke(model) if invoke is None else invoke
        if inputs is None:
            if index is None or index >= len(all_inputs) or not isinstance(all_inputs[index], AVInputs):
                raise InputError("apply() could not find this invoke's AVInputs: pass them, iv.apply(model, ex)")
            inputs = all_inputs[index]
        if not isinstance(inputs, AVInputs):
            raise InputError(f"apply() needs the invoke's AVInputs (from model.prepare), got {type(inputs).__name__}")
        running = all_inputs[index] if index is not None and index < len(all_inputs) else None
        if isinstance(running, AVInputs) and len(running) != len(inputs):
            raise InputError(f"apply() was given inputs of {len(inputs)} tokens, but this invoke runs an input of "
                             f"{len(running)} tokens: pass the invoke's own AVInputs (or none)")
        self.inputs = inputs
        self.spans = inputs.spans
        self.length = len(inputs)
        self.index = index
        self.all_inputs = all_inputs
        offsets = model.padding_offsets
        if offset is not None:
            self.offset = int(offset)
        else:
            self.offset = offsets[index] if index is not None and index < len(offsets) and \
                len(offsets) == len(all_inputs) else 0
        self.sets = dict(sets or {})
        self.layer: int | None = None
        self.past = 0          # tokens in the KV cache before this forward (padded coordinates)
        self.present = 0       # rows in this forward's tensors
        self.stamp: Any = None  # id of the model's visit to the current layer (same for every invoke)
        self.query: torch.Tensor | None = None  # positions (padded) of this forward's rows, when scattered
        self._resolved: dict[Any, torch.Tensor] = {}
        self._device: dict[Any, torch.Tensor] = {}
        self.memo: dict[Any, Any] = {}

    # -- per layer -------------------------------------------------------------------------
    def enter_layer(self, layer: int, past: int, present: int, stamp: Any = None,
                    query: torch.Tensor | None = None) -> None:
        """``query``: the (padded) positions of this forward's rows when they are not ``past..past+present-1``
        (a forward that computes scattered positions over a cache, `interventions.runtime.kv_cache.ScatterKV`)."""
        self.layer, self.past, self.present, self.stamp, self.query = layer, int(past), int(present), stamp, query

    @property
    def total(self) -> int:
        """The current sequence length in the input's own coordinates (prompt + generated so far)."""
        if self.query is not None and len(self.query):
            return max(int(self.query[-1]) + 1 - self.offset, self.length)
        if self.past == 0:
            return self.length  # prefill; right padding beyond the input is not part of it
        return self.past + self.present - self.offset

    @property
    def generating(self) -> bool:
        return self.past > 0

    # -- selections --------------------------------------------------------------------------
    def positions(self, selector: Any, sets: Mapping[str, Any] | None = None, allow_empty: bool = False,
                  ) -> torch.Tensor:
        """Unpadded positions ``selector`` names at the current step (CPU LongTensor, sorted)."""
        selector = normalize_selector(selector)
        key = (selector, id(sets), self.total, allow_empty)
        if key not in self._resolved:
            merged = {**(sets or {}), **self.sets}
            self._resolved[key] = resolve_tokens(selector, self.spans, self.length, self.total, merged, allow_empty)
        return self._resolved[key]

    def rows(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows, positions)``: rows of this forward's tensors holding ``positions`` (those present)."""
        key = ("rows", id(positions), self.past, self.present, id(self.query))
        if key not in self._resolved:
            if self.query is not None:
                padded = positions + self.offset
                rows = torch.searchsorted(self.query, padded).clamp(max=max(len(self.query) - 1, 0))
                keep = (self.query[rows] == padded) if len(self.query) else torch.zeros_like(padded, dtype=torch.bool)
            else:
                rows = positions + self.offset - self.past
                keep = (rows >= 0) & (rows < self.present)
            if self.past == 0:
                keep &= positions < self.length
            # keep `positions` alive with the entry, so its id is not reused while cached
            self._resolved[key] = (rows[keep], positions[keep], positions)
        rows, present, _ = self._resolved[key]
        return rows, present

    def keys(self, positions: torch.Tensor) -> torch.Tensor:
        """Key-column indices (cache included) of ``positions``."""
        key = ("keys", id(positions))
        if key not in self._resolved:
            self._resolved[key] = (positions + self.offset, positions)
        return self._resolved[key][0]

    def to(self, tensor: torch.Tensor, device: torch.device, tag: Any = None) -> torch.Tensor:
        """``tensor`` on ``device``, cached per call so a selection crosses to the GPU once."""
        if tensor.device == device:
            return tensor
        key = (tag, id(tensor), device) if tag is None else (tag, device)
        if key not in self._device:
            self._device[key] = (tensor, to_device(tensor, device))
        return self._device[key][1]

    def modality_ids(self, positions: torch.Tensor) -> torch.Tensor:
        """Index into `MODALITIES` of each position (generated tokens are text)."""
        if not hasattr(self, "_modality_table"):
            table = torch.full((self.length,), MODALITIES.index("text"), dtype=torch.long)
            for name in ("audio", "video", "image"):
                span = getattr(self.spans, name)
                if len(span):
                    table[span] = MODALITIES.index(name)
            self._modality_table = table
        ids = torch.full_like(positions, MODALITIES.index("text"))
        inside = positions < self.length
        ids[inside] = self._modality_table[positions[inside]]
        return ids
