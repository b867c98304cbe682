"""Attention to a few key columns from q, k and the row normalisers: the tensor math behind `analyses.attention`.

``probs = exp(scale * q_h . k_s - lse_h(q))`` needs only the post-rotary queries, the keys of
the chosen columns and one log-sum-exp per query row (from `interventions.attention_math`).

- `column_probs`: the probabilities ``[B, heads, rows, columns]`` of chosen rows;
- `column_sums`: per column, the attention summed over the query rows of each row group that
  come after it, fused into a Triton kernel on GPUs (`analyses._column_kernel`, tiles in
  `TRITON_CONFIG`) with a chunked torch path elsewhere.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float, Int

from interventions.attention_math import BLOCK_ELEMENTS, attention_lse, check_qk, grouped_logits  # noqa: F401  (lse: doctests)
from nnsight_av.errors import InputError, TokenSelectionError

__all__ = ["column_sums", "column_probs", "TRITON_CONFIG", "TRITON_CONFIG_WIDE", "MAX_TRITON_GROUPS", "LOG2E"]

LOG2E = 1.4426950408889634


def _prepare_columns(columns: torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    columns = torch.as_tensor(columns, device=device)
    if columns.dtype not in (torch.int32, torch.int64):
        columns = columns.long()
    if columns.dim() == 1:
        columns = columns[None].expand(batch, -1)
    if columns.dim() != 2 or columns.shape[0] != batch:
        raise InputError(f"columns must be [S] or [batch, S]; got {tuple(columns.shape)} for batch {batch}")
    return columns.contiguous()


def _prepare_groups(row_groups: torch.Tensor, batch: int, length: int, device: torch.device) -> torch.Tensor:
    row_groups = torch.as_tensor(row_groups, device=device)
    if row_groups.dtype not in (torch.int32, torch.int64):
        row_groups = row_groups.long()
    if row_groups.dim() == 1:
        row_groups = row_groups[None].expand(batch, -1)
    if tuple(row_groups.shape) != (batch, length):
        raise InputError(f"row_groups must be [T] or [batch, T] = [{batch}, {length}]; got {tuple(row_groups.shape)}")
    return row_groups.contiguous()


def _column_sums_torch(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, columns: torch.Tensor,
                       row_groups: torch.Tensor, num_groups: int, scale: float, strict: bool) -> torch.Tensor:
    b, h, t, d = q.shape
    kv = k.shape[1]
    group = h // kv
    s_count = columns.shape[1]
    out = torch.zeros(b, h, num_groups, s_count, dtype=torch.float32, device=q.device)
    for i in range(b):
        cols = columns[i]
        valid = cols >= 0
        if not bool(valid.any()):
            continue
        order = torch.argsort(torch.where(valid, cols, t), stable=True)
        cols_sorted = cols[order]
        n_valid = int(valid.sum())
        kept = order[:n_valid]
        cols_sorted = cols_sorted[:n_valid]
        k_cols = k[i][:, cols_sorted].float()                                   # [kv, S, d]
        rows = torch.nonzero((row_groups[i] >= 0) & (row_groups[i] < num_groups)).flatten()
        if rows.numel() == 0:
            continue
        onehot = torch.nn.functional.one_hot(row_groups[i, rows], num_groups).float()  # [R, G]
        chunk = max(1, BLOCK_ELEMENTS // max(1, h * n_valid))
        acc = torch.zeros(h, num_groups, n_valid, dtype=torch.float32, device=q.device)
        for r0 in range(0, rows.numel(), chunk):
            r = rows[r0:r0 + chunk]
            last = int(r[-1])
            # Columns are sorted: only those before the last row of this chunk can receive attention.
            n_cols = int(torch.searchsorted(cols_sorted, torch.tensor(last + (0 if strict else 1), device=q.device)))
            if n_cols == 0:
                continue
            qc = q[i][:, r].float().reshape(kv, group, r.numel(), d)
            logits = torch.einsum("kgcd,ksd->kgcs", qc, k_cols[:, :n_cols]).reshape(h, r.numel(), n_cols)
            probs = torch.exp(logits * scale - lse[i][:, r, None].float())
            keep = (r[:, None] > cols_sorted[None, :n_cols]) if strict else (r[:, None] >= cols_sorted[None, :n_cols])
            probs = probs * keep
            acc[:, :, :n_cols] += torch.einsum("hcs,cg->hgs", probs, onehot[r0:r0 + chunk])
        out[i][:, :, kept] = acc
    return out


def _triton_kernel() -> Any:
    """The fused Triton kernel (`analyses._column_kernel`), imported on first use."""
    from ._column_kernel import column_sums_kernel

    return column_sums_kernel


#: Tile sizes and options of the fused kernel (`analyses._column_kernel`) for head_dim <= 128
#: in half precision, and otherwise: ``fma_exp`` (half the exponentials on the FMA units),
#: ``trans_q`` (load query tiles row-major, transpose in registers), ``reverse`` (walk the
#: rows from the end), ``heads_first`` (launch order).
TRITON_CONFIG = {"block_s": 128, "block_q": 32, "num_warps": 4, "num_stages": 1, "fma_exp": 0,
                 "trans_q": 1, "reverse": 1, "heads_first": 1}  # best of a sweep on an H200 (docs/benchmarks.md)
TRITON_CONFIG_WIDE = {"block_s": 64, "block_q": 32, "num_warps": 4, "num_stages": 2, "fma_exp": 0, "trans_q": 0,
                      "reverse": 0, "heads_first": 0}

#: Most row groups the fused kernel takes (its one-hot block has 16 rows).
MAX_TRITON_GROUPS = 16


def _triton_available(q: torch.Tensor, num_groups: int) -> bool:
    if not q.is_cuda or num_groups > MAX_TRITON_GROUPS or q.shape[-1] > 256:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _column_sums_triton(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, columns: torch.Tensor,
                        row_groups: torch.Tensor, num_groups: int, scale: float, strict: bool) -> torch.Tensor:
    import triton

    b, h, t, d = q.shape
    s_count = columns.shape[1]
    out = torch.empty(b, h, num_groups, s_count, dtype=torch.float32, device=q.device)
    if s_count == 0 or t == 0:
        return out.zero_()
    kernel = _triton_kernel()
    if k.dtype != q.dtype:
        k = k.to(q.dtype)
    ieee = q.dtype == torch.float32
    config = dict(TRITON_CONFIG if d <= 128 and not ieee else TRITON_CONFIG_WIDE)
    block_q, block_s = config.pop("block_q"), config.pop("block_s")
    flags = {name.upper(): bool(config.pop(name, 0)) for name in ("fma_exp", "trans_q", "reverse", "heads_first")}
    flags["FMA_EXP"] = flags["FMA_EXP"] and not ieee
    blocks = triton.cdiv(s_count, block_s)
    grid = (b * h, blocks) if flags["HEADS_FIRST"] else (blocks, b * h)
    lse, columns, row_groups = lse.float(), columns.to(torch.int32), row_groups.to(torch.int32)
    kernel[grid](
        q, k, lse, columns, row_groups, out,
        *q.stride(), *k.stride(), *lse.stride(), *columns.stride(), *row_groups.stride(), *out.stride(),
        t, s_count, h, h // k.shape[1], float(scale) * LOG2E,
        D=d, DP=triton.next_power_of_2(max(d, 16)), BLOCK_Q=block_q, BLOCK_S=block_s,
        NUM_GROUPS=num_groups, GP=16, STRICT=bool(strict), IEEE=ieee, **flags, **config,
    )
    return out


def column_sums(
    q: Float[torch.Tensor, "batch heads seq head_dim"],
    k: Float[torch.Tensor, "batch kv_heads seq head_dim"],
    lse: Float[torch.Tensor, "batch heads seq"],
    columns: Int[torch.Tensor, "batch columns"] | Int[torch.Tensor, "columns"],
    row_groups: Int[torch.Tensor, "batch seq"] | Int[torch.Tensor, "seq"],
    num_groups: int,
    scale: float,
    strict: bool = True,
    backend: str = "auto",
    validate: bool = True,
) -> Float[torch.Tensor, "batch heads groups columns"]:
    """Attention to each column, summed over the query rows of each row group.

    ``out[b, h, g, j] = sum over rows q with row_groups[b, q] == g and q > columns[b, j]
    (q >= with ``strict=False``) of exp(scale * q_h . k_{columns[b, j]} - lse[b, h, q])``.
    A column ``-1`` is padding (its sums are 0); a row group ``-1`` takes part in no group.
    ``backend``: "auto" (Triton on CUDA, else torch), "triton" or "torch". ``validate=False``
    skips the range check of ``columns`` (which waits for the GPU); callers in a forward
    pass check once up front.

    >>> q, k = torch.randn(1, 2, 5, 4), torch.randn(1, 1, 5, 4)
    >>> lse = attention_lse(q, k, 0.5)
    >>> probs = torch.softmax((q @ k.transpose(-1, -2) * 0.5).masked_fill(torch.ones(5, 5).triu(1).bool(),
    ...                       float("-inf")), -1)
    >>> sums = column_sums(q, k, lse, torch.tensor([0, 2]), torch.tensor([-1, 0, 0, 1, 0]), 2, 0.5)
    >>> torch.allclose(sums[0, :, 0, 1], probs[0, :, [4], 2].sum(-1), atol=1e-6)  # row 4 (group 0) after column 2
    True
    """
    if not validate and q.is_cuda and columns.dim() == 2 and row_groups.dim() == 2 and \
            _triton_available(q, num_groups) and backend != "torch":
        # The per-layer call inside a forward: inputs were checked once, keep the host side short.
        return _column_sums_triton(q, k, lse, columns, row_groups, num_groups, scale, strict)
    check_qk(q, k)
    b, h, t, _ = q.shape
    if num_groups < 1:
        raise InputError("num_groups must be at least 1")
    columns = _prepare_columns(columns, b, q.device)
    row_groups = _prepare_groups(row_groups, b, t, q.device)
    if validate and columns.numel() and int(columns.max()) >= t:
        raise TokenSelectionError(f"column {int(columns.max())} is out of range for a sequence of {t} tokens")
    if backend not in ("auto", "triton", "torch"):
        raise InputError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    use_triton = backend == "triton" or (backend == "auto" and _triton_available(q, num_groups))
    if use_triton:
        if not _triton_available(q, num_groups):
            raise InputError("the Triton backend needs a CUDA tensor, triton, at most 16 groups and head_dim <= 256")
        return _column_sums_triton(q, k, lse, columns, row_groups, num_groups, scale, strict)
    return _column_sums_torch(q, k, lse, columns.long(), row_groups.long(), num_groups, scale, strict)


def column_probs(
    q: Float[torch.Tensor, "batch heads seq head_dim"],
    k: Float[torch.Tensor, "batch kv_heads seq head_dim"],
    lse: Float[torch.Tensor, "batch heads seq"],
    columns: Int[torch.Tensor, "columns"],
    rows: Int[torch.Tensor, "rows"],
    scale: float,
) -> Float[torch.Tensor, "batch heads rows columns"]:
    """Exact attention probabilities ``A[b, h, row, column]`` (0 where the causal mask hides the column).

    >>> q, k = torch.randn(1, 2, 5, 4), torch.randn(1, 1, 5, 4)
    >>> probs = torch.softmax((q @ k.transpose(-1, -2) * 0.5).masked_fill(torch.ones(5, 5).triu(1).bool(),
    ...                       float("-inf")), -1)
    >>> got = column_probs(q, k, attention_lse(q, k, 0.5), torch.tensor([0, 3]), torch.tensor([1, 4]), 0.5)
    >>> torch.allclose(got, probs[:, :, [1, 4]][..., [0, 3]], atol=1e-6)
    True
    """
    check_qk(q, k)
    t = q.shape[2]
    columns = torch.as_tensor(columns, device=q.device).long().flatten()
    rows = torch.as_tensor(rows, device=q.device).long().flatten()
    for name, idx in (("column", columns), ("row", rows)):
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= t):
            raise TokenSelectionError(f"{name} positions must lie in [0, {t}); got {idx.tolist()[:8]}...")
    probs = torch.exp(grouped_logits(q[:, :, rows], k[:, :, columns], scale) - lse[:, :, rows, None].float())
    return probs * (rows[:, None] >= columns[None, :])
