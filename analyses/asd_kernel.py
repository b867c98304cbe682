"""ASD's decode attention: boost, softmax, output and statistics in one kernel (Triton on CUDA, torch elsewhere)."""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float

from interventions.attention_edits import boost_bias, boosted_attention  # noqa: F401  (the doctest's reference)
from nnsight_av.errors import InputError

__all__ = ["decode_attention"]

# ---------------------------------------------------------------------------------------
# decode attention on the GPU: one kernel for boost, softmax, output and statistics
# ---------------------------------------------------------------------------------------
_DECODE_KERNEL: Any = None


def _decode_kernel() -> Any:
    """Build (once) the Triton kernel for one query row per (batch, head) over the cached keys.

    Online softmax over key blocks; on the way it adds ``alpha[b] * flag[t] * |a|`` (or
    ``alpha[b] * flag[t]``) to the logits of flagged key columns, and accumulates the
    probability mass on 8 weighted column sets (``W``; keys past the prompt count in set 4,
    the text mass). Replaces the ~12 small torch kernels of the written-out attention.
    """
    global _DECODE_KERNEL
    if _DECODE_KERNEL is not None:
        return _DECODE_KERNEL
    import triton
    import triton.language as tl

    @triton.jit
    def asd_decode_attention(
        Q, K, V, OUT, FLAG, ALPHA, W, STATS, LEN,
        sqb, sqh, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sob, soh, swt, ssb, ssh,
        T, TP, H, GQA, scale,
        D: tl.constexpr, DP: tl.constexpr, BLOCK_T: tl.constexpr, MULT: tl.constexpr, WITH_STATS: tl.constexpr,
        HAS_LEN: tl.constexpr,
    ):
        pid = tl.program_id(0)
        b = pid // H
        h = pid % H
        kvh = h // GQA
        offs_d = tl.arange(0, DP)
        dmask = offs_d < D
        offs_j = tl.arange(0, 8)
        q = tl.load(Q + b * sqb + h * sqh + offs_d * sqd, mask=dmask, other=0.0).to(tl.float32) * scale
        boost = tl.load(ALPHA + b)
        if HAS_LEN:
            valid = tl.load(LEN)      # keys past the cache's fill level are masked (static cache)
        else:
            valid = T
        m_i = tl.max(tl.full([BLOCK_T], float("-inf"), tl.float32), axis=0)
        l_i = tl.sum(tl.zeros([BLOCK_T], tl.float32), axis=0)
        acc = tl.zeros([DP], tl.float32)
        st = tl.zeros([8], tl.float32)
        for t0 in range(0, T, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            tmask = offs_t < valid
            kv_mask = tmask[:, None] & dmask[None, :]
            k = tl.load(K + b * skb + kvh * skh + offs_t[:, None] * skt + offs_d[None, :] * skd, mask=kv_mask,
                        other=0.0).to(tl.float32)
            s = tl.sum(k * q[None, :], axis=1)
            flag = tl.load(FLAG + offs_t, mask=offs_t < TP, other=0.0)
            if MULT:
                s = s + flag * boost
            else:
                s = s + flag * boost * tl.abs(s)
            s = tl.where(tmask, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=0))
            p = tl.exp(s - m_new)
            corr = tl.exp(m_i - m_new)
            l_i = l_i * corr + tl.sum(p, axis=0)
            v = tl.load(V + b * svb + kvh * svh + offs_t[:, None] * svt + offs_d[None, :] * svd, mask=kv_mask,
                        other=0.0).to(tl.float32)
            acc = acc * corr + tl.sum(p[:, None] * v, axis=0)
            if WITH_STATS:
                in_prompt = offs_t < TP
                wv = tl.load(W + offs_t[:, None] * swt + offs_j[None, :], mask=in_prompt[:, None], other=0.0)
                wv = tl.where((offs_t >= TP)[:, None] & (offs_j == 4)[None, :], 1.0, wv)
                st = st * corr + tl.sum(p[:, None] * wv, axis=0)
            m_i = m_new
        tl.store(OUT + b * sob + h * soh + offs_d, (acc / l_i).to(OUT.dtype.element_ty), mask=dmask)
        if WITH_STATS:
            tl.store(STATS + b * ssb + h * ssh + offs_j, st / l_i)

    _DECODE_KERNEL = asd_decode_attention
    return _DECODE_KERNEL


