"""Flash-attention backward in Triton, deterministic (no atomics): a preprocess for delta = rowsum(dO*O) and
the sink partial sums, a key-major dK/dV kernel (each program owns a key block and walks the query blocks of
every query head of its GQA group), and a query-major dQ kernel. With the forward's LSE (sink included) the
usual flash backward is unchanged; the sink gradient is dsink_h = -sum_{b,i} exp(s_h - LSE_bhi) * delta_bhi.

Opt-in load path (SINKFREE_ATTN_TMA=1, dense only, as in the forward): the launcher passes host tensor
descriptors of q, k, v, dO over their 4-D (B, H, S, D) shapes; configs with USE_TMA load K, V (once per dK/dV
program, per key block in dQ) and Q, dO (per query block in dK/dV, once in dQ) by TMA, zero-filled past S per
head. LSE and delta stay pointer loads (masked past Sq: LSE +inf gives P = 0 there), masks are unchanged.
WARP_SPEC walks the query blocks of all heads of the group (dK/dV), resp. the key blocks (dQ), in a single
warp-specialized loop, masked throughout when causal (Triton 3.6 on sm_90 fails on a second loop).
"""

import triton
import triton.language as tl

from ._common import (causal_full_end, causal_key_end, causal_query_range, head_base, key_program, key_tile_end,
                      load_rows_f32, query_program, row_major_ptrs, row_program, store_dkdv, store_rows, tile_list,
                      tile_pair_cols, tile_pair_rows, tma_rows, transposed_ptrs, visible)
from ._tuning import EVEN_HEURISTICS, make_configs, make_pair_configs, make_pruner, make_tma_configs, with_tma_configs

# the first config the pruning keeps is the untuned default (SINKFREE_AUTOTUNE=0); the pruning drops configs whose
# estimated shared memory exceeds the device (_tuning.smem_estimate: sparse tiles walked in smaller blocks multiply it)
DKDV_POINTER_CONFIGS = make_configs([(64, 128, 8, 2), (64, 128, 8, 3), (32, 128, 4, 3), (64, 64, 4, 3),
                                     (32, 64, 4, 3), (128, 128, 8, 2)])
DQ_POINTER_CONFIGS = make_configs([(128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3),
                                   (64, 32, 4, 3)])
# (BLOCK_M, BLOCK_N, warps, stages, warp_specialize) of the descriptor path (SINKFREE_ATTN_TMA=1/only; the pruning
# keeps them only for dense launches with descriptors)
# Warp specialization (Triton 3.6, sm_90): a producer warp group plus two 4-warp consumers that split the dots' M
# (the key rows in dK/dV, the query rows in dQ) into 64-row halves; at M = 64 both consumers compute the whole
# block (duplicated tensor work), so only M = 128 is worth listing. dQ at BLOCK_M 128 fails to compile
# (NVGPUWarpSpecialization: "PassManager::run failed"), so dQ has no WS config; its WARP_SPEC branch stays for
# forced runs and a later Triton.
DKDV_TMA_CONFIGS = make_tma_configs([(64, 128, 8, 2, False), (64, 128, 8, 3, False), (64, 64, 4, 3, False),
                                     (32, 64, 4, 3, False)])
# Not autotuned: the forward's warp-specialized config stalled the H200 autotuner (attention_fwd.FWD_WS_CONFIGS).
DKDV_WS_CONFIGS = make_tma_configs([(64, 128, 4, 2, True)])
DQ_TMA_CONFIGS = make_tma_configs([(128, 64, 8, 2, False), (128, 64, 8, 3, False), (64, 64, 4, 3, False)])
# gathered query-tile pairs for sparse 64-token tiles: BLOCK_M = 2 x TILE_M rows from two entries of a key tile's
# (transposed) list, as the forward and dQ gather key tiles
DKDV_PAIR_SPECS = [(128, 64, 8, 2), (128, 64, 8, 3)]
DKDV_PAIR_CONFIGS = make_pair_configs(DKDV_PAIR_SPECS)  # 4 warps spill 0.9-1.1 KB at D 128
DKDV_CONFIGS = with_tma_configs(DKDV_POINTER_CONFIGS, DKDV_TMA_CONFIGS) + DKDV_PAIR_CONFIGS
# gathered tile pairs for sparse 64-token tiles, as in the forward (attention_fwd.FWD_PAIR_CONFIGS)
DQ_PAIR_SPECS = [(64, 128, 4, 2), (64, 128, 8, 2)]
DQ_PAIR_CONFIGS = make_pair_configs(DQ_PAIR_SPECS)
DQ_CONFIGS = with_tma_configs(DQ_POINTER_CONFIGS, DQ_TMA_CONFIGS) + DQ_PAIR_CONFIGS

