"""Exact attention paid to a few key columns, without full attention maps.

The probability that query ``q`` of head ``h`` puts on key ``s`` is
``exp(scale * q_h . k_s - lse_h(q))``, where ``lse_h(q)`` is the log-sum-exp of the
scaled logits of row ``q`` over every key it may see. So the attention to a set of
columns ``S`` needs only the post-rotary queries, the keys of ``S`` and one number per
query row (the normaliser). This module gets the normaliser from the attention kernel
itself: inside a trace, the model's attention call at each layer is served by a
flash / memory-efficient kernel that returns its log-sum-exp next to its output
(same causal attention, so later layers see the same values to kernel precision), and
the column attention is computed from ``q``, ``k`` and ``lse`` while the forward runs.
Nothing of size ``T x T`` is ever stored.

Two ways to read the result:

- `column_attention`: the probabilities ``[layer, head, query, column]`` for chosen
  query rows (e.g. the last row, for decoding analyses);
- `column_attention_sums`: per layer and column, the attention summed over heads and
  over the query rows of each row group (``"video"``, ``"audio"``, ...) that come after
  the column; a streaming aggregate in ``O(T)`` memory, fused into a Triton kernel on GPUs.

The tensor-level functions (`attention_with_lse`, `attention_lse`, `column_sums`,
`column_probs`) work on ``q [B, heads, T, d]``, ``k [B, kv_heads, T, d]`` with grouped
query attention (head ``h`` reads kv head ``h // (heads / kv_heads)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import nnsight
import torch
from jaxtyping import Float, Int

from interventions.runtime.decoder import Decoder, StopForward
from interventions.runtime.routing import AttentionHook
from nnsight_av.errors import InputError, TokenSelectionError
from nnsight_av.inputs import AVInputs

if TYPE_CHECKING:
    from nnsight_av import AVInputs, AVModel

__all__ = [
    "attention_with_lse", "attention_lse", "column_sums", "column_probs", "column_attention",
    "column_attention_sums", "ColumnSums", "run_prefill", "as_list", "LOG2E",
]

LOG2E = 1.4426950408889634
#: Elements of one float32 logits block in the chunked torch paths (~128 MiB).
_BLOCK_ELEMENTS = 1 << 25


# ---------------------------------------------------------------------------------------
# tensor level
# ---------------------------------------------------------------------------------------
def _expand_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, kv, T, d]`` -> ``[B, heads, T, d]`` with head ``h`` reading kv head ``h // group``."""
    kv = x.shape[1]
    if kv == heads:
        return x
    b, _, t, d = x.shape
    return x[:, :, None].expand(b, kv, heads // kv, t, d).reshape(b, heads, t, d)


def _check_qk(q: torch.Tensor, k: torch.Tensor) -> int:
    if q.dim() != 4 or k.dim() != 4:
        raise InputError(f"q and k must be [batch, heads, seq, head_dim]; got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[1] % k.shape[1]:
        raise InputError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    return q.shape[1] // k.shape[1]


def attention_lse(
    q: Float[torch.Tensor, "batch heads query dim"],
    k: Float[torch.Tensor, "batch kv_heads key dim"],
    scale: float,
    mask: torch.Tensor | None = None,
) -> Float[torch.Tensor, "batch heads query"]:
    """Log-sum-exp of each query row's scaled logits over the keys it may see (float32).

    ``mask`` is None (causal, queries aligned to the last keys), a boolean mask (True =
    attend) or an additive float mask, broadcastable to ``[B, heads, query, key]``.
    Computed in blocks of query rows, so memory stays ``O(rows x keys)``.

    >>> q, k = torch.randn(1, 2, 5, 4), torch.randn(1, 1, 5, 4)
    >>> full = (q @ k.transpose(-1, -2) * 0.5).masked_fill(torch.ones(5, 5).triu(1).bool(), float("-inf"))
    >>> torch.allclose(attention_lse(q, k, 0.5), full.logsumexp(-1), atol=1e-6)
    True
    """
    group = _check_qk(q, k)
    b, h, tq, d = q.shape
    kv, tk = k.shape[1], k.shape[2]
    offset = tk - tq
    out = torch.empty(b, h, tq, dtype=torch.float32, device=q.device)
    rows = max(1, _BLOCK_ELEMENTS // max(1, b * h * tk))
    kf = k.float()
    for r0 in range(0, tq, rows):
        r1 = min(tq, r0 + rows)
        kend = tk if mask is not None else offset + r1
        qc = q[:, :, r0:r1].float().reshape(b, kv, group, r1 - r0, d)
        logits = torch.einsum("bkgcd,bktd->bkgct", qc, kf[:, :, :kend]).mul_(scale).reshape(b, h, r1 - r0, kend)
        if mask is None:
            qpos = torch.arange(r0, r1, device=q.device)[:, None] + offset
            logits.masked_fill_(torch.arange(kend, device=q.device)[None, :] > qpos, float("-inf"))
        else:
            part = mask[..., r0:r1, :kend]
            if part.dtype == torch.bool:
                logits = logits.masked_fill(~part, float("-inf"))
            else:
                logits = logits + part.float()
        out[:, :, r0:r1] = torch.logsumexp(logits, dim=-1)
    return out


def _torch_attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention and its log-sum-exp in plain torch (any device, any dtype)."""
    lse = attention_lse(q, k, scale)
    b, h, t, d = q.shape
    ke, ve = _expand_kv(k, h).float(), _expand_kv(v, h).float()
    out = torch.empty(b, h, t, v.shape[-1], dtype=q.dtype, device=q.device)
    rows = max(1, _BLOCK_ELEMENTS // max(1, b * h * t))
    for r0 in range(0, t, rows):
        r1 = min(t, r0 + rows)
        logits = torch.einsum("bhcd,bhtd->bhct", q[:, :, r0:r1].float(), ke[:, :, :r1]) * scale
        logits.masked_fill_(torch.arange(r1, device=q.device)[None, :] > torch.arange(r0, r1, device=q.device)[:, None],
                            float("-inf"))
        probs = torch.exp(logits - lse[:, :, r0:r1, None])
        out[:, :, r0:r1] = torch.einsum("bhct,bhtd->bhcd", probs, ve[:, :, :r1]).to(q.dtype)
    return out, lse


def attention_with_lse(
    q: Float[torch.Tensor, "batch heads seq dim"],
    k: Float[torch.Tensor, "batch kv_heads seq dim"],
    v: Float[torch.Tensor, "batch kv_heads seq vdim"],
    scale: float,
    kernel: str = "auto",
) -> tuple[Float[torch.Tensor, "batch heads seq vdim"], Float[torch.Tensor, "batch heads seq"]]:
    """Causal self-attention output and the log-sum-exp of every query row, in one kernel.

    ``kernel="auto"`` uses PyTorch's cuDNN kernel on CUDA half types (the one SDPA picks
    on Hopper), else flash (CUDA half types, CPU), the memory-efficient kernel (CUDA
    float32), or a chunked torch fallback; "cudnn", "flash", "efficient", "torch" force
    one. The log-sum-exp is float32.

    >>> q, k, v = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    >>> out, lse = attention_with_lse(q, k, v, 8 ** -0.5)
    >>> ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1),
    ...                                                        v.repeat_interleave(2, 1), is_causal=True)
    >>> torch.allclose(out, ref, atol=1e-5), tuple(lse.shape)
    (True, (1, 4, 6))
    """
    _check_qk(q, k)
    b, h, t = q.shape[0], q.shape[1], q.shape[2]
    if k.shape[2] != t:
        raise InputError(f"attention_with_lse is for a prefill (as many keys as queries); got {t} queries and "
                         f"{k.shape[2]} keys")
    if kernel not in _KERNELS:
        raise InputError(f"kernel must be one of {_KERNELS}, got {kernel!r}")
    half = q.dtype in (torch.float16, torch.bfloat16)
    if kernel == "auto":
        if q.is_cuda:
            kernel = "cudnn" if half else "efficient"
        else:
            kernel = "flash" if q.device.type == "cpu" else "torch"
    if kernel == "torch":
        return _torch_attention_with_lse(q, k, v, scale)
    aten = torch.ops.aten
    if kernel == "cudnn":
        try:  # cuDNN reads grouped k/v directly; expand only if this build refuses
            out, lse = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False, scale=scale)[:2]
            return out, lse.reshape(b, h, -1)[..., :t].float()
        except (RuntimeError, NotImplementedError):
            pass
    ke, ve = _expand_kv(k, h), _expand_kv(v, h)
    try:
        if kernel == "cudnn":
            out, lse = aten._scaled_dot_product_cudnn_attention(q, ke, ve, None, True, 0.0, True, False,
                                                                scale=scale)[:2]
        elif kernel == "flash" and q.is_cuda:
            out, lse = aten._scaled_dot_product_flash_attention(q, ke, ve, 0.0, True, False, scale=scale)[:2]
        elif kernel == "flash":
            out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, ke, ve, 0.0, True, scale=scale)[:2]
        else:
            out, lse = aten._scaled_dot_product_efficient_attention(q, ke, ve, None, True, 0.0, True, scale=scale)[:2]
    except (RuntimeError, NotImplementedError):
        return _torch_attention_with_lse(q, k, v, scale)
    lse = lse.reshape(b, h, -1)[..., :t] if lse.dim() == 4 else lse[..., :t]
    return out, lse.float()


_KERNELS = ("auto", "cudnn", "flash", "efficient", "torch")


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
        chunk = max(1, _BLOCK_ELEMENTS // max(1, h * n_valid))
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
    q: Float[torch.Tensor, "batch heads seq dim"],
    k: Float[torch.Tensor, "batch kv_heads seq dim"],
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
    _check_qk(q, k)
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
    q: Float[torch.Tensor, "batch heads seq dim"],
    k: Float[torch.Tensor, "batch kv_heads seq dim"],
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
    group = _check_qk(q, k)
    b, h, t, d = q.shape
    kv = k.shape[1]
    columns = torch.as_tensor(columns, device=q.device).long().flatten()
    rows = torch.as_tensor(rows, device=q.device).long().flatten()
    for name, idx in (("column", columns), ("row", rows)):
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= t):
            raise TokenSelectionError(f"{name} positions must lie in [0, {t}); got {idx.tolist()[:8]}...")
    qr = q[:, :, rows].float().reshape(b, kv, group, rows.numel(), d)
    logits = torch.einsum("bkgrd,bksd->bkgrs", qr, k[:, :, columns].float()).reshape(b, h, rows.numel(), -1)
    probs = torch.exp(logits * scale - lse[:, :, rows, None].float())
    return probs * (rows[:, None] >= columns[None, :])


# ---------------------------------------------------------------------------------------
# model level: one prefill with per-layer callbacks
# ---------------------------------------------------------------------------------------
def as_list(inputs: "AVInputs | Sequence[AVInputs]") -> tuple[list["AVInputs"], bool]:
    """``(list_of_inputs, was_single)``; raises `InputError` on anything else."""
    if isinstance(inputs, AVInputs):
        return [inputs], True
    if isinstance(inputs, (list, tuple)) and inputs and all(isinstance(x, AVInputs) for x in inputs):
        return list(inputs), False
    if isinstance(inputs, (list, tuple)) and not inputs:
        raise InputError("got an empty list of inputs")
    raise InputError(f"inputs must be AVInputs (from model.prepare) or a list of them, got {type(inputs).__name__}")


def _fusable(model: "AVModel", kwargs: Mapping[str, Any], q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether the layer's attention is plain causal softmax attention that a kernel with lse can serve."""
    if kwargs.get("sliding_window") is not None or kwargs.get("softcap") is not None:
        return False
    if kwargs.get("s_aux") is not None or kwargs.get("position_bias") is not None:
        return False
    config = model.adapter.text_config
    if getattr(config, "attn_logit_softcapping", None):
        return False
    return q.shape[2] == k.shape[2] and q.shape[2] > 1


