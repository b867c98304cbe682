"""KV caches of partial forwards: record one run of the decoder layers, resume it from any layer and position.

A sweep of forwards that each differ from one recorded run only from layer ``l`` and position
``p`` on (the patched runs of causal tracing) need not recompute what they share with it:

- `recording` keeps, around one full forward, each layer's keyword arguments, its input at
  chosen layers, its post-rotary keys/values (`KVRecorder` stands in for the model's KV cache)
  and what the model adds between a layer's output and the next layer's input (`LayerRecord`);
- `resume` runs the layers from ``start`` on for some query positions only, over the recorded
  keyword arguments cut to those positions: a contiguous suffix ``p0..T-1`` attends to the
  recorded keys/values of ``< p0`` through `PrefixKV`; scattered positions get every other
  position's keys/values from given tables through `ScatterKV`.

The hook runtime (`interventions.runtime.hooks`) maps positions to rows through these caches:
the cache length (``get_seq_length``) for a suffix, `query_positions` for scattered rows, so
interventions (e.g. a `Patch`) edit the right rows of a resumed forward. `Decoder`
(`interventions.runtime.decoder`) keeps the model's own cache for generation; these classes
serve single forwards and keep nothing between them.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from nnsight_av.batching import to_device
from nnsight_av.errors import InputError

__all__ = ["KVRecorder", "PrefixKV", "ScatterKV", "pad_rows", "LayerRecord", "LayerRecorder", "recording", "cache_in_layers",
           "resume", "query_positions", "first_output", "removing"]


def first_output(out: Any) -> torch.Tensor:
    """A decoder layer's hidden states from its output (the first element of a tuple)."""
    return out[0] if isinstance(out, (tuple, list)) else out


class KVRecorder:
    """Stands in for a KV cache in one forward: keeps each layer's keys/values, changes nothing."""

    def __init__(self) -> None:
        self.keys: dict[Any, torch.Tensor] = {}
        self.values: dict[Any, torch.Tensor] = {}

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: Any, *args: Any, **kwargs: Any):
        self.keys[layer_idx], self.values[layer_idx] = key_states, value_states
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


class PrefixKV:
    """A read-only KV cache serving recorded keys/values of positions ``< p0`` to a forward of positions ``>= p0``."""

    def __init__(self, keys: Mapping[Any, torch.Tensor], values: Mapping[Any, torch.Tensor], p0: int) -> None:
        self.keys, self.values, self.p0 = keys, values, p0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: Any, *args: Any, **kwargs: Any):
        if self.p0 == 0:
            return key_states, value_states
        batch = key_states.shape[0]
        pk = self.keys[layer_idx][:, :, : self.p0].expand(batch, -1, -1, -1)
        pv = self.values[layer_idx][:, :, : self.p0].expand(batch, -1, -1, -1)
        return torch.cat([pk, key_states], dim=2), torch.cat([pv, value_states], dim=2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.p0


class ScatterKV:
    """Keys/values of a forward that computes only some query positions (all ``>= p0``) of each batch row.

    ``rows``: the positions computed, sorted: a 1-D tensor (a batch of one), or ``[B, n]`` with
    one row per batch row, a row with fewer positions padded at its end with the sentinel
    ``T`` (the sequence length; `pad_rows` builds it). Positions before ``p0`` (an int, or one
    per batch row) take ``prefix_keys`` / ``prefix_values``, the other positions not computed
    take ``fill_keys`` / ``fill_values`` (full-length tables ``[1, kv, T, d]``), and the computed
    ones this call's keys/values. Padded rows write theirs to one extra slot ``T`` that only
    they attend to (`resume`'s mask), so a batch of conditions of different sizes runs in one
    forward. `query_positions` tells the hook runtime which position each row is.
    """

    def __init__(self, fill_keys: Mapping[Any, torch.Tensor], fill_values: Mapping[Any, torch.Tensor],
                 prefix_keys: Mapping[Any, torch.Tensor], prefix_values: Mapping[Any, torch.Tensor],
                 p0: int | Sequence[int], rows: torch.Tensor) -> None:
        self.fill_keys, self.fill_values = fill_keys, fill_values
        self.prefix_keys, self.prefix_values = prefix_keys, prefix_values
        table = next(iter(fill_keys.values()))
        host = (rows if rows.dim() == 2 else rows[None]).cpu()   # pass host rows: on the GPU this waits for it
        batch, length = host.shape[0], int(table.shape[2])
        self.p0s = [int(p0)] * batch if isinstance(p0, int) else [int(p) for p in p0]
        if len(self.p0s) != batch:
            raise InputError(f"ScatterKV got {len(self.p0s)} p0 values for {batch} batch rows")
        self.p0 = min(self.p0s)
        self.padded = bool((host == length).any())
        positions = [r[r < length] for r in host]
        # a batch of one keeps the plain tensor (what `ApplyContext` maps rows with); several: one per row
        self.query_positions = positions[0] if rows.dim() == 1 else positions
        self.rows = to_device(host, table.device)
        self._before = (torch.arange(length, device=table.device)[None, :]
                        < to_device(torch.tensor(self.p0s), table.device)[:, None])[:, None, :, None]

    def _fill(self, fill: torch.Tensor, prefix: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        batch, heads, _, dim = new.shape
        length = fill.shape[2]
        full = torch.where(self._before, prefix[:, :, :length], fill)        # a new [B, kv, T, d] tensor
        if self.padded:        # the padded rows' slot: written by them, read by no real row
            full = torch.cat([full, full.new_zeros(batch, heads, 1, dim)], dim=2)
        return full.scatter_(2, self.rows[:, None, :, None].expand(-1, heads, -1, dim), new)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: Any, *args: Any, **kwargs: Any):
        keys = self._fill(self.fill_keys[layer_idx], self.prefix_keys[layer_idx], key_states)
        values = self._fill(self.fill_values[layer_idx], self.prefix_values[layer_idx], value_states)
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.p0


def pad_rows(rows: Sequence[torch.Tensor], length: int) -> torch.Tensor:
    """Per-row sorted positions as one ``[B, n]`` tensor, shorter rows padded with ``length`` (`ScatterKV`'s sentinel).

    >>> pad_rows([torch.tensor([3, 5]), torch.tensor([4])], 6)
    tensor([[3, 5],
            [4, 6]])
    """
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), length, dtype=torch.long, device=rows[0].device)
    for b, r in enumerate(rows):
        out[b, : len(r)] = r
    return out


