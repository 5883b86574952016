"""Flash-attention forward in Triton: dense (causal or not) and block-sparse over key-tile lists, with sinks.

Layout: q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D), last dim contiguous. Causal is bottom-right aligned:
query i sees key j iff j <= i + (Sk - Sq). Scores are kept in base 2 (scale folded with log2 e); the stored
LSE is natural-log and includes the sink term e^{s_h}. Rows that see no key and have no sink get out 0 and
LSE -inf.

Opt-in load path (SINKFREE_ATTN_TMA=1, dense only): the launcher passes host tensor descriptors of q, k, v over
their 4-D (B, H, S, D) shapes, and configs with USE_TMA load the Q block and each K/V block by TMA (descriptor
loads, zero-filled past S per head, so blocks never read the next head); WARP_SPEC additionally asks Triton to
warp-specialize the key loops (a producer warp issuing the TMA loads). Masks are unchanged: keys past Sk load as
zeros and are still masked to -inf on the last block (not EVEN_N).
"""

import triton
import triton.language as tl

from ._common import (causal_full_end, causal_key_end, head_base, key_tile_end, query_program, row_major_ptrs, sink_start,
                      softmax_step, store_out_lse, tile_list, tile_pair_cols, transposed_ptrs, visible)
from ._tuning import EVEN_HEURISTICS, make_configs, make_pair_configs, make_pruner, make_tma_configs, with_tma_configs
from ._tuning import tma_block_shapes  # noqa: F401  (the descriptor configs' pre_hook; tests import it from here)

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


FWD_POINTER_CONFIGS = make_configs([(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2), (64, 64, 4, 3)])
# (BLOCK_M, BLOCK_N, warps, stages, warp_specialize); the pruning keeps them only for dense launches with descriptors
FWD_TMA_CONFIGS = make_tma_configs([(128, 64, 8, 3, False), (128, 128, 8, 2, False), (128, 64, 4, 3, False)])
# Warp-specialized configs: not autotuned. On an H200 (2026-11-27) the autotuner's first one, 128x64x4x3,
# did not finish (compile or run) within 170 s and stalled the benchmark; force them only to experiment.
FWD_WS_CONFIGS = make_tma_configs([(128, 64, 4, 3, True), (128, 64, 4, 2, True), (128, 128, 4, 2, True)])
# (The variant with descriptors built in the kernel, SINKFREE_ATTN_TMA=ws, was removed: its first config hit an
# illegal memory access on an H200, 2026-11-27; kernels/NOTES.md, git history at 3b133df.)
# Sparse 64-token tiles gathered two per key block (PAIR, BLOCK_N = 2 x TILE_N): one 128-wide dot pair and one
# softmax rescale per two tiles instead of per tile; the pruning keeps them only where BLOCK_N == 2 x TILE_N
FWD_PAIR_SPECS = [(64, 128, 4, 2), (64, 128, 8, 2), (64, 128, 4, 3)]
FWD_PAIR_CONFIGS = make_pair_configs(FWD_PAIR_SPECS)
FWD_CONFIGS = with_tma_configs(FWD_POINTER_CONFIGS, FWD_TMA_CONFIGS) + FWD_PAIR_CONFIGS