def read_attention(model: "AVModel", layer: int, fuse: bool | None = None) -> tuple[torch.Tensor, torch.Tensor,
                                                                                     torch.Tensor, float]:
    """Inside a trace: ``(q, k, lse, scale)`` of ``layer``'s attention call (q/k after rotary).

    With ``fuse`` (default: when the call is plain causal attention) the call is skipped and
    served by `attention_with_lse`, which gives the normaliser at no extra cost; otherwise the
    call runs as usual and the normaliser is recomputed from q, k and the call's mask.
    Right padding needs no mask: a valid query never sees a padded key.
    """
    call = model.adapter.attention_call(model.layers[layer].self_attn)
    args, kwargs = call.inputs
    module, q, k, v = args[0], args[1], args[2], args[3]
    mask = args[4] if len(args) > 4 else kwargs.get("attention_mask")
    scale = kwargs.get("scaling")
    if scale is None:
        scale = getattr(module, "scaling", None) or q.shape[-1] ** -0.5
    if fuse is None:
        fuse = _fusable(model, kwargs, q, k)
    if fuse:
        out, lse = attention_with_lse(q, k, v, float(scale))
        call.skip((out.transpose(1, 2).contiguous(), None))
    else:
        lse = attention_lse(q, k, float(scale), mask)
    return q, k, lse, float(scale)


