"""Causal attention on post-rotary ``q``, ``k``, ``v`` with grouped-query heads, and its log-sum-exp.

Tensor math shared by the runtimes and the analyses (no model, no hooks): ``q [B, heads, seq,
head_dim]``, ``k``/``v [B, kv_heads, keys, head_dim]``, where head ``h`` reads kv head
``h // (heads / kv_heads)``. The grouped heads are never expanded for the logits: the query heads
of one kv head are stacked as extra rows (`grouped_logits`, `grouped_values`).

The log-sum-exp ``lse_h(q)`` of a row's scaled logits is what turns one logit into a probability,
``exp(scale * q_h . k_s - lse_h(q))``; `attention_with_lse` gets it from the attention kernel
itself (flash / memory-efficient / cuDNN return it next to their output), `attention_lse`
recomputes it in blocks of rows.
"""

from __future__ import annotations

import torch
from jaxtyping import Float

from nnsight_av.errors import InputError

__all__ = ["check_qk", "expand_kv", "grouped_logits", "grouped_values", "mask_logits", "attention_lse",
           "attention_with_lse", "KERNELS", "BLOCK_ELEMENTS"]

#: Elements of one float32 logits block in the chunked torch paths (~128 MiB).
BLOCK_ELEMENTS = 1 << 25
#: The kernels `attention_with_lse` can be told to use.
KERNELS = ("auto", "cudnn", "flash", "efficient", "torch")


