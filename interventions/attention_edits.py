"""Attention edits (knockout, boost) on one attention call, for any attention backend.

The math behind `AttentionKnockout` / `AttentionBoost`; both runtimes (nnsight traces and
the fast hook runtime) call `apply_attention_edits`. How it works without attention maps: at each chosen layer, the attention function's
call (``model.adapter.attention_call``) is left to run as usual (SDPA / flash / eager).
Its inputs give the query, key and value after rotary embedding and the mask. For the
*affected query rows* only, attention is recomputed with SDPA and an additive float
mask ``[1, heads, rows, keys]``: the causal/padding mask plus a bias on the selected
(query, key) pairs, and those rows of the call's output are replaced. Other rows keep
the backend's result, so the big kernel never changes and nothing of size
``[heads, T, T]`` is built (rows are processed in chunks).

Biases (``a`` is the logit ``q . k * scale`` of a selected pair):

- knockout: ``-inf`` (the pair gets no attention; a row left with no key outputs 0);
- ``AttentionBoost(mode="multiplicative")``: ``log(1 + alpha)``, which is exactly
  "multiply the probabilities of the selected keys by ``1 + alpha`` and renormalise the row";
- ``AttentionBoost(mode="pre_softmax")``: ``alpha * |a|``, i.e. ``a <- a + alpha * |a|``
  before the softmax (METHOD.md section 6), with ``a`` computed for the selected block
  ``[rows x keys]`` only.

With a KV cache (generation) the query rows are the new tokens (positions offset by
the cache length) and the keys include the cache. GQA: query head ``h`` reads key/value
head ``h // (num_heads // num_kv_heads)``. With eager attention and
``output_attentions=True`` the returned weights of the affected rows are updated too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float

from nnsight_av.errors import InputError

from .attention_math import check_qk, grouped_logits, grouped_values, mask_logits

__all__ = ["AttentionEdit", "apply_attention_edits", "boosted_attention", "boost_amount", "boost_bias", "CHUNK_ELEMENTS"]

#: Elements of the per-chunk float mask (``heads x rows x keys``); bounds the extra memory.
CHUNK_ELEMENTS = 1 << 22


@dataclass
class AttentionEdit:
    """One bias on (query row, key column) pairs of one attention call.

    ``rows``: query rows of this forward; ``keys``: key columns (cache included); ``heads``:
    query heads (``None``: all). CPU LongTensors. ``kind``: ``"knockout"``,
    ``"multiplicative"`` or ``"pre_softmax"``.
    """

    kind: str
    rows: torch.Tensor
    keys: torch.Tensor
    heads: torch.Tensor | None = None
    alpha: float = 0.0


BOOST_MODES = ("pre_softmax", "multiplicative")


def boost_amount(alpha: float, mode: str = "pre_softmax") -> float:
    """The per-pair constant of a boost: ``alpha`` (``pre_softmax``) or ``log(1 + alpha)`` (``multiplicative``).

    What the kernels receive; `boost_bias` turns it into the bias on the logits.

    >>> boost_amount(0.2), round(boost_amount(1.0, "multiplicative"), 4)
    (0.2, 0.6931)
    """
    if mode not in BOOST_MODES:
        raise InputError(f"boost mode must be one of {BOOST_MODES}, got {mode!r}")
    return math.log1p(alpha) if mode == "multiplicative" else float(alpha)


def boost_bias(logits: torch.Tensor, amount: float | torch.Tensor, mode: str = "pre_softmax",
               inplace: bool = False) -> torch.Tensor:
    """The boost of METHOD.md section 6 as a bias on (scaled) attention logits ``a``: the one place it is written.

    ``pre_softmax``: ``amount * |a|`` (so ``a + bias`` is ``a + alpha * |a|``); ``multiplicative``:
    ``amount`` itself (``log(1 + alpha)``: the probabilities times ``1 + alpha``, renormalised).
    ``amount`` comes from `boost_amount` (a tensor broadcasts, e.g. per batch row or column);
    ``inplace=True`` overwrites ``logits`` with the bias. Since ``|s * x| = s * |x|`` for a
    scale ``s > 0``, unscaled ``q . k`` with ``amount * s`` gives the same bias. The Triton
    decode kernel of ``analyses.asd`` computes the same expression in its inner loop.

    >>> a = torch.tensor([-2.0, 1.0])
    >>> (a + boost_bias(a, 0.5)).tolist(), boost_bias(a, 0.5, "multiplicative").tolist()
    ([-1.0, 1.5], [0.5, 0.5])
    """
    if mode == "multiplicative":
        bias = torch.as_tensor(amount, dtype=logits.dtype, device=logits.device).expand_as(logits)
        return logits.copy_(bias) if inplace else bias.clone()
    if mode != "pre_softmax":
        raise InputError(f"boost mode must be one of {BOOST_MODES}, got {mode!r}")
    return logits.abs_().mul_(amount) if inplace else logits.abs() * amount


def _base_mask(mask: torch.Tensor | None, rows: torch.Tensor, past: int, kv_len: int, heads: torch.Tensor,
               ) -> torch.Tensor:
    """The call's own mask for ``rows`` as an additive float32 mask ``[B|1, 1|h, rows, kv_len]``."""
    device = rows.device
    if mask is None or mask.dim() == 2:
        causal = torch.arange(kv_len, device=device)[None, :] <= (rows + past)[:, None]
        allowed = causal[None, None]
        if mask is not None:  # [B, kv] padding mask (flash-attention style)
            allowed = allowed & mask[:, None, None, :kv_len].to(device=device, dtype=torch.bool)
        return torch.zeros(allowed.shape, device=device).masked_fill(~allowed, float("-inf"))
    picked = mask[..., :kv_len]
    if picked.shape[1] > 1:
        picked = picked.index_select(1, heads)
    if picked.shape[2] > 1:
        picked = picked.index_select(2, rows)
    if picked.dtype == torch.bool:
        return torch.zeros(picked.shape, device=device).masked_fill(~picked, float("-inf"))
    return picked.float()


