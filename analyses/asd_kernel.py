"""ASD's decode attention: boost, softmax, output and statistics in one kernel (Triton on CUDA, torch elsewhere)."""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float

from interventions.attention_edits import boost_bias, boosted_attention  # noqa: F401  (the doctest's reference)
from interventions.attention_math import grouped_logits, grouped_values
from nnsight_av.errors import InputError

__all__ = ["decode_attention"]

# ---------------------------------------------------------------------------------------
# decode attention on the GPU: one kernel for boost, softmax, output and statistics
# ---------------------------------------------------------------------------------------
_DECODE_KERNEL: Any = None

#: Most key splits of the decode kernel (flash-decoding): the partial results of one (row, head) are
#: combined by a second kernel that holds them all in registers.
MAX_SPLITS = 32


def _decode_kernel() -> Any:
    """Build (once) the Triton kernels for one query row per (batch, head) over the cached keys.

    Flash-decoding: the keys are cut into up to `MAX_SPLITS` chunks, one program per (batch, head,
    chunk) (a single program per head walked ~30 key blocks one after another, latency-bound,
    while a GPU has room for many more programs). Each program runs an online softmax over its
    blocks; on the way it adds ``alpha[b] * flag[t] * |a|`` (or ``alpha[b] * flag[t]``) to the
    logits of flagged key columns, and accumulates the unnormalised probability mass on 8 weighted
    column sets (``W``; keys past the prompt count in set 4, the text mass). The second kernel
    rescales the chunks' partial sums to their common maximum and normalises. Replaces the ~12
    small torch kernels of the written-out attention.
    """
    global _DECODE_KERNEL
    if _DECODE_KERNEL is not None:
        return _DECODE_KERNEL
    import triton
    import triton.language as tl

    @triton.jit
    def asd_decode_partial(
        Q, K, V, FLAG, ALPHA, W, LEN, PM, PL, PACC, PST,
        sqb, sqh, sqd, skb, skh, skt, skd, svb, svh, svt, svd, swt,
        T, TP, H, GQA, S, CHUNK, scale,
        D: tl.constexpr, DP: tl.constexpr, BLOCK_T: tl.constexpr, MULT: tl.constexpr, HAS_LEN: tl.constexpr,
    ):
        pid = tl.program_id(0)
        split = tl.program_id(1)
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
        # a finite start: a chunk wholly past the fill level keeps m = -1e30, l = 0 (weight 0 when combined)
        m_i = tl.max(tl.full([BLOCK_T], -1.0e30, tl.float32), axis=0)
        l_i = tl.sum(tl.zeros([BLOCK_T], tl.float32), axis=0)
        acc = tl.zeros([DP], tl.float32)
        st = tl.zeros([8], tl.float32)
        first = split * CHUNK
        for t0 in range(first, first + CHUNK, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            tmask = (offs_t < valid) & (offs_t < first + CHUNK)
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
            in_prompt = offs_t < TP
            wv = tl.load(W + offs_t[:, None] * swt + offs_j[None, :], mask=in_prompt[:, None], other=0.0)
            wv = tl.where((offs_t >= TP)[:, None] & (offs_j == 4)[None, :], 1.0, wv)
            st = st * corr + tl.sum(p[:, None] * wv, axis=0)
            m_i = m_new
        row = pid * S + split
        tl.store(PM + row, m_i)
        tl.store(PL + row, l_i)
        tl.store(PACC + row * DP + offs_d, acc)
        tl.store(PST + row * 8 + offs_j, st)

    @triton.jit
    def asd_decode_combine(
        PM, PL, PACC, PST, OUT, STATS, sob, soh, ssb, ssh, H, S,
        D: tl.constexpr, DP: tl.constexpr, SP: tl.constexpr,
    ):
        pid = tl.program_id(0)
        b = pid // H
        h = pid % H
        offs_s = tl.arange(0, SP)
        smask = offs_s < S
        offs_d = tl.arange(0, DP)
        offs_j = tl.arange(0, 8)
        rows = pid * S + offs_s
        m = tl.load(PM + rows, mask=smask, other=float("-inf"))
        weight = tl.exp(m - tl.max(m, axis=0))
        l_sum = tl.sum(tl.load(PL + rows, mask=smask, other=0.0) * weight, axis=0)
        acc = tl.load(PACC + rows[:, None] * DP + offs_d[None, :], mask=smask[:, None], other=0.0)
        acc = tl.sum(acc * weight[:, None], axis=0)
        st = tl.load(PST + rows[:, None] * 8 + offs_j[None, :], mask=smask[:, None], other=0.0)
        st = tl.sum(st * weight[:, None], axis=0)
        tl.store(OUT + b * sob + h * soh + offs_d, (acc / l_sum).to(OUT.dtype.element_ty), mask=offs_d < D)
        tl.store(STATS + b * ssb + h * ssh + offs_j, st / l_sum)

    _DECODE_KERNEL = (asd_decode_partial, asd_decode_combine)
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
    query: Float[torch.Tensor, "batch heads 1 head_dim"],
    key: Float[torch.Tensor, "batch kv_heads keys head_dim"],
    value: Float[torch.Tensor, "batch kv_heads keys head_dim"],
    scale: float,
    flag: Float[torch.Tensor, "seq"],
    boost: Float[torch.Tensor, "batch"],
    weights: Float[torch.Tensor, "seq 8"],
    multiplicative: bool = False,
    backend: str = "auto",
    length: torch.Tensor | None = None,
) -> tuple[Float[torch.Tensor, "batch 1 heads head_dim"], Float[torch.Tensor, "batch heads 8"]]:
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

        partial, combine = _decode_kernel()
        block_t = 64
        splits = min(MAX_SPLITS, triton.cdiv(tk, block_t))
        chunk = triton.cdiv(triton.cdiv(tk, splits), block_t) * block_t
        splits = triton.cdiv(tk, chunk)
        dp = triton.next_power_of_2(max(d, 16))
        out = torch.empty(b, 1, h, d, dtype=query.dtype, device=query.device)
        sums = torch.empty(b, h, 8, dtype=torch.float32, device=query.device)
        part_m = torch.empty(b * h, splits, dtype=torch.float32, device=query.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty(b * h, splits, dp, dtype=torch.float32, device=query.device)
        part_st = torch.empty(b * h, splits, 8, dtype=torch.float32, device=query.device)
        weights = weights.contiguous()
        partial[(b * h, splits)](
            query, key, value, flag, boost, weights, part_m if length is None else length,
            part_m, part_l, part_acc, part_st,
            query.stride(0), query.stride(1), query.stride(3), key.stride(0), key.stride(1), key.stride(2),
            key.stride(3), value.stride(0), value.stride(1), value.stride(2), value.stride(3), weights.stride(0),
            tk, tp, h, h // key.shape[1], splits, chunk, float(scale),
            D=d, DP=dp, BLOCK_T=block_t, MULT=bool(multiplicative), HAS_LEN=length is not None, num_warps=4,
        )
        combine[(b * h,)](
            part_m, part_l, part_acc, part_st, out, sums, out.stride(0), out.stride(2), sums.stride(0),
            sums.stride(1), h, splits, D=d, DP=dp, SP=triton.next_power_of_2(splits), num_warps=4,
        )
        return out, sums
    logits = grouped_logits(query, key, scale).view(b, h, tk)
    bonus = flag.to(logits.dtype)[None, None, :] * boost.to(logits.dtype)[:, None, None]
    head = logits[..., :tp]
    head = head + boost_bias(head, bonus, "multiplicative" if multiplicative else "pre_softmax")
    logits = torch.cat([head, logits[..., tp:]], dim=-1)
    if length is not None:
        logits = logits.masked_fill(torch.arange(tk, device=logits.device) >= length, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    out = grouped_values(probs.view(b, h, 1, tk), value).view(b, 1, h, d)
    full = torch.zeros(tk, 8, dtype=torch.float32, device=query.device)
    full[:tp] = weights.float()
    full[tp:, 4] = 1.0
    return out.to(query.dtype), probs @ full