@triton.jit
def _fwd_block(acc, l_i, m_i, q, k_ptrs, v_ptrs, start_n, offs_m, offs_n, Sk, kend, off, qk_scale,
               MASK: tl.constexpr, CAUSAL: tl.constexpr, LOAD_N: tl.constexpr, PREC: tl.constexpr,
               stride_kn, stride_vn, USE_TMA: tl.constexpr = False, DescK=None, DescV=None, b=0, hk=0,
               BLOCK_N: tl.constexpr = 0, HEAD_DIM: tl.constexpr = 0):
    """One BLOCK_N slice of keys: scores, online-softmax update, P @ V into acc. USE_TMA: K and V come by
    descriptor loads of head (b, hk) (rows past Sk zero-filled, so LOAD_N masks nothing there)."""
    cols = start_n + offs_n
    if USE_TMA:
        k = DescK.load([b, hk, start_n, 0]).reshape(BLOCK_N, HEAD_DIM).T
    elif LOAD_N:
        k = tl.load(k_ptrs + start_n * stride_kn, mask=cols[None, :] < Sk, other=0.0)
    else:
        k = tl.load(k_ptrs + start_n * stride_kn)
    qk = tl.dot(q, k, input_precision=PREC) * qk_scale  # (BLOCK_M, BLOCK_N), base 2
    if MASK:
        qk = tl.where(visible(cols[None, :], offs_m[:, None], kend, off, CAUSAL), qk, float("-inf"))
    p, alpha, l_i, m_new = softmax_step(qk, m_i, l_i)
    acc = acc * alpha[:, None]
    if USE_TMA:
        v = DescV.load([b, hk, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
    elif LOAD_N:
        v = tl.load(v_ptrs + start_n * stride_vn, mask=cols[:, None] < Sk, other=0.0)
    else:
        v = tl.load(v_ptrs + start_n * stride_vn)
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PREC)
    return acc, l_i, m_new


@triton.jit
def _fwd_cols(acc, l_i, m_i, q, k_base, v_base, cols, col_ok, kend, offs_m, offs_d, off, qk_scale,
              CAUSAL: tl.constexpr, PREC: tl.constexpr, skn, svn):
    """_fwd_block over gathered key columns `cols` (BLOCK_N,) of one head: col_ok marks real columns (an absent
    second tile, keys past Sk), kend (BLOCK_N,) each column's tile end (padded tiles)."""
    k = tl.load(k_base + cols[None, :] * skn + offs_d[:, None], mask=col_ok[None, :], other=0.0)
    qk = tl.dot(q, k, input_precision=PREC) * qk_scale
    qk = tl.where(col_ok[None, :] & visible(cols[None, :], offs_m[:, None], kend[None, :], off, CAUSAL), qk,
                  float("-inf"))
    p, alpha, l_i, m_new = softmax_step(qk, m_i, l_i)
    acc = acc * alpha[:, None]
    v = tl.load(v_base + cols[:, None] * svn + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PREC)
    return acc, l_i, m_new


@triton.autotune(
    configs=FWD_CONFIGS,
    key=["SEQ_KEY", "HEAD_DIM", "CAUSAL", "SPARSE", "TILE_M", "TILE_N", "HAS_KLEN", "HAS_DESC"],
    prune_configs_by={"early_config_prune": make_pruner("fwd")},
)
@triton.heuristics(EVEN_HEURISTICS)
@triton.jit
def _attn_fwd(
    Q, K, V, Out, Lse, Sink, QIdx, QCnt, KLen, DescQ, DescK, DescV,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
    sib, sih, siq, scb, sch,
    H, GROUP, Sq, Sk, qk_scale, SEQ_KEY,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, SPARSE: tl.constexpr, HAS_SINK: tl.constexpr,
    HAS_KLEN: tl.constexpr, TILE_M: tl.constexpr, TILE_N: tl.constexpr, PREC: tl.constexpr,
    HAS_DESC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
    USE_TMA: tl.constexpr = False, WARP_SPEC: tl.constexpr = False, PAIR: tl.constexpr = False,
):
    # DescQ/K/V: tensor descriptors of q, k, v when HAS_DESC (else the tensors again, unused); USE_TMA (a config
    # flag, only with HAS_DESC on dense launches) loads through them. PAIR (sparse, BLOCK_N == 2 * TILE_N): two
    # list entries per key block, gathered.
    tl.static_assert(not PAIR or (SPARSE and BLOCK_N == 2 * TILE_N))
    tl.static_assert(not USE_TMA or (HAS_DESC and not SPARSE))
    tl.static_assert(not WARP_SPEC or USE_TMA)
    pid_bh, b, h, hk, _, m0, offs_m, offs_n, offs_d = query_program(H, GROUP, BLOCK_M, BLOCK_N, HEAD_DIM)
    q_ptrs = row_major_ptrs(head_base(Q, b, h, sqb, sqh), offs_m, sqm, offs_d)
    if USE_TMA:
        q = DescQ.load([b, h, m0, 0]).reshape(BLOCK_M, HEAD_DIM)
    elif EVEN_M:
        q = tl.load(q_ptrs)
    else:
        q = tl.load(q_ptrs, mask=offs_m[:, None] < Sq, other=0.0)
    # K is read transposed, (HEAD_DIM, BLOCK_N); V as (BLOCK_N, HEAD_DIM)
    k_ptrs = transposed_ptrs(head_base(K, b, hk, skb, skh), offs_n, skn, offs_d)
    v_ptrs = row_major_ptrs(head_base(V, b, hk, svb, svh), offs_n, svn, offs_d)

    s2 = 0.0
    if HAS_SINK:
        s2 = tl.load(Sink + h).to(tl.float32) * 1.4426950408889634
    m_i, l_i = sink_start(s2, BLOCK_M, HAS_SINK)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    off = Sk - Sq

    if PAIR:
        idx_ptr, cnt = tile_list(QIdx, QCnt, b, h, m0 // TILE_M, sib, sih, siq, scb, sch)
        k_base = head_base(K, b, hk, skb, skh)
        v_base = head_base(V, b, hk, svb, svh)
        for t in range(0, cnt, 2):
            cols, col_ok, kend = tile_pair_cols(idx_ptr, t, cnt, KLen, Sk, offs_n, TILE_N, HAS_KLEN)
            acc, l_i, m_i = _fwd_cols(acc, l_i, m_i, q, k_base, v_base, cols, col_ok, kend, offs_m, offs_d, off,
                                      qk_scale, CAUSAL, PREC, skn, svn)
    elif SPARSE:
        idx_ptr, cnt = tile_list(QIdx, QCnt, b, h, m0 // TILE_M, sib, sih, siq, scb, sch)
        for t in range(0, cnt):
            kt = tl.load(idx_ptr + t)
            kend = key_tile_end(KLen, kt, Sk, TILE_N, HAS_KLEN)
            for sub in tl.static_range(TILE_N // BLOCK_N):
                acc, l_i, m_i = _fwd_block(
                    acc, l_i, m_i, q, k_ptrs, v_ptrs, kt * TILE_N + sub * BLOCK_N, offs_m, offs_n, Sk, kend,
                    off, qk_scale, (CAUSAL or HAS_KLEN) or (not EVEN_N), CAUSAL, not EVEN_N, PREC, skn, svn)
    elif WARP_SPEC:
        # one warp-specialized loop over every key block, masked throughout when causal or S is ragged: Triton
        # 3.6's sm_90 warp specialization (NVGPUWarpSpecialization) fails (dominance assert) on a kernel with a
        # second key loop after the specialized one, so the two-loop split below is not available here
        hi = Sk
        if CAUSAL:
            hi = causal_key_end(m0, off, Sk, BLOCK_M)
        for start_n in tl.range(0, hi, BLOCK_N, warp_specialize=True):
            acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, k_ptrs, v_ptrs, start_n, offs_m, offs_n, Sk, Sk,
                                       off, qk_scale, CAUSAL or (not EVEN_N), CAUSAL, False, PREC, skn, svn,
                                       USE_TMA, DescK, DescV, b, hk, BLOCK_N, HEAD_DIM)
    else:
        if CAUSAL:
            full_end = causal_full_end(m0, off, BLOCK_N)
            hi = causal_key_end(m0, off, Sk, BLOCK_M)
        else:
            full_end = Sk
            hi = Sk
        if not EVEN_N:
            full_end = tl.minimum(full_end, (Sk // BLOCK_N) * BLOCK_N)
        for start_n in range(0, full_end, BLOCK_N):
            acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, k_ptrs, v_ptrs, start_n, offs_m, offs_n, Sk, Sk,
                                       off, qk_scale, False, CAUSAL, False, PREC, skn, svn,
                                       USE_TMA, DescK, DescV, b, hk, BLOCK_N, HEAD_DIM)
        for start_n in range(full_end, hi, BLOCK_N):
            acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, k_ptrs, v_ptrs, start_n, offs_m, offs_n, Sk, Sk,
                                       off, qk_scale, True, CAUSAL, not EVEN_N, PREC, skn, svn,
                                       USE_TMA, DescK, DescV, b, hk, BLOCK_N, HEAD_DIM)

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    store_out_lse(Out, Lse, out, lse, b, h, pid_bh, offs_m, offs_d, sob, soh, som, Sq, EVEN_M)