def _plan(edits: list[AttentionEdit], num_heads: int, move: Callable[..., torch.Tensor]) -> tuple:
    """Union of rows and heads, and per edit which (head, row) pairs and keys it covers, on the device.

    ``all_heads``: every edit covers every head, so masks need no head dimension and the
    recomputation keeps the call's own key/value heads (grouped-query attention untouched).
    """
    rows_all = torch.unique(torch.cat([e.rows for e in edits]))
    all_heads = all(e.heads is None for e in edits)
    heads_all = torch.arange(num_heads) if any(e.heads is None for e in edits) else \
        torch.unique(torch.cat([e.heads for e in edits]))
    covers = []
    for e in edits:
        head_in = torch.ones(len(heads_all), dtype=torch.bool) if e.heads is None else torch.isin(heads_all, e.heads)
        row_in = torch.isin(rows_all, e.rows)
        covers.append((move(head_in), move(row_in), move(e.keys), bool(row_in.all())))
    return heads_all, rows_all, move(heads_all), move(rows_all), covers, all_heads


def _pairs(cover: tuple, start: int, stop: int, all_heads: bool) -> torch.Tensor | None:
    """``[1, heads|1, rows, 1]`` mask of the (head, row) pairs one edit covers in a chunk; None: all."""
    head_in, row_in, _, every_row = cover
    if all_heads and every_row:
        return None
    rows = row_in[start:stop][None, :]
    pair = rows if all_heads else head_in[:, None] & rows
    return pair[None, :, :, None]


def _static_mask(mask: torch.Tensor | None, edits: list[AttentionEdit], plan: tuple, start: int, stop: int,
                 past: int, kv_len: int, batch: int) -> torch.Tensor:
    """The call's mask plus every layer-independent bias (knockout, multiplicative) for one row chunk.

    float32 ``[B|1, heads|1, rows, kv_len]``; the same at every layer of one forward.
    """
    _, _, heads_dev, rows_dev, covers, all_heads = plan
    rows = rows_dev[start:stop]
    full = _base_mask(mask, rows, past, kv_len, heads_dev)
    static = [(e, c) for e, c in zip(edits, covers) if e.kind in ("knockout", "multiplicative")]
    if not static:
        return full
    heads = 1 if all_heads else len(heads_dev)
    full = full.expand(max(batch, full.shape[0]), max(heads, full.shape[1]), -1, -1).clone()
    for e, cover in static:
        amount = float("-inf") if e.kind == "knockout" else boost_amount(e.alpha, "multiplicative")
        pair = _pairs(cover, start, stop, all_heads)
        if pair is None:
            vals = torch.full((1, 1, 1, 1), amount, device=full.device)
        else:
            vals = torch.zeros(pair.shape, device=full.device).masked_fill(pair, amount)
        keys = cover[2]
        full.index_add_(3, keys, vals.expand(full.shape[0], full.shape[1], full.shape[2], len(keys)).contiguous())
    return full


