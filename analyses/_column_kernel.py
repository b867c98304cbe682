"""The Triton kernel behind `analyses.column_math.column_sums`: it fuses logits, probabilities and the row-group sums.

Flash attention with the roles turned around: one program owns a block of columns
(the "queries" ``k_S``) of one (batch, head) and walks the query rows after its first
column (the "keys"), with the row normalisers known, so no online softmax. The
"values" are a one-hot of each row's group, so ``P @ onehot`` on the tensor cores
gives the per-group sums (probabilities in float16 and float32 accumulation for half
inputs; exact float32 for float32 inputs). The causal mask is applied only on the
tiles that cross the diagonal.

The second product is only 16 wide, so by throughput the exponentials cost as much as
the first product. ``FMA_EXP`` computes every other exponential of a tile with a
polynomial on the FMA units (relative error 1e-4, below the float16 rounding of the
probabilities), half inputs only; on an H200 it is 10-40% slower (the kernel is bound by
latency there), so it is off by default. ``REVERSE`` walks the rows from the end, so that
the programs of a head that run at the same time read the same query tiles (L2 hits);
with ``HEADS_FIRST`` the longest programs (the first column block of every head) start
first. The options and tiles are chosen in `analyses.column_math.TRITON_CONFIG`.
"""

import triton
import triton.language as tl


@triton.jit
def _exp2_fma(x):
    # 2**x as 2**floor(x) (in the exponent bits) times a cubic in the fraction, exact at both ends
    # (relative error 1.03e-4, fitted minimax); x <= 0 here and the clamp keeps the bits a float.
    x = tl.maximum(x, -126.0)
    whole = tl.floor(x)
    f = x - whole
    mantissa = 1.0 + f * (0.6954244081524787 + f * (0.22630765272076778 + f * 0.07826793912675348))
    bits = mantissa.to(tl.int32, bitcast=True) + (whole.to(tl.int32) << 23)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _rows(Q, LSE, GRP, q_base, l_base, g_base, sqt, sqd, slt, sgt, offs_d, dmask, q0, T,
          BLOCK_Q: tl.constexpr, TRANS_Q: tl.constexpr):
    offs_q = q0 + tl.arange(0, BLOCK_Q)
    qmask = offs_q < T
    if TRANS_Q:
        q = tl.load(Q + q_base + offs_q[:, None] * sqt + offs_d[None, :] * sqd,
                    mask=qmask[:, None] & dmask[None, :], other=0.0)                 # [BLOCK_Q, DP]
        q_t = tl.trans(q)
    else:
        q_t = tl.load(Q + q_base + offs_q[None, :] * sqt + offs_d[:, None] * sqd,
                      mask=dmask[:, None] & qmask[None, :], other=0.0)              # [DP, BLOCK_Q]
    grp = tl.load(GRP + g_base + offs_q * sgt, mask=qmask, other=-1)
    # Rows outside every group (and past the end) get a huge lse, hence probability 0, never inf or nan.
    lse2 = tl.load(LSE + l_base + offs_q * slt, mask=qmask, other=1.0e30)
    lse2 = tl.where(grp >= 0, lse2, 1.0e30) * 1.4426950408889634
    return offs_q, q_t, grp, lse2


