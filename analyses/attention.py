"""Exact attention paid to a few key columns, without full attention maps.

The probability that query ``q`` of head ``h`` puts on key ``s`` is
``exp(scale * q_h . k_s - lse_h(q))``, where ``lse_h(q)`` is the log-sum-exp of the
scaled logits of row ``q`` over every key it may see. So the attention to a set of
columns ``S`` needs only the post-rotary queries, the keys of ``S`` and one number per
query row (the normaliser). The normaliser comes from the attention kernel itself: in one
prefill (`interventions.runtime.prefill.run_prefill`), the model's attention call at each
layer is served by a flash / memory-efficient kernel that returns its log-sum-exp next to
its output (same causal attention, so later layers see the same values to kernel precision),
and the column attention is computed from ``q``, ``k`` and ``lse`` while the forward runs.
Nothing of size ``T x T`` is ever stored.

Two ways to read the result:

- `column_attention`: the probabilities ``[layer, heads, rows, columns]`` for chosen
  query rows (e.g. the last row, for decoding analyses);
- `column_attention_sums`: per layer and column, the attention summed over heads and
  over the query rows of each row group (``"video"``, ``"audio"``, ...) that come after
  the column; a streaming aggregate in ``O(T)`` memory, fused into a Triton kernel on GPUs.

This module is the model-level API. The tensor math lives in `interventions.attention_math`
(`attention_with_lse`, `attention_lse`) and `analyses.column_math` (`column_sums`,
`column_probs`), the prefill in `interventions.runtime.prefill`, the input helpers in
`nnsight_av.batching`; their public names are importable from here as well.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
from jaxtyping import Float, Int

from interventions.attention_math import attention_lse, attention_with_lse
from interventions.runtime.prefill import AttentionFn, ResidualFn, read_attention, run_prefill
from nnsight_av.batching import as_list, batch_tensors, check_layers, per_item, positions_of, progress_batches
from nnsight_av.errors import InputError, TokenSelectionError

from .column_math import LOG2E, MAX_TRITON_GROUPS, TRITON_CONFIG, TRITON_CONFIG_WIDE, column_probs, column_sums

if TYPE_CHECKING:
    from nnsight_av import AVInputs, AVModel

__all__ = [
    "column_attention", "column_attention_sums", "ColumnSums", "row_group_ids", "group_counts",
    # re-exported from the modules the tensor math, the prefill and the helpers moved to
    "attention_with_lse", "attention_lse", "column_sums", "column_probs", "run_prefill", "read_attention",
    "ResidualFn", "AttentionFn", "as_list", "progress_batches", "batch_tensors", "LOG2E", "TRITON_CONFIG",
    "TRITON_CONFIG_WIDE", "MAX_TRITON_GROUPS",
]


def column_attention(
    model: "AVModel",
    inputs: "AVInputs | Sequence[AVInputs]",
    columns: Any,
    layers: Sequence[int] | None = None,
    query_rows: Any = None,
    *,
    fuse: bool | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> Float[torch.Tensor, "layer heads rows columns"] | list[torch.Tensor]:
    """Exact attention from ``query_rows`` (default: every row) to ``columns``, per layer and head.

    ``columns`` / ``query_rows``: positions (list or LongTensor) or a span name; for a list
    of inputs, one shared spec or a list with one per input. Entries where the causal
    mask hides the column are 0. Memory is ``layers x heads x rows x columns``: select
    rows for long inputs, or use `column_attention_sums` for aggregates.

    >>> import nnsight_av as nav
    >>> model = nav.testing.tiny_model()
    >>> ex = model.prepare(audio=nav.testing.synthetic_tone(1.0), text="What is making the sound?")
    >>> column_attention(model, ex, [0, 1], layers=[0, 3], query_rows=[len(ex) - 1]).shape
    torch.Size([2, 4, 1, 2])
    """
    items, single = as_list(inputs)
    layer_list = check_layers(model, layers)
    col_specs = per_item(columns, items, single)
    row_specs = per_item(query_rows, items, single)
    cols = [positions_of(c, it, "column") for c, it in zip(col_specs, items)]
    rows = [torch.arange(len(it)) if r is None else positions_of(r, it, "query row") for r, it in zip(row_specs, items)]
    results: list[torch.Tensor] = []
    index = 0
    for chunk in progress_batches(items, batch_size, progress, "column attention"):
        chunk_cols, chunk_rows = cols[index:index + len(chunk)], rows[index:index + len(chunk)]

        def on_attention(layer: int, q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scale: float,
                         chunk_cols=chunk_cols, chunk_rows=chunk_rows) -> list[torch.Tensor]:
            return [column_probs(q[i:i + 1], k[i:i + 1], lse[i:i + 1], c.to(q.device), r.to(q.device), scale)[0].cpu()
                    for i, (c, r) in enumerate(zip(chunk_cols, chunk_rows))]

        _, found = run_prefill(model, chunk, attention_layers=layer_list, on_attention=on_attention, fuse=fuse)
        for i in range(len(chunk)):
            results.append(torch.stack([found[l][i] for l in layer_list]))
        index += len(chunk)
    return results[0] if single else results


@dataclass
class ColumnSums:
    """Attention to ``columns`` summed over heads and over each row group's later rows, per layer.

    ``sums[l, g, j]``: sum over heads and rows ``q`` of group ``g`` with ``q > columns[j]``
    (``>=`` when not ``strict``) of ``A_l[h, q, columns[j]]``; ``counts[g, j]``: how many
    such rows. `mean` divides by ``num_heads * counts`` (0 where there is no such row).
    """

    layers: list[int]
    columns: Int[torch.Tensor, "columns"]
    groups: list[str]
    sums: Float[torch.Tensor, "layer groups columns"]
    counts: Int[torch.Tensor, "groups columns"]
    num_heads: int
    strict: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def mean(self) -> Float[torch.Tensor, "layer groups columns"]:
        denom = (self.counts * self.num_heads).to(self.sums.dtype)
        return torch.where(denom > 0, self.sums / denom.clamp(min=1), torch.zeros_like(self.sums))

    def group(self, name: str) -> Float[torch.Tensor, "layer columns"]:
        """The mean attention of one group, ``[layer, column]``."""
        if name not in self.groups:
            raise InputError(f"unknown row group {name!r}; this result has {self.groups}")
        return self.mean()[:, self.groups.index(name)]


def row_group_ids(item: "AVInputs", groups: Mapping[str, Any]) -> torch.Tensor:
    """Per position of ``item``, the index of the group in ``groups`` it belongs to (-1: none)."""
    ids = torch.full((len(item),), -1, dtype=torch.long)
    for g, (name, spec) in enumerate(groups.items()):
        pos = positions_of(spec if spec is not None else name, item, f"row group {name!r}")
        taken = ids[pos] >= 0
        if bool(taken.any()):
            raise TokenSelectionError(f"row groups overlap at positions {pos[taken].tolist()[:8]}")
        ids[pos] = g
    return ids


def group_counts(group_ids: torch.Tensor, num_groups: int, columns: torch.Tensor, strict: bool) -> torch.Tensor:
    """``counts[g, j]`` = rows of group ``g`` after (or at, if not strict) ``columns[j]``."""
    counts = torch.zeros(num_groups, columns.numel(), dtype=torch.long)
    for g in range(num_groups):
        rows = torch.nonzero(group_ids == g).flatten()
        if rows.numel() == 0 or columns.numel() == 0:
            continue
        before = torch.searchsorted(rows, columns, right=strict)
        counts[g] = rows.numel() - before
    return counts


def column_attention_sums(
    model: "AVModel",
    inputs: "AVInputs | Sequence[AVInputs]",
    columns: Any,
    row_groups: Sequence[str] | Mapping[str, Any] = ("video", "audio"),
    layers: Sequence[int] | None = None,
    *,
    strict: bool = True,
    fuse: bool | None = None,
    backend: str = "auto",
    batch_size: int = 1,
    progress: bool = True,
) -> ColumnSums | list[ColumnSums]:
    """Per layer, the attention each row group pays to each column, summed over heads and later rows.

    ``row_groups``: span names (``("video", "audio")``) or a mapping name -> positions /
    span name; at most 16 groups use the fused GPU kernel. ``strict``: count only rows
    strictly after the column (the MDS definition). One prefill per batch; memory is
    ``O(T)`` per layer on top of the forward.

    >>> import nnsight_av as nav
    >>> model = nav.testing.tiny_model()
    >>> ex = model.prepare(video=nav.testing.synthetic_frames(2.0, 2, 56), audio=nav.testing.synthetic_tone(2.0),
    ...                    text="What is making the sound?")
    >>> res = column_attention_sums(model, ex, ex.spans.video[:3])
    >>> res.sums.shape, res.groups
    (torch.Size([4, 2, 3]), ['video', 'audio'])
    """
    items, single = as_list(inputs)
    layer_list = check_layers(model, layers)
    groups = dict(row_groups) if isinstance(row_groups, Mapping) else {name: name for name in row_groups}
    if not groups:
        raise InputError("row_groups is empty")
    col_specs = per_item(columns, items, single)
    cols = [positions_of(c, it, "column") for c, it in zip(col_specs, items)]
    gids = [row_group_ids(it, groups) for it in items]
    results: list[ColumnSums] = []
    index = 0
    for chunk in progress_batches(items, batch_size, progress, "column attention"):
        c_list, g_list = cols[index:index + len(chunk)], gids[index:index + len(chunk)]
        col_batch, grp_batch = batch_tensors(chunk, c_list, -1), batch_tensors(chunk, g_list, -1)
        cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

        def on_attention(layer: int, q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scale: float,
                         col_batch=col_batch, grp_batch=grp_batch, cache=cache) -> torch.Tensor:
            if q.device not in cache:        # one copy per device (device_map="auto" spreads the layers)
                cache[q.device] = (col_batch.to(device=q.device, dtype=torch.int32),
                                   grp_batch.to(device=q.device, dtype=torch.int32))
            cols_dev, grp_dev = cache[q.device]
            sums = column_sums(q, k, lse, cols_dev, grp_dev, len(groups), scale, strict, backend, validate=False)
            return sums.sum(1)

        _, found = run_prefill(model, chunk, attention_layers=layer_list, on_attention=on_attention, fuse=fuse)
        for i, item in enumerate(chunk):
            n = c_list[i].numel()
            sums = torch.stack([found[l][i, :, :n].cpu() for l in layer_list])
            results.append(ColumnSums(layer_list, c_list[i], list(groups), sums,
                                      group_counts(g_list[i], len(groups), c_list[i], strict), model.num_heads,
                                      strict))
        index += len(chunk)
    return results[0] if single else results