_KEY = ["SEQ_KEY", "HEAD_DIM", "CAUSAL", "SPARSE", "TILE_M", "TILE_N", "HAS_KLEN", "ATOMIC_DQ", "HAS_DESC"]
_EVEN = EVEN_HEURISTICS


@triton.jit
def _bwd_preprocess(Out, DO, Lse, DLse, Sink, Delta, DSinkPart,
                    sob, soh, som, sdb, sdh, sdm, H, Sq, n_blocks,
                    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, HAS_SINK: tl.constexpr,
                    HAS_DLSE: tl.constexpr):
    pid_m, pid_bh, b, h, rows, offs_d, inb = row_program(H, Sq, BLOCK, HEAD_DIM)
    o = load_rows_f32(Out, b, h, sob, soh, som, rows, offs_d, inb)
    do = load_rows_f32(DO, b, h, sdb, sdh, sdm, rows, offs_d, inb)
    delta = tl.sum(o * do, 1)
    if HAS_DLSE:
        # d lse_i / d z_ij = p_ij: an upstream LSE gradient only shifts delta
        delta -= tl.load(DLse + pid_bh.to(tl.int64) * Sq + rows, mask=inb, other=0.0)
    tl.store(Delta + pid_bh.to(tl.int64) * Sq + rows, delta, mask=inb)
    if HAS_SINK:
        lse = tl.load(Lse + pid_bh.to(tl.int64) * Sq + rows, mask=inb, other=float("-inf"))
        s = tl.load(Sink + h).to(tl.float32)
        # rows with LSE -inf (no key, no sink) contribute nothing
        term = tl.exp(s - tl.where(lse == float("-inf"), float("inf"), lse)) * delta
        tl.store(DSinkPart + pid_bh * n_blocks + pid_m, tl.sum(term, 0))


@triton.jit
def _dkdv_block(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, start_m, offs_m, offs_n, offs_d,
                Sq, kend, off, qk_scale, sm_scale, sqm, sdom, sgqm,
                MASK: tl.constexpr, CAUSAL: tl.constexpr, LOAD_M: tl.constexpr, PREC: tl.constexpr,
                ATOMIC_DQ: tl.constexpr, USE_TMA: tl.constexpr = False, DescQ=None, DescDO=None, b=0, h=0,
                BLOCK_M: tl.constexpr = 0, HEAD_DIM: tl.constexpr = 0):
    """Accumulate one BLOCK_M slice of queries into the dK, dV of this key block (transposed scores); with
    ATOMIC_DQ also add this block's share of dQ into an fp32 buffer (5 matmuls instead of 7, not bitwise
    reproducible). USE_TMA: Q and dO of head (b, h) by descriptor loads (rows past Sq zero-filled, as the
    LOAD_M mask would)."""
    rows = start_m + offs_m
    q_ptrs = q_base + rows[:, None] * sqm + offs_d[None, :]
    do_ptrs = do_base + rows[:, None] * sdom + offs_d[None, :]
    if USE_TMA:
        q = tma_rows(DescQ, b, h, start_m, BLOCK_M, HEAD_DIM)
        do = tma_rows(DescDO, b, h, start_m, BLOCK_M, HEAD_DIM)
    elif LOAD_M:
        q = tl.load(q_ptrs, mask=rows[:, None] < Sq, other=0.0)
        do = tl.load(do_ptrs, mask=rows[:, None] < Sq, other=0.0)
    else:
        q = tl.load(q_ptrs)
        do = tl.load(do_ptrs)
    if LOAD_M:
        lse = tl.load(lse_base + rows, mask=rows < Sq, other=float("inf"))
        delta = tl.load(delta_base + rows, mask=rows < Sq, other=0.0)
    else:
        lse = tl.load(lse_base + rows)
        delta = tl.load(delta_base + rows)
    # rows that saw no key (LSE -inf) must give P = 0: treat their LSE as +inf
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    qkT = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale  # (BLOCK_N, BLOCK_M)
    pT = tl.math.exp2(qkT - lse2[None, :])
    if MASK:
        pT = tl.where(visible(offs_n[:, None], rows[None, :], kend, off, CAUSAL), pT, 0.0)
    dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PREC)
    dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
    dsT = pT * (dpT - delta[None, :])
    dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=PREC)
    if ATOMIC_DQ:
        dq = tl.dot(tl.trans(dsT.to(k.dtype)), k, input_precision=PREC) * sm_scale  # (BLOCK_M, HEAD_DIM)
        tl.atomic_add(dq_base + rows[:, None] * sgqm + offs_d[None, :], dq, mask=rows[:, None] < Sq,
                      sem="relaxed")
    return dk, dv