def query_positions(kwargs: Mapping[str, Any]) -> torch.Tensor | list[torch.Tensor] | None:
    """The positions of a decoder layer call's rows when they are scattered (a `ScatterKV` call), else None:
    a tensor for a batch of one, a list of one tensor per batch row (without padding) for several."""
    return getattr(kwargs.get("past_key_values"), "query_positions", None)


@contextmanager
def removing(handles: list) -> Iterator[None]:
    """Within the block, the hooks of ``handles`` stay registered; they are removed when it ends."""
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def cache_in_layers(layers: Sequence[torch.nn.Module], cache: Any) -> Iterator[None]:
    """Within the block, every decoder layer's attention gets ``cache`` as its KV cache."""
    def pre(mod, args, kwargs):
        return args, {**kwargs, "past_key_values": cache}

    with removing([layer.register_forward_pre_hook(pre, with_kwargs=True) for layer in layers]):
        yield


@dataclass
class LayerRecord:
    """One recorded run of the decoder layers, enough to `resume` it from any layer and position."""

    length: int
    resid: dict[int, torch.Tensor]                    # layer -> input of that layer [1, T, hidden]
    keys: dict[Any, torch.Tensor]                     # attention layer_idx -> post-rotary keys [1, kv, T, d]
    values: dict[Any, torch.Tensor]
    kwargs: list[dict[str, Any]]                      # keyword arguments the model passed to each layer
    deltas: list[torch.Tensor | None]                 # input(l + 1) - output(l), when the model adds something