def _triton_ready(query: torch.Tensor) -> bool:
    if not query.is_cuda or query.shape[2] != 1 or query.shape[-1] > 256:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def decode_attention(
    query: Float[torch.Tensor, "batch heads 1 dim"],
    key: Float[torch.Tensor, "batch kv_heads keys dim"],
    value: Float[torch.Tensor, "batch kv_heads keys dim"],
    scale: float,
    flag: Float[torch.Tensor, "prompt"],
    boost: Float[torch.Tensor, "batch"],
    weights: Float[torch.Tensor, "prompt 8"],
    multiplicative: bool = False,
    backend: str = "auto",
    length: torch.Tensor | None = None,
) -> tuple[Float[torch.Tensor, "batch 1 heads dim"], Float[torch.Tensor, "batch heads 8"]]:
    """One query row per batch entry against the cached keys, with the ASD boost and statistics.

    ``query [B, heads, 1, d]``, ``key``/``value [B, kv_heads, T, d]``; ``flag [TP]`` marks the
    boosted key columns (1.0) among the first ``TP`` keys; ``boost [B]`` is each row's
    ``alpha`` (0 for the unguided row; ``log1p(alpha)`` when ``multiplicative``);
    ``weights [TP, 8]`` weight the probabilities into 8 sums (column 4 also counts every key
    from ``TP`` on). Returns the output ``[B, 1, heads, d]`` (query dtype) and the sums
    ``[B, heads, 8]`` (float32). ``backend``: "auto" (Triton on CUDA), "triton" or "torch".
    ``length``: a 0-d device tensor, the number of valid keys (a static cache longer than its
    fill); keys from there on are ignored, read on the device (no host sync).

    >>> q, k, v = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    >>> flag = torch.tensor([0, 1, 1, 0, 0.0]); w = torch.zeros(5, 8); w[1:3, 0] = 0.5
    >>> out, sums = decode_attention(q, k, v, 0.3, flag, torch.tensor([0.0, 0.2]), w)
    >>> ref, probs = boosted_attention(q, k, v, 0.3, batch=[1], columns=torch.tensor([1, 2]), alpha=0.2)
    >>> torch.allclose(out, ref, atol=1e-6), torch.allclose(sums[..., 0], probs[:, :, 0, 1:3].mean(-1), atol=1e-6)
    (True, True)
    """
    b, h, n, d = query.shape
    if n != 1:
        raise InputError(f"decode_attention takes one query row, got {n}")
    tk, tp = key.shape[2], flag.shape[0]
    use_triton = backend == "triton" or (backend == "auto" and _triton_ready(query))
    if use_triton:
        import triton

        kernel = _decode_kernel()
        out = torch.empty(b, 1, h, d, dtype=query.dtype, device=query.device)
        sums = torch.empty(b, h, 8, dtype=torch.float32, device=query.device)
        weights = weights.contiguous()
        kernel[(b * h,)](
            query, key, value, out, flag, boost, weights, sums, sums if length is None else length,
            query.stride(0), query.stride(1), query.stride(3), key.stride(0), key.stride(1), key.stride(2),
            key.stride(3), value.stride(0), value.stride(1), value.stride(2), value.stride(3),
            out.stride(0), out.stride(2), weights.stride(0), sums.stride(0), sums.stride(1),
            tk, tp, h, h // key.shape[1], float(scale),
            D=d, DP=triton.next_power_of_2(max(d, 16)), BLOCK_T=64, MULT=bool(multiplicative), WITH_STATS=True,
            HAS_LEN=length is not None, num_warps=4,
        )
        return out, sums
    kv = key.shape[1]
    logits = torch.matmul(query.float().reshape(b, kv, h // kv, d), key.float().transpose(-1, -2)).view(b, h, tk)
    logits = logits * scale
    bonus = flag.to(logits.dtype)[None, None, :] * boost.to(logits.dtype)[:, None, None]
    head = logits[..., :tp]
    head = head + boost_bias(head, bonus, "multiplicative" if multiplicative else "pre_softmax")
    logits = torch.cat([head, logits[..., tp:]], dim=-1)
    if length is not None:
        logits = logits.masked_fill(torch.arange(tk, device=logits.device) >= length, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    out = torch.matmul(probs.view(b, kv, h // kv, tk), value.float()).view(b, 1, h, d)
    full = torch.zeros(tk, 8, dtype=torch.float32, device=query.device)
    full[:tp] = weights.float()
    full[tp:, 4] = 1.0
    return out.to(query.dtype), probs @ full