@triton.jit
def _dkdv_rows(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, rows, row_ok, offs_n, offs_d, kend,
               off, qk_scale, sm_scale, sqm, sdom, sgqm, CAUSAL: tl.constexpr, PREC: tl.constexpr,
               ATOMIC_DQ: tl.constexpr):
    """_dkdv_block over gathered query rows `rows` (BLOCK_M,) of one head; row_ok marks real rows (an absent
    second tile, rows past Sq)."""
    q = tl.load(q_base + rows[:, None] * sqm + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(do_base + rows[:, None] * sdom + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    lse = tl.load(lse_base + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    qkT = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale  # (BLOCK_N, BLOCK_M)
    pT = tl.math.exp2(qkT - lse2[None, :])
    pT = tl.where(row_ok[None, :] & visible(offs_n[:, None], rows[None, :], kend, off, CAUSAL), pT, 0.0)
    dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PREC)
    dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
    dsT = pT * (dpT - delta[None, :])
    dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=PREC)
    if ATOMIC_DQ:
        dq = tl.dot(tl.trans(dsT.to(k.dtype)), k, input_precision=PREC) * sm_scale
        tl.atomic_add(dq_base + rows[:, None] * sgqm + offs_d[None, :], dq, mask=row_ok[:, None], sem="relaxed")
    return dk, dv


@triton.jit
def _group_head(Q, DO, Lse, Delta, DQAcc, b, hk, g, H, GROUP, Sq, sqb, sqh, sdob, sdoh, sqab, sqah):
    """Query head g of kv head hk's GQA group: (h, Q, dO and dQ-accumulator bases, LSE and delta rows)."""
    h = hk * GROUP + g
    bh = b * H + h
    return (h, head_base(Q, b, h, sqb, sqh), head_base(DO, b, h, sdob, sdoh), Lse + bh.to(tl.int64) * Sq,
            Delta + bh.to(tl.int64) * Sq, head_base(DQAcc, b, h, sqab, sqah))


@triton.autotune(configs=DKDV_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": make_pruner("dkdv")},
                 reset_to_zero=["DQAcc"])
@triton.heuristics(_EVEN)
@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, Lse, Delta, DK, DV, DQAcc, KIdx, KCnt, KLen, DescQ, DescK, DescV, DescDO,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom, sgb, sgh, sgn, sqab, sqah, sqam,
    sib, sih, siq, scb, sch,
    H, HKV, GROUP, Sq, Sk, qk_scale, sm_scale, SEQ_KEY,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, SPARSE: tl.constexpr, HAS_KLEN: tl.constexpr,
    TILE_M: tl.constexpr, TILE_N: tl.constexpr, PREC: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    HAS_DESC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
    USE_TMA: tl.constexpr = False, WARP_SPEC: tl.constexpr = False, PAIR: tl.constexpr = False,
):
    # DescQ/K/V/DO: tensor descriptors of q, k, v, dO when HAS_DESC (else the tensors again, unused); USE_TMA (a
    # config flag, only with HAS_DESC on dense launches) loads through them. PAIR (sparse, BLOCK_M == 2 * TILE_M):
    # two entries of the key tile's query-tile list per query block, gathered.
    tl.static_assert(not PAIR or (SPARSE and BLOCK_M == 2 * TILE_M))
    tl.static_assert(not USE_TMA or (HAS_DESC and not SPARSE))
    tl.static_assert(not WARP_SPEC or USE_TMA)
    pid_bh, b, hk, n0, offs_n, offs_m, offs_d = key_program(HKV, BLOCK_M, BLOCK_N, HEAD_DIM)
    k_ptrs = row_major_ptrs(head_base(K, b, hk, skb, skh), offs_n, skn, offs_d)
    v_ptrs = row_major_ptrs(head_base(V, b, hk, svb, svh), offs_n, svn, offs_d)
    if USE_TMA:
        k = tma_rows(DescK, b, hk, n0, BLOCK_N, HEAD_DIM)
        v = tma_rows(DescV, b, hk, n0, BLOCK_N, HEAD_DIM)
    elif EVEN_N:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    else:
        k = tl.load(k_ptrs, mask=offs_n[:, None] < Sk, other=0.0)
        v = tl.load(v_ptrs, mask=offs_n[:, None] < Sk, other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    off = Sk - Sq
    kt = n0 // TILE_N
    kend = key_tile_end(KLen, kt, Sk, TILE_N, HAS_KLEN)

    if WARP_SPEC:
        # one warp-specialized loop over (query head of the group, query block), masked throughout when causal:
        # Triton 3.6's sm_90 warp specialization fails on a kernel with a second loop after the specialized one
        lo = 0
        if CAUSAL:
            lo, _ = causal_query_range(n0, off, BLOCK_M, BLOCK_N)
        n_m = tl.cdiv(Sq - lo, BLOCK_M)
        for it in tl.range(0, GROUP * n_m, warp_specialize=True):
            g = it // n_m
            h, q_base, do_base, lse_base, delta_base, dq_base = _group_head(
                Q, DO, Lse, Delta, DQAcc, b, hk, g, H, GROUP, Sq, sqb, sqh, sdob, sdoh, sqab, sqah)
            dk, dv = _dkdv_block(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base,
                                 lo + (it - g * n_m) * BLOCK_M, offs_m, offs_n, offs_d, Sq, kend, off, qk_scale,
                                 sm_scale, sqm, sdom, sqam, CAUSAL, CAUSAL, not EVEN_M, PREC, ATOMIC_DQ,
                                 USE_TMA, DescQ, DescDO, b, h, BLOCK_M, HEAD_DIM)
    else:
        for g in range(0, GROUP):
            h, q_base, do_base, lse_base, delta_base, dq_base = _group_head(
                Q, DO, Lse, Delta, DQAcc, b, hk, g, H, GROUP, Sq, sqb, sqh, sdob, sdoh, sqab, sqah)
            if PAIR:
                idx_ptr, cnt = tile_list(KIdx, KCnt, b, h, kt, sib, sih, siq, scb, sch)
                for t in range(0, cnt, 2):
                    rows, row_ok = tile_pair_rows(idx_ptr, t, cnt, Sq, offs_m, TILE_M)
                    dk, dv = _dkdv_rows(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, rows, row_ok,
                                        offs_n, offs_d, kend, off, qk_scale, sm_scale, sqm, sdom, sqam, CAUSAL,
                                        PREC, ATOMIC_DQ)
            elif SPARSE:
                idx_ptr, cnt = tile_list(KIdx, KCnt, b, h, kt, sib, sih, siq, scb, sch)
                for t in range(0, cnt):
                    qt = tl.load(idx_ptr + t)
                    for sub in tl.static_range(TILE_M // BLOCK_M):
                        dk, dv = _dkdv_block(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base,
                                             qt * TILE_M + sub * BLOCK_M, offs_m, offs_n, offs_d, Sq, kend, off,
                                             qk_scale, sm_scale, sqm, sdom, sqam, CAUSAL or HAS_KLEN, CAUSAL,
                                             not EVEN_M, PREC, ATOMIC_DQ)
            else:
                lo = 0
                mid = 0
                if CAUSAL:
                    lo, mid = causal_query_range(n0, off, BLOCK_M, BLOCK_N)
                    for start_m in range(lo, tl.minimum(mid, Sq), BLOCK_M):
                        dk, dv = _dkdv_block(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base,
                                             start_m, offs_m, offs_n, offs_d, Sq, kend, off, qk_scale, sm_scale,
                                             sqm, sdom, sqam, True, True, not EVEN_M, PREC, ATOMIC_DQ,
                                             USE_TMA, DescQ, DescDO, b, h, BLOCK_M, HEAD_DIM)
                for start_m in range(mid, Sq, BLOCK_M):
                    dk, dv = _dkdv_block(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, start_m,
                                         offs_m, offs_n, offs_d, Sq, kend, off, qk_scale, sm_scale, sqm, sdom,
                                         sqam, False, CAUSAL, not EVEN_M, PREC, ATOMIC_DQ,
                                         USE_TMA, DescQ, DescDO, b, h, BLOCK_M, HEAD_DIM)

    store_dkdv(DK, DV, dk * sm_scale, dv, b, hk, offs_n, offs_d, sgb, sgh, sgn, Sk, EVEN_N)


@triton.jit
def _dq_block(dq, q, do, lse2, delta, k_ptrs, v_ptrs, start_n, offs_m, offs_n, Sk, kend, off, qk_scale,
              skn, svn, MASK: tl.constexpr, CAUSAL: tl.constexpr, LOAD_N: tl.constexpr, PREC: tl.constexpr,
              USE_TMA: tl.constexpr = False, DescK=None, DescV=None, b=0, hk=0, BLOCK_N: tl.constexpr = 0,
              HEAD_DIM: tl.constexpr = 0):
    """Accumulate one BLOCK_N slice of keys into dQ of this query block. USE_TMA: K and V of head (b, hk) by
    descriptor loads (rows past Sk zero-filled, as the LOAD_N mask would)."""
    cols = start_n + offs_n
    if USE_TMA:
        kT = tma_rows(DescK, b, hk, start_n, BLOCK_N, HEAD_DIM).T
        vT = tma_rows(DescV, b, hk, start_n, BLOCK_N, HEAD_DIM).T
    elif LOAD_N:
        kT = tl.load(k_ptrs + start_n * skn, mask=cols[None, :] < Sk, other=0.0)
        vT = tl.load(v_ptrs + start_n * svn, mask=cols[None, :] < Sk, other=0.0)
    else:
        kT = tl.load(k_ptrs + start_n * skn)
        vT = tl.load(v_ptrs + start_n * svn)
    qk = tl.dot(q, kT, input_precision=PREC) * qk_scale
    p = tl.math.exp2(qk - lse2[:, None])
    if MASK:
        p = tl.where(visible(cols[None, :], offs_m[:, None], kend, off, CAUSAL), p, 0.0)
    dp = tl.dot(do, vT, input_precision=PREC)
    ds = p * (dp - delta[:, None])
    dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=PREC)
    return dq


@triton.jit
def _dq_cols(dq, q, do, lse2, delta, k_base, v_base, cols, col_ok, kend, offs_m, offs_d, off, qk_scale, skn, svn,
             CAUSAL: tl.constexpr, PREC: tl.constexpr):
    """_dq_block over gathered key columns (see attention_fwd._fwd_cols)."""
    kT = tl.load(k_base + cols[None, :] * skn + offs_d[:, None], mask=col_ok[None, :], other=0.0)
    vT = tl.load(v_base + cols[None, :] * svn + offs_d[:, None], mask=col_ok[None, :], other=0.0)
    qk = tl.dot(q, kT, input_precision=PREC) * qk_scale
    p = tl.math.exp2(qk - lse2[:, None])
    p = tl.where(col_ok[None, :] & visible(cols[None, :], offs_m[:, None], kend[None, :], off, CAUSAL), p, 0.0)
    dp = tl.dot(do, vT, input_precision=PREC)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=PREC)