@triton.jit
def _sums(k_cols, cols, offs_q, q_t, grp, lse2, qk_scale, BLOCK_S: tl.constexpr, BLOCK_Q: tl.constexpr,
          GP: tl.constexpr, MASKED: tl.constexpr, STRICT: tl.constexpr, IEEE: tl.constexpr,
          FMA_EXP: tl.constexpr):
    if IEEE:
        logits = tl.dot(k_cols, q_t, input_precision="ieee")                        # [BLOCK_S, BLOCK_Q]
    else:
        logits = tl.dot(k_cols, q_t)
    x = logits * qk_scale - lse2[None, :]
    if FMA_EXP:
        # Neighbouring columns of the accumulator sit in one thread, so the split and join stay in registers.
        even, odd = tl.split(tl.reshape(x, [BLOCK_S, BLOCK_Q // 2, 2]))
        p = tl.reshape(tl.join(tl.exp2(even), _exp2_fma(odd)), [BLOCK_S, BLOCK_Q])
    else:
        p = tl.exp2(x)
    if MASKED:
        if STRICT:
            p = tl.where(offs_q[None, :] > cols[:, None], p, 0.0)
        else:
            p = tl.where(offs_q[None, :] >= cols[:, None], p, 0.0)
    onehot = grp[:, None] == tl.arange(0, GP)[None, :]                               # [BLOCK_Q, GP]
    if IEEE:
        return tl.dot(p, onehot.to(tl.float32), input_precision="ieee")
    return tl.dot(p.to(tl.float16), onehot.to(tl.float16))                        # [BLOCK_S, GP]


@triton.jit
def _tile(Q, LSE, GRP, q_base, l_base, g_base, sqt, sqd, slt, sgt, offs_d, dmask, q0, T, k_cols, cols, qk_scale,
          BLOCK_S: tl.constexpr, BLOCK_Q: tl.constexpr, GP: tl.constexpr, MASKED: tl.constexpr,
          STRICT: tl.constexpr, IEEE: tl.constexpr, FMA_EXP: tl.constexpr, TRANS_Q: tl.constexpr):
    offs_q, q_t, grp, lse2 = _rows(Q, LSE, GRP, q_base, l_base, g_base, sqt, sqd, slt, sgt, offs_d, dmask, q0, T,
                                   BLOCK_Q, TRANS_Q)
    return _sums(k_cols, cols, offs_q, q_t, grp, lse2, qk_scale, BLOCK_S, BLOCK_Q, GP, MASKED, STRICT, IEEE,
                 FMA_EXP)


@triton.jit
def column_sums_kernel(
    Q, K, LSE, COLS, GRP, OUT,
    sqb, sqh, sqt, sqd, skb, skh, skt, skd, slb, slh, slt, scb, scs, sgb, sgt, sob, soh, sog, sos,
    T, S, H, GQA, qk_scale,
    D: tl.constexpr, DP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_S: tl.constexpr,
    NUM_GROUPS: tl.constexpr, GP: tl.constexpr, STRICT: tl.constexpr, IEEE: tl.constexpr,
    FMA_EXP: tl.constexpr, TRANS_Q: tl.constexpr, REVERSE: tl.constexpr, HEADS_FIRST: tl.constexpr,
):
    if HEADS_FIRST:
        pid_bh = tl.program_id(0)
        pid_s = tl.program_id(1)
    else:
        pid_s = tl.program_id(0)
        pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    kvh = h // GQA
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    smask = offs_s < S
    cols = tl.load(COLS + b * scb + offs_s * scs, mask=smask, other=-1)
    col_ok = cols >= 0
    offs_d = tl.arange(0, DP)
    dmask = offs_d < D
    k_cols = tl.load(K + b * skb + kvh * skh + tl.where(col_ok, cols, 0)[:, None] * skt + offs_d[None, :] * skd,
                     mask=col_ok[:, None] & dmask[None, :], other=0.0)                # [BLOCK_S, DP]
    # Padding columns sit at T so that they never bound the row range below.
    cols = tl.where(col_ok, cols, T)
    lo = tl.min(cols, axis=0)
    hi = tl.max(tl.where(col_ok, cols, -1), axis=0)
    if STRICT:
        lo = lo + 1
        hi = hi + 1
    start = (lo // BLOCK_Q) * BLOCK_Q
    # Tiles from `start` up to the one holding row `hi` can hold rows before some column.
    split = tl.maximum(tl.minimum(((hi + BLOCK_Q - 1) // BLOCK_Q) * BLOCK_Q, T), start)
    n_masked = tl.cdiv(split - start, BLOCK_Q)      # the last tile may be partial (split == T)
    n_plain = tl.cdiv(T - split, BLOCK_Q)
    q_base = b * sqb + h * sqh
    l_base = b * slb + h * slh
    g_base = b * sgb
    acc = tl.zeros([BLOCK_S, GP], dtype=tl.float32)
    if REVERSE:
        for i in range(0, n_plain):
            acc += _tile(Q, LSE, GRP, q_base, l_base, g_base, sqt, sqd, slt, sgt, offs_d, dmask,
                         split + (n_plain - 1 - i) * BLOCK_Q, T, k_cols, cols, qk_scale,
                         BLOCK_S, BLOCK_Q, GP, False, STRICT, IEEE, FMA_EXP, TRANS_Q)
        for i in range(0, n_masked):
            acc += _tile(Q, LSE, GRP, q_base, l_base, g_base, sqt, sqd, slt, sgt, offs_d, dmask,
                         start + (n_masked - 1 - i) * BLOCK_Q, T, k_cols, cols, qk_scale,
                         BLOCK_S, BLOCK_Q, GP, True, STRICT, IEEE, FMA_EXP, TRANS_Q)
    else:
        for i in range(0, n_masked):
            acc += _tile(Q, LSE, GRP, q_base, l_base, g_base, sqt, sqd, slt, sgt, offs_d, dmask,
                         start + i * BLOCK_Q, T, k_cols, cols, qk_scale,
                         BLOCK_S, BLOCK_Q, GP, True, STRICT, IEEE, FMA_EXP, TRANS_Q)
        for i in range(0, n_plain):
            acc += _tile(Q, LSE, GRP, q_base, l_base, g_base, sqt, sqd, slt, sgt, offs_d, dmask,
                         split + i * BLOCK_Q, T, k_cols, cols, qk_scale,
                         BLOCK_S, BLOCK_Q, GP, False, STRICT, IEEE, FMA_EXP, TRANS_Q)
    acc = tl.where(col_ok[:, None], acc, 0.0)
    offs_g = tl.arange(0, GP)
    tl.store(OUT + b * sob + h * soh + offs_s[:, None] * sos + offs_g[None, :] * sog, acc,
             mask=smask[:, None] & (offs_g[None, :] < NUM_GROUPS))