def check_qk(q: torch.Tensor, k: torch.Tensor) -> int:
    """The query heads per key/value head; `InputError` unless ``q``/``k`` are 4-D with whole groups."""
    if q.dim() != 4 or k.dim() != 4:
        raise InputError(f"q and k must be [batch, heads, seq, head_dim]; got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[1] % k.shape[1]:
        raise InputError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    return q.shape[1] // k.shape[1]


def expand_kv(x: Float[torch.Tensor, "batch kv_heads keys head_dim"],
              heads: int) -> Float[torch.Tensor, "batch heads keys head_dim"]:
    """``[B, kv, T, d]`` -> ``[B, heads, T, d]`` with head ``h`` reading kv head ``h // group`` (for kernels that need it)."""
    kv = x.shape[1]
    if kv == heads:
        return x
    b, _, t, d = x.shape
    return x[:, :, None].expand(b, kv, heads // kv, t, d).reshape(b, heads, t, d)


def grouped_logits(
    q: Float[torch.Tensor, "batch heads seq head_dim"],
    k: Float[torch.Tensor, "batch kv_heads keys head_dim"],
    scale: float,
) -> Float[torch.Tensor, "batch heads seq keys"]:
    """Scaled logits ``scale * q . k`` in float32, one matmul per kv head (no expanded keys).

    >>> q, k = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 5, 8)
    >>> ref = q @ k.repeat_interleave(2, 1).transpose(-1, -2) * 0.5
    >>> torch.allclose(grouped_logits(q, k, 0.5), ref, atol=1e-5)
    True
    """
    b, h, n, d = q.shape
    kv, tk = k.shape[1], k.shape[2]
    logits = torch.matmul(q.float().reshape(b, kv, (h // kv) * n, d), k.float().transpose(-1, -2))
    return logits.view(b, h, n, tk).mul_(scale)


def grouped_values(
    probs: Float[torch.Tensor, "batch heads seq keys"],
    v: Float[torch.Tensor, "batch kv_heads keys head_dim"],
) -> Float[torch.Tensor, "batch heads seq head_dim"]:
    """``probs @ v`` in float32 with grouped kv heads (no expanded values)."""
    b, h, n, tk = probs.shape
    kv = v.shape[1]
    return torch.matmul(probs.reshape(b, kv, (h // kv) * n, tk), v.float()).view(b, h, n, -1)


def mask_logits(
    logits: Float[torch.Tensor, "batch heads seq keys"],
    mask: torch.Tensor | None,
    first: int = 0,
) -> Float[torch.Tensor, "batch heads seq keys"]:
    """``logits`` with ``mask`` applied: masked pairs are ``-inf``.

    ``mask`` None: causal, row ``i`` sees keys ``<= first + i`` (``first`` is the key position of
    row 0: ``keys - seq`` for queries aligned to the last keys), filled in place; a boolean mask
    (True = attend) or an additive float mask broadcastable to ``logits``.

    >>> mask_logits(torch.zeros(1, 1, 2, 3), None, 1)[0, 0].tolist()
    [[0.0, 0.0, -inf], [0.0, 0.0, 0.0]]
    """
    if mask is None:
        rows, keys = logits.shape[-2], logits.shape[-1]
        if first < keys - 1:  # else every row sees every key
            device = logits.device
            hidden = torch.arange(keys, device=device)[None, :] > torch.arange(first, first + rows, device=device)[:, None]
            logits.masked_fill_(hidden, float("-inf"))
        return logits
    if mask.dtype == torch.bool:
        return logits.masked_fill(~mask, float("-inf"))
    return logits + mask.float()


def attention_lse(
    q: Float[torch.Tensor, "batch heads seq head_dim"],
    k: Float[torch.Tensor, "batch kv_heads keys head_dim"],
    scale: float,
    mask: torch.Tensor | None = None,
) -> Float[torch.Tensor, "batch heads seq"]:
    """Log-sum-exp of each query row's scaled logits over the keys it may see (float32).

    ``mask`` is None (causal, queries aligned to the last keys), a boolean mask (True =
    attend) or an additive float mask, broadcastable to ``[B, heads, seq, keys]``.
    Computed in blocks of query rows, so memory stays ``O(rows x keys)``.

    >>> q, k = torch.randn(1, 2, 5, 4), torch.randn(1, 1, 5, 4)
    >>> full = (q @ k.transpose(-1, -2) * 0.5).masked_fill(torch.ones(5, 5).triu(1).bool(), float("-inf"))
    >>> torch.allclose(attention_lse(q, k, 0.5), full.logsumexp(-1), atol=1e-6)
    True
    """
    check_qk(q, k)
    b, h, tq, _ = q.shape
    tk = k.shape[2]
    offset = tk - tq
    out = torch.empty(b, h, tq, dtype=torch.float32, device=q.device)
    rows = max(1, BLOCK_ELEMENTS // max(1, b * h * tk))
    kf = k.float()
    for r0 in range(0, tq, rows):
        r1 = min(tq, r0 + rows)
        kend = tk if mask is not None else offset + r1
        logits = grouped_logits(q[:, :, r0:r1], kf[:, :, :kend], scale)
        part = None if mask is None else mask[..., r0:r1, :kend]
        out[:, :, r0:r1] = torch.logsumexp(mask_logits(logits, part, offset + r0), dim=-1)
    return out


def attention_with_lse(
    q: Float[torch.Tensor, "batch heads seq head_dim"],
    k: Float[torch.Tensor, "batch kv_heads seq head_dim"],
    v: Float[torch.Tensor, "batch kv_heads seq head_dim"],
    scale: float,
    kernel: str = "auto",
) -> tuple[Float[torch.Tensor, "batch heads seq head_dim"], Float[torch.Tensor, "batch heads seq"]]:
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
    check_qk(q, k)
    b, h, t = q.shape[0], q.shape[1], q.shape[2]
    if k.shape[2] != t:
        raise InputError(f"attention_with_lse is for a prefill (as many keys as queries); got {t} queries and "
                         f"{k.shape[2]} keys")
    if kernel not in KERNELS:
        raise InputError(f"kernel must be one of {KERNELS}, got {kernel!r}")
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
    ke, ve = expand_kv(k, h), expand_kv(v, h)
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


def _torch_attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention and its log-sum-exp in plain torch (any device, any dtype)."""
    lse = attention_lse(q, k, scale)
    b, h, t, _ = q.shape
    kf, vf = k.float(), v.float()
    out = torch.empty(b, h, t, v.shape[-1], dtype=q.dtype, device=q.device)
    rows = max(1, BLOCK_ELEMENTS // max(1, b * h * t))
    for r0 in range(0, t, rows):
        r1 = min(t, r0 + rows)
        logits = mask_logits(grouped_logits(q[:, :, r0:r1], kf[:, :, :r1], scale), None, r0)
        probs = torch.exp(logits - lse[:, :, r0:r1, None])
        out[:, :, r0:r1] = grouped_values(probs, vf[:, :, :r1]).to(q.dtype)
    return out, lse
