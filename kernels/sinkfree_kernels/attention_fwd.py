"""Flash-attention forward in Triton: dense (causal or not) and block-sparse over key-tile lists, with sinks.

Layout: q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D), last dim contiguous. Causal is bottom-right aligned:
query i sees key j iff j <= i + (Sk - Sq). Scores are kept in base 2 (scale folded with log2 e); the stored
LSE is natural-log and includes the sink term e^{s_h}. Rows that see no key and have no sink get out 0 and
LSE -inf.
"""

import triton
import triton.language as tl

from ._tuning import EVEN_HEURISTICS, make_configs, make_pruner

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

FWD_CONFIGS = make_configs([(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2), (64, 64, 4, 3)])


@triton.jit
def _fwd_block(acc, l_i, m_i, q, k_ptrs, v_ptrs, start_n, offs_m, offs_n, Sk, kend, off, qk_scale,
               MASK: tl.constexpr, CAUSAL: tl.constexpr, LOAD_N: tl.constexpr, PREC: tl.constexpr,
               stride_kn, stride_vn):
    """One BLOCK_N slice of keys: scores, online-softmax update, P @ V into acc."""
    cols = start_n + offs_n
    if LOAD_N:
        k = tl.load(k_ptrs + start_n * stride_kn, mask=cols[None, :] < Sk, other=0.0)
    else:
        k = tl.load(k_ptrs + start_n * stride_kn)
    qk = tl.dot(q, k, input_precision=PREC) * qk_scale  # (BLOCK_M, BLOCK_N), base 2
    if MASK:
        keep = cols[None, :] < kend
        if CAUSAL:
            keep = keep & (cols[None, :] <= offs_m[:, None] + off)
        qk = tl.where(keep, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    p = tl.math.exp2(qk - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if LOAD_N:
        v = tl.load(v_ptrs + start_n * stride_vn, mask=cols[:, None] < Sk, other=0.0)
    else:
        v = tl.load(v_ptrs + start_n * stride_vn)
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PREC)
    return acc, l_i, m_new


@triton.autotune(
    configs=FWD_CONFIGS,
    key=["SEQ_KEY", "HEAD_DIM", "CAUSAL", "SPARSE", "TILE_M", "TILE_N", "HAS_KLEN"],
    prune_configs_by={"early_config_prune": make_pruner("fwd")},
)
@triton.heuristics(EVEN_HEURISTICS)
@triton.jit
def _attn_fwd(
    Q, K, V, Out, Lse, Sink, QIdx, QCnt, KLen,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
    sib, sih, siq, scb, sch,
    H, GROUP, Sq, Sk, qk_scale, SEQ_KEY,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, SPARSE: tl.constexpr, HAS_SINK: tl.constexpr,
    HAS_KLEN: tl.constexpr, TILE_M: tl.constexpr, TILE_N: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + offs_m[:, None] * sqm + offs_d[None, :]
    if EVEN_M:
        q = tl.load(q_ptrs)
    else:
        q = tl.load(q_ptrs, mask=offs_m[:, None] < Sq, other=0.0)
    # K is read transposed, (HEAD_DIM, BLOCK_N); V as (BLOCK_N, HEAD_DIM)
    k_ptrs = K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh + offs_n[None, :] * skn + offs_d[:, None]
    v_ptrs = V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh + offs_n[:, None] * svn + offs_d[None, :]

    # the sink joins the online softmax as its first column (value 0); the running max is floored at
    # -1e30 so exp2(m_old - m_new) stays finite on rows that see no key
    if HAS_SINK:
        s2 = tl.load(Sink + h).to(tl.float32) * 1.4426950408889634
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.maximum(s2, -1.0e30)
        l_i = tl.math.exp2(s2 - m_i)
    else:
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    off = Sk - Sq

    if SPARSE:
        qt = m0 // TILE_M
        cnt = tl.load(QCnt + b * scb + h * sch + qt)
        idx_ptr = QIdx + b.to(tl.int64) * sib + h.to(tl.int64) * sih + qt * siq
        for t in range(0, cnt):
            kt = tl.load(idx_ptr + t)
            kend = Sk
            if HAS_KLEN:
                kend = tl.minimum(kt * TILE_N + tl.load(KLen + kt), Sk)
            for sub in tl.static_range(TILE_N // BLOCK_N):
                acc, l_i, m_i = _fwd_block(
                    acc, l_i, m_i, q, k_ptrs, v_ptrs, kt * TILE_N + sub * BLOCK_N, offs_m, offs_n, Sk, kend,
                    off, qk_scale, (CAUSAL or HAS_KLEN) or (not EVEN_N), CAUSAL, not EVEN_N, PREC, skn, svn)
    else:
        if CAUSAL:
            full_end = (tl.maximum(m0 + off + 1, 0) // BLOCK_N) * BLOCK_N
            hi = tl.minimum(m0 + BLOCK_M + off, Sk)
        else:
            full_end = Sk
            hi = Sk
        if not EVEN_N:
            full_end = tl.minimum(full_end, (Sk // BLOCK_N) * BLOCK_N)
        for start_n in range(0, full_end, BLOCK_N):
            acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, k_ptrs, v_ptrs, start_n, offs_m, offs_n, Sk, Sk,
                                       off, qk_scale, False, CAUSAL, False, PREC, skn, svn)
        for start_n in range(full_end, hi, BLOCK_N):
            acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, k_ptrs, v_ptrs, start_n, offs_m, offs_n, Sk, Sk,
                                       off, qk_scale, True, CAUSAL, not EVEN_N, PREC, skn, svn)

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    o_ptrs = Out + b.to(tl.int64) * sob + h.to(tl.int64) * soh + offs_m[:, None] * som + offs_d[None, :]
    lse_ptrs = Lse + pid_bh.to(tl.int64) * Sq + offs_m
    if EVEN_M:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty))
        tl.store(lse_ptrs, lse)
    else:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=offs_m[:, None] < Sq)
        tl.store(lse_ptrs, lse, mask=offs_m < Sq)