def apply_attention_edits(
    query: Float[torch.Tensor, "batch heads seq head_dim"],
    key: Float[torch.Tensor, "batch kv_heads keys head_dim"],
    value: Float[torch.Tensor, "batch kv_heads keys head_dim"],
    mask: torch.Tensor | None,
    scaling: float | None,
    out: Float[torch.Tensor, "batch seq heads head_dim"],
    weights: Float[torch.Tensor, "batch heads seq keys"] | None,
    edits: list[AttentionEdit],
    num_key_value_groups: int = 1,
    to_device: Callable[..., torch.Tensor] | None = None,
    memo: dict | None = None,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Recompute the rows of ``out`` (the call's output, ``[B, q, H, d]``) that ``edits`` touch.

    Edits ``out`` (and ``weights``, when the backend returned them) in place and returns them.
    With ``memo`` (one dict per forward, as `ApplyContext` keeps), the selection is moved to
    the device once and the layer-independent part of the mask is built once per forward:
    per layer only the recomputed rows' attention (and, for ``pre_softmax``, the logits of
    the selected block) is computed, so the cost stays a few kernels per layer.
    """
    edits = [e for e in edits if len(e.rows) and len(e.keys)]
    if not edits:
        return out, weights
    device = query.device
    move = (lambda t: to_device(t, device)) if to_device is not None else (lambda t: t.to(device))
    batch, num_heads, q_len, head_dim = query.shape
    kv_len = key.shape[2]
    past = kv_len - q_len
    scale = scaling if scaling is not None else 1.0 / math.sqrt(head_dim)
    groups = num_key_value_groups

    memo = {} if memo is None else memo
    memo_key = ("attention-plan", num_heads, tuple((e.kind, id(e.rows), id(e.keys), id(e.heads)) for e in edits))
    if memo_key not in memo:
        memo[memo_key] = (_plan(edits, num_heads, move), edits)  # edits kept alive so the ids in the key stay theirs
    plan = memo[memo_key][0]
    heads_all, rows_all, heads_dev, rows_dev, covers, all_heads = plan
    if all_heads:      # every head: the call's own (grouped) key/value heads
        q_h, k_h, v_h = query, key, value
    else:
        kv_heads = heads_dev // groups
        q_h = query.index_select(1, heads_dev)
        k_h, v_h = key.index_select(1, kv_heads), value.index_select(1, kv_heads)
    gqa = all_heads and groups > 1
    dynamic = [(e, c) for e, c in zip(edits, covers) if e.kind == "pre_softmax"]
    for e in edits:
        if e.kind not in ("knockout", "multiplicative", "pre_softmax"):
            raise InputError(f"unknown attention edit {e.kind!r}")
    knockout = any(e.kind == "knockout" for e in edits)
    chunk = max(1, chunk_elements // (len(heads_all) * kv_len))
    # Masks of a forward are the same at every layer as long as the call's mask is (one object in HF).
    static_key = ("attention-static", memo_key, id(mask), past, kv_len, batch)
    statics = memo.get(static_key, (None, {}))[1]
    if static_key not in memo:
        memo[static_key] = (mask, statics)                 # the mask kept alive so its id stays its own
    for start in range(0, len(rows_all), chunk):
        stop = min(start + chunk, len(rows_all))
        rows = rows_dev[start:stop]
        if start not in statics:
            statics[start] = _static_mask(mask, edits, plan, start, stop, past, kv_len, batch).to(query.dtype)
        full = statics[start]
        q_r = q_h.index_select(2, rows)
        if dynamic:
            # Few kernels per layer (this runs at every boosted layer): the bias a -> alpha |a| is
            # added in the attention dtype, as the mask is cast to it for the kernel anyway.
            heads = num_heads if all_heads else len(heads_all)
            full = full.expand(batch, heads, -1, -1).clone()
            for e, cover in dynamic:
                keys = cover[2]
                k_sel = k_h.index_select(2, keys)
                if gqa:  # query heads h*G .. h*G+G-1 read key head h: one matmul per key head
                    q_g = q_r.reshape(batch, num_heads // groups, groups * len(rows), head_dim)
                    logits = (q_g @ k_sel.transpose(-1, -2)).view(batch, num_heads, len(rows), len(keys))
                else:
                    logits = q_r @ k_sel.transpose(-1, -2)
                logits = boost_bias(logits, e.alpha * scale, "pre_softmax", inplace=True)   # unscaled q.k
                pair = _pairs(cover, start, stop, all_heads)
                if pair is not None:
                    logits = logits.masked_fill_(~pair, 0.0)
                full.index_add_(3, keys, logits.to(full.dtype))
        new = F.scaled_dot_product_attention(q_r, k_h, v_h, attn_mask=full, scale=scale, enable_gqa=gqa)
        if knockout:
            new = torch.nan_to_num(new, nan=0.0)  # a row whose every key is blocked attends to nothing
        if all_heads:
            out.index_copy_(1, rows, new.transpose(1, 2).to(out.dtype))
        else:
            out[:, rows[:, None], heads_dev[None, :]] = new.transpose(1, 2).to(out.dtype)
        if weights is not None:
            k_full = k_h.repeat_interleave(groups, dim=1) if gqa else k_h
            logits = torch.matmul(q_r.float(), k_full.float().transpose(-1, -2)) * scale + full.float()
            probs = torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0)
            weights[:, heads_dev[:, None], rows[None, :]] = probs.to(weights.dtype)
    return out, weights


def boosted_attention(
    query: Float[torch.Tensor, "batch heads seq head_dim"],
    key: Float[torch.Tensor, "batch kv_heads keys head_dim"],
    value: Float[torch.Tensor, "batch kv_heads keys head_dim"],
    scale: float,
    mask: torch.Tensor | None = None,
    *,
    batch: Sequence[int] = (),
    rows: torch.Tensor | None = None,
    columns: torch.Tensor | None = None,
    alpha: float = 0.0,
    mode: str = "pre_softmax",
) -> tuple[Float[torch.Tensor, "batch seq heads head_dim"], Float[torch.Tensor, "batch heads seq keys"]]:
    """Attention with the logits of chosen (row, column) pairs raised before the softmax.

    For batch entries ``batch``, query rows ``rows`` (indices into the ``q`` axis; all when
    None) and key ``columns``: ``a <- a + alpha * |a|`` (``mode="pre_softmax"``, METHOD.md
    section 6) or ``a <- a + log(1 + alpha)``, i.e. the probabilities of those columns
    multiplied by ``1 + alpha`` and renormalised (``mode="multiplicative"``). ``a`` is the
    scaled logit; the boost is applied before the mask, so masked keys stay masked.
    ``mask``: None (causal, queries aligned to the last keys), boolean (True = attend) or
    additive float, broadcastable to ``[B, heads, q, k]``. Grouped-query attention is handled
    without expanding the keys. Computed in float32; returns the output in the layout
    transformers' attention functions return (``[B, q, heads, dim]``, query dtype) and the
    probabilities ``[B, heads, q, k]`` (float32).

    >>> q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 1, 5, 4), torch.randn(1, 1, 5, 4)
    >>> out, probs = boosted_attention(q, k, v, 0.5)
    >>> ref = torch.nn.functional.scaled_dot_product_attention(q, k.expand(1, 2, 5, 4), v.expand(1, 2, 5, 4),
    ...     attn_mask=torch.ones(3, 5, dtype=torch.bool).tril(2), scale=0.5)
    >>> torch.allclose(out.transpose(1, 2), ref, atol=1e-6)
    True
    """
    check_qk(query, key)
    n, tk = query.shape[2], key.shape[2]
    logits = grouped_logits(query, key, scale)
    if alpha and columns is not None and columns.numel() and len(batch):
        amount = boost_amount(alpha, mode)
        cols = columns.to(logits.device)
        row_idx = torch.arange(n, device=logits.device) if rows is None else rows.to(logits.device)
        if row_idx.numel():
            ri, ci = row_idx[:, None], cols[None, :]
            for bi in batch:
                picked = logits[bi, :, ri, ci]
                logits[bi, :, ri, ci] = picked + boost_bias(picked, amount, mode)
    probs = torch.softmax(mask_logits(logits, mask, tk - n), dim=-1)
    out = grouped_values(probs, value)
    return out.transpose(1, 2).to(query.dtype).contiguous(), probs