class LayerRecorder:
    """Hooks of `recording`: what each decoder layer received and returned in the forwards of the block.

    A layer's input is read before any pre-hook registered earlier (those re-run when the layer
    is resumed), its output after every forward hook (it is what the next layer received).
    """

    def __init__(self, layers: Sequence[torch.nn.Module], starts: Sequence[int] | None = None) -> None:
        self.layers = list(layers)
        self.starts = set(range(len(self.layers)) if starts is None else starts)
        self.kv = KVRecorder()
        self.resid: dict[int, torch.Tensor] = {}
        self.kwargs: list[dict[str, Any]] = [{} for _ in self.layers]
        self.inputs: dict[int, torch.Tensor] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def hooks(self) -> list[Any]:
        handles = []
        for i, layer in enumerate(self.layers):
            def pre(mod, args, kwargs, i=i):
                hidden = args[0] if args else kwargs["hidden_states"]
                self.inputs[i] = hidden
                if i in self.starts:
                    self.resid[i] = hidden
                self.kwargs[i] = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values")}
                return args, {**kwargs, "past_key_values": self.kv}

            def post(mod, args, out, i=i):
                self.outputs[i] = first_output(out)
            handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True, prepend=True))
            handles.append(layer.register_forward_hook(post))
        return handles

    def used_every_layer(self) -> bool:
        """Whether the attention of every layer used the recorder's cache slot."""
        return len(self.kv.keys) == len(self.layers)

    def record(self, length: int, deltas: bool = True) -> LayerRecord:
        """The `LayerRecord` of the last forward; ``deltas=False`` for a forward stopped inside the stack."""
        if not self.used_every_layer():
            raise InputError(f"the model's attention did not use the cache slot in every layer "
                             f"({len(self.kv.keys)} of {len(self.layers)}); use method='naive' for this model")
        found: list[torch.Tensor | None] = []
        for i in range(len(self.layers)):
            nxt = self.inputs.get(i + 1)
            if not deltas or nxt is None or nxt is self.outputs.get(i):
                found.append(None)
                continue
            delta = nxt - self.outputs[i]
            found.append(delta if bool(delta.abs().max() > 0) else None)
        return LayerRecord(length, dict(self.resid), self.kv.keys, self.kv.values, list(self.kwargs), found)


@contextmanager
def recording(layers: Sequence[torch.nn.Module], starts: Sequence[int] | None = None) -> Iterator[LayerRecorder]:
    """Within the block, record the decoder ``layers`` (inputs at ``starts``, default all) for `resume`.

    Each forward overwrites what the one before it left. Register it after hooks that should re-run when a layer is resumed, before hooks whose edit
    of a layer's input belongs to the recorded input (they must run first).
    """
    recorder = LayerRecorder(layers, starts)
    with removing(recorder.hooks()):
        yield recorder


def _suffix_mask(recorded: Any, length: int, p0: int, attn_impl: str, like: torch.Tensor) -> Any:
    """The attention mask of queries ``p0..length-1`` over keys ``0..length-1`` (causal)."""
    if torch.is_tensor(recorded) and recorded.dim() == 4:
        return recorded[:, :, p0:, :]
    if p0 == 0:
        return recorded
    n, total = length - p0, length
    if attn_impl.startswith("flash"):
        return None  # flash attention aligns the causal mask bottom-right when queries < keys
    if attn_impl == "sdpa":
        try:
            from torch.nn.attention.bias import causal_lower_right

            return causal_lower_right(n, total)
        except ImportError:  # pragma: no cover - older torch
            pass
    allowed = torch.arange(total, device=like.device)[None, :] <= (p0 + torch.arange(n, device=like.device))[:, None]
    mask = torch.zeros(n, total, dtype=like.dtype, device=like.device)
    return mask.masked_fill(~allowed, torch.finfo(like.dtype).min)[None, None]


def _rows_mask(recorded: Any, length: int, rows: torch.Tensor, padded: bool, attn_impl: str,
               like: torch.Tensor) -> Any:
    """The causal attention mask ``[B, 1, n, keys]`` of the query positions ``rows`` (``[B, n]``, `ScatterKV`'s).

    Keys are ``0..length-1``, plus the padded rows' slot ``length`` when some row is ``padded``:
    a real row never sees it, a padded row sees it (so its softmax has a key).
    """
    if torch.is_tensor(recorded) and recorded.dim() == 4:
        batch, n = rows.shape
        picked = recorded[:1].index_select(2, rows.clamp(max=length - 1).flatten())      # [1, h, B*n, T]
        mask = picked.unflatten(2, (batch, n)).squeeze(0).transpose(0, 1)               # [B, h, n, T]
        if not padded:
            return mask
        pad = (rows == length)[:, None, :, None]
        extra = pad if mask.dtype == torch.bool else \
            torch.zeros(pad.shape, dtype=mask.dtype, device=mask.device).masked_fill(~pad, torch.finfo(mask.dtype).min)
        return torch.cat([mask, extra.expand(-1, mask.shape[1], -1, -1)], dim=-1)
    keys = length + 1 if padded else length
    allowed = torch.arange(keys, device=rows.device)[None, None, :] <= rows[:, :, None]
    if attn_impl == "sdpa":
        return allowed[:, None]
    return torch.zeros(allowed.shape, dtype=like.dtype, device=rows.device).masked_fill(
        ~allowed, torch.finfo(like.dtype).min)[:, None]