ResidualFn = Callable[[int, torch.Tensor], Any]
AttentionFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, float], Any]


def run_prefill(
    model: "AVModel",
    batch: Sequence["AVInputs"],
    *,
    residual_layers: Sequence[int] = (),
    on_residual: ResidualFn | None = None,
    attention_layers: Sequence[int] = (),
    on_attention: AttentionFn | None = None,
    fuse: bool | None = None,
) -> tuple[dict[int, Any], dict[int, Any]]:
    """One prefill of ``batch`` (right-padded) with callbacks on whole-batch tensors.

    ``on_residual(layer, h)`` gets the input of decoder layer ``layer`` ``[B, T, hidden]``;
    ``on_attention(layer, q, k, lse, scale)`` the post-rotary q/k and the row normalisers
    (see `read_attention`). Their return values come back keyed by layer. The run stops
    right after the last thing it needs, so no logits are computed.

    It runs on the Hugging Face module with plain PyTorch hooks and the attention function
    routed through `analyses.decoding` (no nnsight trace: its per-layer host cost showed at
    short lengths on a GPU). A model whose attention does not go through transformers'
    attention interface is served by the same prefill inside an nnsight trace instead.
    """
    residual_layers = sorted({model.check_layer(l) for l in residual_layers}) if on_residual else []
    attention_layers = sorted({model.check_layer(l) for l in attention_layers}) if on_attention else []
    if not residual_layers and not attention_layers:
        return {}, {}
    try:
        return _run_prefill_hooked(model, batch, residual_layers, on_residual, attention_layers, on_attention, fuse)
    except _AttentionNotRouted:
        return _run_prefill_traced(model, batch, residual_layers, on_residual, attention_layers, on_attention, fuse)


