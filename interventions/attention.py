"""Attention primitives: `AttentionKnockout` and `AttentionBoost`, for any attention backend.

How they work without attention maps: at each chosen layer, the attention function's
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
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from jaxtyping import Float

from nnsight_av.errors import InputError

from .base import Intervention, register_intervention
from .context import ApplyContext
from .engine import Op
from .selectors import normalize_selector, selector_to_json

__all__ = ["AttentionKnockout", "AttentionBoost", "AttentionEdit", "apply_attention_edits"]

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
    """Union of rows and heads, and per edit which (head, row) pairs and keys it covers, on the device."""
    rows_all = torch.unique(torch.cat([e.rows for e in edits]))
    if any(e.heads is None for e in edits):
        heads_all = torch.arange(num_heads)
    else:
        heads_all = torch.unique(torch.cat([e.heads for e in edits]))
    covers = []
    for e in edits:
        head_in = torch.ones(len(heads_all), dtype=torch.bool) if e.heads is None else torch.isin(heads_all, e.heads)
        covers.append((move(head_in), move(torch.isin(rows_all, e.rows)), move(e.keys)))
    return heads_all, rows_all, move(heads_all), move(rows_all), covers


def apply_attention_edits(
    query: Float[torch.Tensor, "b h q d"],
    key: Float[torch.Tensor, "b kv k d"],
    value: Float[torch.Tensor, "b kv k d"],
    mask: torch.Tensor | None,
    scaling: float | None,
    out: Float[torch.Tensor, "b q h d"],
    weights: Float[torch.Tensor, "b h q k"] | None,
    edits: list[AttentionEdit],
    num_key_value_groups: int = 1,
    to_device: Callable[..., torch.Tensor] | None = None,
    memo: dict | None = None,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Recompute the rows of ``out`` (the call's output, ``[B, q, H, d]``) that ``edits`` touch.

    Edits ``out`` (and ``weights``, when the backend returned them) in place and returns them.
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

    memo_key = ("attention-plan", num_heads, tuple((e.kind, id(e.rows), id(e.keys), id(e.heads)) for e in edits))
    plan = memo.get(memo_key) if memo is not None else None
    if plan is None:
        plan = _plan(edits, num_heads, move)
        if memo is not None:
            memo[memo_key] = (*plan, edits)  # edits kept alive so the ids in the key stay theirs
    heads_all, rows_all, heads_dev, rows_dev, covers = plan[:5]
    kv_heads = heads_dev // num_key_value_groups
    q_h = query.index_select(1, heads_dev)
    k_h = key.index_select(1, kv_heads)
    v_h = value.index_select(1, kv_heads)
    chunk = max(1, chunk_elements // (len(heads_all) * kv_len))
    for start in range(0, len(rows_all), chunk):
        rows = rows_dev[start:start + chunk]
        q_r = q_h.index_select(2, rows)
        bias = torch.zeros((batch, len(heads_all), len(rows), kv_len), device=device)
        for e, (head_in, row_in, keys) in zip(edits, covers):
            pair = (head_in[:, None] & row_in[start:start + chunk][None, :])[None, :, :, None]
            if e.kind in ("knockout", "multiplicative"):
                amount = float("-inf") if e.kind == "knockout" else math.log1p(e.alpha)
                vals = torch.where(pair, torch.full((), amount, device=device), torch.zeros((), device=device))
                vals = vals.expand(batch, -1, -1, len(keys))
            elif e.kind == "pre_softmax":
                logits = torch.matmul(q_r.float(), k_h.index_select(2, keys).float().transpose(-1, -2)) * scale
                vals = torch.where(pair, e.alpha * logits.abs(), torch.zeros((), device=device))
            else:
                raise InputError(f"unknown attention edit {e.kind!r}")
            bias.index_add_(3, keys, vals.contiguous())
        full = _base_mask(mask, rows, past, kv_len, heads_dev) + bias
        new = F.scaled_dot_product_attention(q_r, k_h, v_h, attn_mask=full.to(query.dtype), scale=scale)
        new = torch.nan_to_num(new, nan=0.0)  # a row whose every key is blocked attends to nothing
        out[:, rows[:, None], heads_dev[None, :]] = new.transpose(1, 2).to(out.dtype)
        if weights is not None:
            logits = torch.matmul(q_r.float(), k_h.float().transpose(-1, -2)) * scale + full
            probs = torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0)
            weights[:, heads_dev[:, None], rows[None, :]] = probs.to(weights.dtype)
    return out, weights


class _AttentionIntervention(Intervention):
    attention = True
    kind = ""

    def __init__(self, *, queries: Any = None, keys: Any = None, tokens: Any = None, layers: Any = None,
                 heads: Any = None, site: Any = None, sets: Mapping[str, Any] | None = None,
                 allow_empty: bool = False) -> None:
        if tokens is not None and keys is not None:
            raise InputError(f"{type(self).__name__}: pass keys= (tokens= is its alias), not both")
        keys = keys if keys is not None else tokens
        if keys is None:
            raise InputError(f"{type(self).__name__} needs keys= (the key columns, e.g. a sink set)")
        if site not in (None, "attn_logits"):
            raise InputError(f"{type(self).__name__} acts on the 'attn_logits' site, got site={site!r}")
        super().__init__(layers=layers, tokens=keys, site="attn_logits", heads=heads, sets=sets,
                         allow_empty=allow_empty)
        self.queries = normalize_selector(queries)

    @property
    def keys(self) -> Any:
        return self.site.tokens

    def compile(self, model: Any, ctx: ApplyContext) -> list[Op]:
        heads = self._heads(model)
        return [Op(layer, "attn_call", self._op(heads), label=type(self).__name__)
                for layer in self.site.layer_indices(model)]

    def _op(self, heads: torch.Tensor | None):
        def run(ctx: ApplyContext) -> list[AttentionEdit]:
            queries = self._positions(ctx, self.queries)
            rows, _ = ctx.rows(queries)
            keys = self._positions(ctx, self.keys)
            if len(rows) == 0 or len(keys) == 0:
                return []
            return [AttentionEdit(self.kind, rows, ctx.keys(keys), heads, self.alpha_value())]

        return run

    def alpha_value(self) -> float:
        return 0.0

    def params(self) -> dict[str, Any]:
        base = super().params()
        out = {"queries": selector_to_json(self.queries), "keys": base.pop("tokens"), "layers": base["layers"],
               "heads": base["heads"]}
        for name in ("sets", "allow_empty"):
            if name in base:
                out[name] = base[name]
        return out


@register_intervention
class AttentionKnockout(_AttentionIntervention):
    """Block attention from ``queries`` to ``keys`` (information-flow knockout).

    >>> AttentionKnockout(queries="text", keys="video", layers=range(2, 4)).to_dict()["keys"]
    'video'
    """

    kind = "knockout"


@register_intervention
class AttentionBoost(_AttentionIntervention):
    """Raise attention from ``queries`` to ``keys`` by ``alpha``.

    ``mode="pre_softmax"`` (default, METHOD.md section 6): ``a <- a + alpha * |a|`` on the
    logits of the selected pairs. ``mode="multiplicative"``: the selected keys' probabilities
    times ``1 + alpha``, each row renormalised (``alpha >= -1``; ``-1`` is a knockout).
    """

    modes = ("pre_softmax", "multiplicative")

    def __init__(self, *, queries: Any = None, keys: Any = None, alpha: float = 0.2, mode: str = "pre_softmax",
                 **kwargs: Any) -> None:
        super().__init__(queries=queries, keys=keys, **kwargs)
        if mode not in self.modes:
            raise InputError(f"AttentionBoost mode must be one of {self.modes}, got {mode!r}")
        alpha = float(alpha)
        if not math.isfinite(alpha):
            raise InputError(f"AttentionBoost alpha must be finite, got {alpha}")
        if mode == "multiplicative" and alpha < -1:
            raise InputError(f"multiplicative AttentionBoost needs alpha >= -1 (probabilities stay >= 0), got {alpha}")
        self.alpha, self.mode = alpha, mode
        self.kind = mode

    def alpha_value(self) -> float:
        return self.alpha

    def params(self) -> dict[str, Any]:
        return {**super().params(), "alpha": self.alpha, "mode": self.mode}