def _take_rows(value: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """``value``'s entries at ``index`` (``[B, n]``) along ``dim``, its batch axis of one (the axis before ``dim``)
    becoming ``B``; a value without a batch axis (``dim`` 0) takes the first row's positions."""
    dim = dim % value.dim()
    if dim == 0:                                      # no batch axis (e.g. cache_position)
        return value.index_select(0, index[0])
    picked = value.index_select(dim, index.flatten()).unflatten(dim, tuple(index.shape))
    return picked.squeeze(dim - 1) if dim > 0 and value.shape[dim - 1] == 1 else picked.flatten(dim - 1, dim)


def _cut_kwargs(recorded: Mapping[str, Any], length: int, take: Callable[[torch.Tensor, int], torch.Tensor],
                mask: Any, cache: Any) -> dict[str, Any]:
    """A layer's recorded keyword arguments with position-indexed tensors cut by ``take(tensor, dim)``."""
    kw: dict[str, Any] = {}
    for key, value in recorded.items():
        if key == "attention_mask":
            kw[key] = mask
        elif key == "position_embeddings" and isinstance(value, (tuple, list)):
            kw[key] = tuple(take(v, -2) if torch.is_tensor(v) and v.dim() >= 2 and v.shape[-2] == length else v
                            for v in value)
        elif torch.is_tensor(value) and (key.endswith("position_ids") or key == "cache_position") \
                and value.shape[-1] == length:
            kw[key] = take(value, -1)
        else:
            kw[key] = value
    kw["past_key_values"] = cache
    return kw


def resume(layers: Sequence[torch.nn.Module], record: Any, start: int, hidden: torch.Tensor, cache: Any, *,
           attn_impl: str, p0: int | None = None, rows: torch.Tensor | None = None,
           stop: int | None = None) -> torch.Tensor:
    """Run decoder layers ``start..stop-1`` (default: to the last) for some query positions of a recorded run.

    ``record``: a `LayerRecord` (or anything with its ``length``, ``kwargs`` and ``deltas``).
    ``hidden``: the input of layer ``start`` at the computed positions, ``[B, n, hidden]``:
    either the suffix ``p0..T-1`` (pass ``p0``; ``cache`` a `PrefixKV`) or scattered positions
    ``rows`` (``cache`` a `ScatterKV` with the same ``rows``): a 1-D sorted tensor, or ``[B, n]``
    with one row of positions per batch row (padded with ``T``, `pad_rows`; the padded rows'
    outputs are meaningless), best on the host (on the GPU, reading them waits for it). Forward hooks on the layers run as
    in a full forward. Returns the last layer's output at those positions.
    """
    if (p0 is None) == (rows is None):
        raise InputError("resume needs either p0 (a contiguous suffix) or rows (scattered positions)")
    length = record.length
    stop = len(layers) if stop is None else stop
    if rows is not None:
        host = (rows if rows.dim() == 2 else rows[None]).cpu()
        padded = bool((host == length).any())
        rows = to_device(host, hidden.device)
        index = rows.clamp(max=length - 1)            # padded rows read the last position's inputs
    shared_mask = None
    for layer in range(start, stop):
        recorded = record.kwargs[layer]
        if rows is None:
            mask = _suffix_mask(recorded.get("attention_mask"), length, p0, attn_impl, hidden)
            kw = _cut_kwargs(recorded, length, lambda v, dim: v.narrow(dim, p0, length - p0), mask, cache)
        else:
            mask = recorded.get("attention_mask")
            if not (torch.is_tensor(mask) and mask.dim() == 4):
                # the same causal mask at every layer: build it once
                shared_mask = _rows_mask(None, length, rows, padded, attn_impl, hidden) if shared_mask is None \
                    else shared_mask
                mask = shared_mask
            else:
                mask = _rows_mask(mask, length, rows, padded, attn_impl, hidden)
            kw = _cut_kwargs(recorded, length, lambda v, dim: _take_rows(v, dim, index), mask, cache)
        hidden = first_output(layers[layer](hidden, **kw))
        delta = record.deltas[layer]
        if delta is not None:
            hidden = hidden + (delta[:, p0:] if rows is None else _take_rows(delta, -2, index))
    return hidden