@triton.autotune(configs=DQ_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": make_pruner("dq")})
@triton.heuristics(_EVEN)
@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, Lse, Delta, DQ, QIdx, QCnt, KLen, DescQ, DescK, DescV, DescDO,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom, sgb, sgh, sgm,
    sib, sih, siq, scb, sch,
    H, GROUP, Sq, Sk, qk_scale, sm_scale, SEQ_KEY,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, SPARSE: tl.constexpr, HAS_KLEN: tl.constexpr,
    TILE_M: tl.constexpr, TILE_N: tl.constexpr, PREC: tl.constexpr, HAS_DESC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
    USE_TMA: tl.constexpr = False, WARP_SPEC: tl.constexpr = False, PAIR: tl.constexpr = False,
):
    # descriptors as in _attn_bwd_dkdv; PAIR as in _attn_fwd
    tl.static_assert(not PAIR or (SPARSE and BLOCK_N == 2 * TILE_N))
    tl.static_assert(not USE_TMA or (HAS_DESC and not SPARSE))
    tl.static_assert(not WARP_SPEC or USE_TMA)
    pid_bh, b, h, hk, _, m0, offs_m, offs_n, offs_d = query_program(H, GROUP, BLOCK_M, BLOCK_N, HEAD_DIM)
    q_ptrs = row_major_ptrs(head_base(Q, b, h, sqb, sqh), offs_m, sqm, offs_d)
    do_ptrs = row_major_ptrs(head_base(DO, b, h, sdob, sdoh), offs_m, sdom, offs_d)
    if USE_TMA:
        q = tma_rows(DescQ, b, h, m0, BLOCK_M, HEAD_DIM)
        do = tma_rows(DescDO, b, h, m0, BLOCK_M, HEAD_DIM)
    elif EVEN_M:
        q = tl.load(q_ptrs)
        do = tl.load(do_ptrs)
    else:
        q = tl.load(q_ptrs, mask=offs_m[:, None] < Sq, other=0.0)
        do = tl.load(do_ptrs, mask=offs_m[:, None] < Sq, other=0.0)
    if EVEN_M:
        lse = tl.load(Lse + pid_bh.to(tl.int64) * Sq + offs_m)
        delta = tl.load(Delta + pid_bh.to(tl.int64) * Sq + offs_m)
    else:
        lse = tl.load(Lse + pid_bh.to(tl.int64) * Sq + offs_m, mask=offs_m < Sq, other=float("inf"))
        delta = tl.load(Delta + pid_bh.to(tl.int64) * Sq + offs_m, mask=offs_m < Sq, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    k_ptrs = transposed_ptrs(head_base(K, b, hk, skb, skh), offs_n, skn, offs_d)
    v_ptrs = transposed_ptrs(head_base(V, b, hk, svb, svh), offs_n, svn, offs_d)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    off = Sk - Sq

    if PAIR:
        idx_ptr, cnt = tile_list(QIdx, QCnt, b, h, m0 // TILE_M, sib, sih, siq, scb, sch)
        k_base = head_base(K, b, hk, skb, skh)
        v_base = head_base(V, b, hk, svb, svh)
        for t in range(0, cnt, 2):
            cols, col_ok, kend = tile_pair_cols(idx_ptr, t, cnt, KLen, Sk, offs_n, TILE_N, HAS_KLEN)
            dq = _dq_cols(dq, q, do, lse2, delta, k_base, v_base, cols, col_ok, kend, offs_m, offs_d, off,
                          qk_scale, skn, svn, CAUSAL, PREC)
    elif SPARSE:
        idx_ptr, cnt = tile_list(QIdx, QCnt, b, h, m0 // TILE_M, sib, sih, siq, scb, sch)
        for t in range(0, cnt):
            kt = tl.load(idx_ptr + t)
            kend = key_tile_end(KLen, kt, Sk, TILE_N, HAS_KLEN)
            for sub in tl.static_range(TILE_N // BLOCK_N):
                dq = _dq_block(dq, q, do, lse2, delta, k_ptrs, v_ptrs, kt * TILE_N + sub * BLOCK_N, offs_m,
                               offs_n, Sk, kend, off, qk_scale, skn, svn, CAUSAL or HAS_KLEN, CAUSAL,
                               not EVEN_N, PREC)
    elif WARP_SPEC:
        # one warp-specialized loop over every key block, masked throughout when causal (see _attn_fwd)
        hi = Sk
        if CAUSAL:
            hi = causal_key_end(m0, off, Sk, BLOCK_M)
        for start_n in tl.range(0, hi, BLOCK_N, warp_specialize=True):
            dq = _dq_block(dq, q, do, lse2, delta, k_ptrs, v_ptrs, start_n, offs_m, offs_n, Sk, Sk, off,
                           qk_scale, skn, svn, CAUSAL, CAUSAL, False, PREC, USE_TMA, DescK, DescV, b, hk,
                           BLOCK_N, HEAD_DIM)
    else:
        # keys past Sk load as zeros and add nothing to dQ, so only the causal diagonal needs a mask
        hi = Sk
        full_end = Sk
        if CAUSAL:
            full_end = tl.minimum(causal_full_end(m0, off, BLOCK_N), Sk)
            hi = causal_key_end(m0, off, Sk, BLOCK_M)
        for start_n in range(0, full_end, BLOCK_N):
            dq = _dq_block(dq, q, do, lse2, delta, k_ptrs, v_ptrs, start_n, offs_m, offs_n, Sk, Sk, off,
                           qk_scale, skn, svn, False, CAUSAL, not EVEN_N, PREC, USE_TMA, DescK, DescV, b, hk,
                           BLOCK_N, HEAD_DIM)
        for start_n in range(full_end, hi, BLOCK_N):
            dq = _dq_block(dq, q, do, lse2, delta, k_ptrs, v_ptrs, start_n, offs_m, offs_n, Sk, Sk, off,
                           qk_scale, skn, svn, True, CAUSAL, not EVEN_N, PREC, USE_TMA, DescK, DescV, b, hk,
                           BLOCK_N, HEAD_DIM)

    dq = dq * sm_scale
    store_rows(row_major_ptrs(head_base(DQ, b, h, sgb, sgh), offs_m, sgm, offs_d), dq, offs_m, Sq, EVEN_M)