class _AttentionNotRouted(Exception):
    """The hooked prefill saw no attention call of a wanted layer (the model calls attention its own way)."""


def _batch_data(model: "AVModel", batch: Sequence["AVInputs"]) -> dict[str, Any]:
    if len(batch) == 1:
        return dict(batch[0].data)
    pad_id = model.tokenizer.pad_token_id if model.tokenizer is not None else 0
    return model.adapter.collate([item.data for item in batch], padding_side="right", pad_id=pad_id or 0)


def _run_prefill_hooked(model, batch, residual_layers, on_residual, attention_layers, on_attention, fuse):
    decoder = Decoder(model)
    config = model.adapter.text_config
    softcap = bool(getattr(config, "attn_logit_softcapping", None))
    found_res: dict[int, Any] = {}
    found_attn: dict[int, Any] = {}
    wanted_attn = set(attention_layers)
    # The run ends at the last read: the last residual (before its layer runs) or the last attention call.
    stop_at = max([(l, 0) for l in residual_layers] + [(l, 1) for l in attention_layers])

    class Reader(AttentionHook):
        def attend(self, layer, module, query, key, value, mask, scale):
            if layer not in wanted_attn:
                return None
            fused = fuse if fuse is not None else (not softcap and query.shape[2] == key.shape[2] > 1)
            if fused:
                out, lse = attention_with_lse(query, key, value, float(scale))
            else:
                lse = attention_lse(query, key, float(scale), mask)
            found_attn[layer] = on_attention(layer, query, key, lse, float(scale))
            if (layer, 1) == stop_at:
                raise StopForward
            return out.transpose(1, 2).contiguous() if fused else None

    def residual(layer: int):
        def pre(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            found_res[layer] = on_residual(layer, hidden)
            if (layer, 0) == stop_at:
                raise StopForward
        return pre

    handles = [decoder.layers[l].register_forward_pre_hook(residual(l), with_kwargs=True) for l in residual_layers]
    try:
        with torch.no_grad(), decoder.hooked(Reader(decoder.attention)):
            decoder.module(**decoder.data(_batch_data(model, batch)), use_cache=False)
    except StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if attention_layers and attention_layers[0] not in found_attn:
        raise _AttentionNotRouted
    return found_res, found_attn


def _run_prefill_traced(model, batch, residual_layers, on_residual, attention_layers, on_attention, fuse):
    wanted = sorted(set(residual_layers) | set(attention_layers))
    with torch.no_grad(), model.trace() as tracer:
        for item in batch:
            with tracer.invoke(item, use_cache=False):
                pass
        with tracer.invoke():
            found = nnsight.save([{}, {}])
            for layer in wanted:
                if layer in residual_layers:
                    found[0][layer] = on_residual(layer, model.layers[layer].input)
                if layer in attention_layers:
                    q, k, lse, scale = read_attention(model, layer, fuse)
                    found[1][layer] = on_attention(layer, q, k, lse, scale)
            tracer.stop()
    return found[0], found[1]


def _batches(items: list[Any], batch_size: int) -> list[list[Any]]:
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")
    return [items[i:i + batch_size] for i in range(0, len(items), batch_size)]


def progress_batches(items: list[Any], batch_size: int, progress: bool, desc: str):
    """Batches of ``items``, with a tqdm bar (counting inputs) when there is more than one input."""
    from tqdm.auto import tqdm

    batches = _batches(items, batch_size)
    bar = tqdm(total=len(items), desc=desc, disable=not progress or len(items) < 2, leave=False)
    for chunk in batches:
        yield chunk
        bar.update(len(chunk))
    bar.close()


def _positions(value: Any, length: int, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        pos = value.long().flatten().cpu()
    else:
        pos = torch.as_tensor(list(value), dtype=torch.long).flatten()
    if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= length):
        raise TokenSelectionError(f"{what} positions must lie in [0, {length}); got min {int(pos.min())}, "
                                  f"max {int(pos.max())}")
    return pos


def _resolve(spec: Any, item: "AVInputs", what: str) -> torch.Tensor:
    """Positions from a span name ("video", "chunk1.audio"), a tensor or a list of ints."""
    if isinstance(spec, str):
        return item.spans.get(spec).long().cpu()
    return _positions(spec, len(item), what)


def _per_item(spec: Any, items: list["AVInputs"], single: bool) -> list[Any]:
    """A per-input spec: one shared spec, or (for a list of inputs) a list with one spec per input."""
    if not single and isinstance(spec, (list, tuple)) and len(spec) == len(items) and spec and \
            all(isinstance(s, (list, tuple, torch.Tensor, str)) for s in spec):
        return list(spec)
    return [spec] * len(items)


def _layers(model: "AVModel", layers: Sequence[int] | None) -> list[int]:
    if layers is None:
        return list(range(model.num_layers))
    return [model.check_layer(l) for l in layers]


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
) -> Float[torch.Tensor, "layer head query column"] | list[torch.Tensor]:
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
    layer_list = _layers(model, layers)
    col_specs = _per_item(columns, items, single)
    row_specs = _per_item(query_rows, items, single)
    cols = [_resolve(c, it, "column") for c, it in zip(col_specs, items)]
    rows = [torch.arange(len(it)) if r is None else _resolve(r, it, "query row") for r, it in zip(row_specs, items)]
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
    sums: Float[torch.Tensor, "layer group columns"]
    counts: Int[torch.Tensor, "group columns"]
    num_heads: int
    strict: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def mean(self) -> Float[torch.Tensor, "layer group columns"]:
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
        pos = _resolve(spec if spec is not None else name, item, f"row group {name!r}")
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


def batch_tensors(chunk: list["AVInputs"], per_item: list[torch.Tensor], fill: int) -> torch.Tensor:
    """Right-pad 1-D tensors (one per input of a batch) into ``[B, max_len]`` with ``fill``."""
    width = max((t.numel() for t in per_item), default=0)
    out = torch.full((len(chunk), width), fill, dtype=torch.long)
    for i, t in enumerate(per_item):
        out[i, :t.numel()] = t
    return out


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
    layer_list = _layers(model, layers)
    groups = dict(row_groups) if isinstance(row_groups, Mapping) else {name: name for name in row_groups}
    if not groups:
        raise InputError("row_groups is empty")
    col_specs = _per_item(columns, items, single)
    cols = [_resolve(c, it, "column") for c, it in zip(col_specs, items)]
    gids = [row_group_ids(it, groups) for it in items]
    results: list[ColumnSums] = []
    index = 0
    for chunk in progress_batches(items, batch_size, progress, "column attention"):
        c_list, g_list = cols[index:index + len(chunk)], gids[index:index + len(chunk)]
        col_batch = batch_tensors(chunk, c_list, -1)
        lengths = [len(it) for it in chunk]
        grp_batch = torch.full((len(chunk), max(lengths)), -1, dtype=torch.long)
        for i, g in enumerate(g_list):
            grp_batch[i, :g.numel()] = g
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
