"""8-bit flash-attention backward (sage8), deterministic, the structure of `attention_bwd` (delta from its
`_bwd_preprocess`, key-major dK/dV over the query blocks of every head of the GQA group, query-major dQ):

- S recomputed in INT8 from the forward's quantization (re-run on Q and K: cheap, and nothing 8-bit is kept
  alive between forward and backward); P = exp2(S2 - (LSE - c) log2e) with the smoothing correction c;
- dV += int8(P^T, one scale per key row of the block) int8(dO) (dO per channel, K-major [D, Sq]): both scales
  lie along dV's output dims, so each block is a fresh INT8 dot, scaled per key row and added in fp32, and dO's
  channel factor is applied once at the store (per block with GQA);
- dP = dO V^T in the input dtype (bf16/fp16), fp32 accumulation; dS = P o (dP - delta);
- dK += int8(dS^T * q_scale) q8, one scale per key row of the block (the per-token Q scale lies along
  this product's contraction, so it is folded into dS first); Q8 read from a K-major copy;
- dQ += int8(dS * k_scale) k8, one scale per query row of the block; K8 from a K-major copy; at the end
  dQ += r k_mean (r = rowsum dS, exact from delta, p_sink and dLSE), then everything times sm_scale.
"""

import triton
import triton.language as tl

from ._common import (causal_full_end, causal_key_end, causal_query_range, head_base, key_program, key_tile_end, query_program,
                      row_major_ptrs, store_rows, tile_list, transposed_ptrs, visible)
from ._tuning import EVEN_HEURISTICS, make_configs, make_pruner
from .quant import quant_rows_int8

SAGE8_DKDV_CONFIGS = make_configs([(64, 128, 8, 2), (64, 128, 8, 3), (128, 128, 8, 2), (32, 128, 4, 3),
                                   (64, 64, 4, 3)])
SAGE8_DQ_CONFIGS = make_configs([(128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)])

_KEY = ["SEQ_KEY", "HEAD_DIM", "CAUSAL", "SPARSE", "TILE_M", "TILE_N", "HAS_KLEN"]


# dK/dV register budget (sm_90, D 128, 64x128x8: 64 fp32 registers per BLOCK_N x D tile per thread). The dK and
# dV accumulators alone take 128; every 8-bit dot adds a fresh BLOCK_N x D result (its per-row scale is applied
# before the fp32 add), and the per-query vectors of the transposed tiles (q scale, LSE, delta) cost 16 registers
# each. The block is laid out to keep the peak under 255 (see NOTES.md, "dK/dV register pressure"):
# - dV is scaled by dO's per-channel factor once at the end when the program sees one head (GROUP == 1), not per
#   block (a loop-invariant BLOCK_N x D broadcast, 32 registers); with GQA the factor differs per head, per block;
# - the dK product is split in DK_SPLIT column halves at D >= 128 (BLOCK_N x D/2 int32 results, not BLOCK_N x D);
# - each operand is loaded where it is first used (the pipeliner puts the shared-memory reads of the per-query
#   vectors there too), P's INT8 (per key row) is made right after P, and both 8-bit dots run after dS is
#   quantized (the fp32 P is dead by then);
# - the causal diagonal blocks are masked in the same loop (a uniform branch) instead of a second loop.


@triton.jit
def _s8_dkdv_block(dk, dk_hi, dv, k8, ks, v, q8_base, q8t_base, qs_base, do_base, do8_base, lse_base, delta_base,
                   corr_base, dofac, start_m, mask_end, offs_m, offs_n, offs_d, offs_k, Sq, kend, off, qk_scale,
                   sqm, stm, std, sdom, s8m, s8d,
                   MASK: tl.constexpr, CAUSAL: tl.constexpr, LOAD_M: tl.constexpr, PREC: tl.constexpr,
                   HAS_CORR: tl.constexpr, DV_SCALE_IN_LOOP: tl.constexpr,
                   DK_SPLIT: tl.constexpr, DYN_MASK: tl.constexpr):
    """One BLOCK_M slice of queries into this key block's dK (two column halves dk, dk_hi when DK_SPLIT == 2),
    dV (transposed scores); MASK: the causal / key-length mask, with DYN_MASK only when start_m < mask_end."""
    rows = start_m + offs_m
    inb = rows < Sq
    if LOAD_M:
        q8 = tl.load(q8_base + rows[:, None] * sqm + offs_d[None, :], mask=inb[:, None], other=0)
        qs = tl.load(qs_base + rows, mask=inb, other=0.0)
        lse = tl.load(lse_base + rows, mask=inb, other=float("inf"))
    else:
        q8 = tl.load(q8_base + rows[:, None] * sqm + offs_d[None, :])
        qs = tl.load(qs_base + rows)
        lse = tl.load(lse_base + rows)
    lse = tl.where(lse == float("-inf"), float("inf"), lse)  # rows that saw nothing: P = 0
    if HAS_CORR:
        if LOAD_M:
            lse = lse - tl.load(corr_base + rows, mask=inb, other=0.0)
        else:
            lse = lse - tl.load(corr_base + rows)
    lse2 = lse * 1.4426950408889634
    kqT = tl.dot(k8, tl.trans(q8)).to(tl.float32) * (qs * qk_scale)[None, :] * ks[:, None]  # (BLOCK_N, BLOCK_M)
    pT = tl.math.exp2(kqT - lse2[None, :])
    if MASK:
        if DYN_MASK:
            if start_m < mask_end:  # uniform over the program
                pT = tl.where(visible(offs_n[:, None], rows[None, :], kend, off, CAUSAL), pT, 0.0)
        else:
            pT = tl.where(visible(offs_n[:, None], rows[None, :], kend, off, CAUSAL), pT, 0.0)
    # dV's P in INT8 with one scale per key row (max over this block's queries): dV's row dim, out of the dot
    p8, psc = quant_rows_int8(pT, True)  # P >= 0: no abs, no sign select
    if LOAD_M:
        do = tl.load(do_base + rows[:, None] * sdom + offs_d[None, :], mask=inb[:, None], other=0.0)
        delta = tl.load(delta_base + rows, mask=inb, other=0.0)
    else:
        do = tl.load(do_base + rows[:, None] * sdom + offs_d[None, :])
        delta = tl.load(delta_base + rows)
    dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
    dsT = pT * (dpT - delta[None, :])
    a8, sc = quant_rows_int8(dsT * qs[None, :])
    do8_ptrs = do8_base + rows[:, None] * s8m + offs_d[None, :] * s8d
    if LOAD_M:
        do8 = tl.load(do8_ptrs, mask=inb[:, None], other=0)
    else:
        do8 = tl.load(do8_ptrs)
    if DV_SCALE_IN_LOOP:
        dv += tl.dot(p8, do8).to(tl.float32) * psc[:, None] * dofac[None, :]
    else:
        dv += tl.dot(p8, do8).to(tl.float32) * psc[:, None]
    qt_ptrs = q8t_base + rows[:, None] * stm + offs_k[None, :] * std
    if LOAD_M:
        q8t = tl.load(qt_ptrs, mask=inb[:, None], other=0)
        if DK_SPLIT == 2:
            q8t_hi = tl.load(qt_ptrs + dk.shape[1] * std, mask=inb[:, None], other=0)
    else:
        q8t = tl.load(qt_ptrs)
        if DK_SPLIT == 2:
            q8t_hi = tl.load(qt_ptrs + dk.shape[1] * std)
    dk += tl.dot(a8, q8t).to(tl.float32) * sc[:, None]
    if DK_SPLIT == 2:
        dk_hi += tl.dot(a8, q8t_hi).to(tl.float32) * sc[:, None]
    return dk, dk_hi, dv


def _dkdv_heuristics():
    return {**EVEN_HEURISTICS,
            "DV_SCALE_IN_LOOP": lambda a: a["GROUP"] != 1,
            "DK_SPLIT": lambda a: 2 if a["HEAD_DIM"] >= 128 else 1}


@triton.autotune(configs=SAGE8_DKDV_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": make_pruner("dkdv")})
@triton.heuristics(_dkdv_heuristics())
@triton.jit
def _sage8_bwd_dkdv(
    Q8, Q8T, QS, K8, KS, V, DO, DO8, DOFac, Lse, Delta, Corr, DK, DV, KIdx, KCnt, KLen,
    sqb, sqh, sqm, stb, sth, stm, std, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom,
    s8b, s8h, s8m, s8d, sgb, sgh, sgn,
    sib, sih, siq, scb, sch,
    H, HKV, GROUP, Sq, Sk, qk_scale, sm_scale, SEQ_KEY,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, SPARSE: tl.constexpr, HAS_KLEN: tl.constexpr,
    HAS_CORR: tl.constexpr, TILE_M: tl.constexpr, TILE_N: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_M: tl.constexpr,
    EVEN_N: tl.constexpr, DV_SCALE_IN_LOOP: tl.constexpr, DK_SPLIT: tl.constexpr,
):
    pid_bh, b, hk, n0, offs_n, offs_m, offs_d = key_program(HKV, BLOCK_M, BLOCK_N, HEAD_DIM)
    k_ptrs = row_major_ptrs(head_base(K8, b, hk, skb, skh), offs_n, skn, offs_d)
    v_ptrs = row_major_ptrs(head_base(V, b, hk, svb, svh), offs_n, svn, offs_d)
    ks_ptrs = KS + pid_bh.to(tl.int64) * Sk + offs_n
    if EVEN_N:
        k8 = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
        ks = tl.load(ks_ptrs)
    else:
        k8 = tl.load(k_ptrs, mask=offs_n[:, None] < Sk, other=0)
        v = tl.load(v_ptrs, mask=offs_n[:, None] < Sk, other=0.0)
        ks = tl.load(ks_ptrs, mask=offs_n < Sk, other=0.0)
    DK_COLS: tl.constexpr = HEAD_DIM // DK_SPLIT
    offs_k = tl.arange(0, DK_COLS)
    dk = tl.zeros([BLOCK_N, DK_COLS], dtype=tl.float32)
    dk_hi = tl.zeros([BLOCK_N, DK_COLS], dtype=tl.float32)  # the columns DK_COLS.. when DK_SPLIT == 2
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    off = Sk - Sq
    kt = n0 // TILE_N
    kend = key_tile_end(KLen, kt, Sk, TILE_N, HAS_KLEN)
    dofac = tl.zeros([HEAD_DIM], dtype=tl.float32)  # dO's per-channel scale, per head when DV_SCALE_IN_LOOP

    for g in range(0, GROUP):
        h = hk * GROUP + g
        bh = b * H + h
        q8_base = head_base(Q8, b, h, sqb, sqh)
        q8t_base = head_base(Q8T, b, h, stb, sth)
        qs_base = QS + bh.to(tl.int64) * Sq
        do_base = head_base(DO, b, h, sdob, sdoh)
        do8_base = head_base(DO8, b, h, s8b, s8h)
        lse_base = Lse + bh.to(tl.int64) * Sq
        delta_base = Delta + bh.to(tl.int64) * Sq
        corr_base = Corr + bh.to(tl.int64) * Sq
        if DV_SCALE_IN_LOOP:
            dofac = tl.load(DOFac + bh * HEAD_DIM + offs_d)
        if SPARSE:
            idx_ptr, cnt = tile_list(KIdx, KCnt, b, h, kt, sib, sih, siq, scb, sch)
            for t in range(0, cnt):
                qt = tl.load(idx_ptr + t)
                for sub in tl.static_range(TILE_M // BLOCK_M):
                    dk, dk_hi, dv = _s8_dkdv_block(
                        dk, dk_hi, dv, k8, ks, v, q8_base, q8t_base, qs_base, do_base, do8_base, lse_base,
                        delta_base, corr_base, dofac, qt * TILE_M + sub * BLOCK_M, Sq, offs_m, offs_n, offs_d,
                        offs_k, Sq, kend, off, qk_scale, sqm, stm, std, sdom, s8m, s8d, CAUSAL or HAS_KLEN, CAUSAL,
                        not EVEN_M, PREC, HAS_CORR, DV_SCALE_IN_LOOP, DK_SPLIT, False)
        else:
            # causal: query blocks from lo see part of this key block, from mid all of it; one loop, the mask
            # applied below mid (a second, masked loop would keep both loops' state live at once)
            lo = 0
            mid = 0
            if CAUSAL:
                lo, mid = causal_query_range(n0, off, BLOCK_M, BLOCK_N)
            for start_m in range(lo, Sq, BLOCK_M):
                dk, dk_hi, dv = _s8_dkdv_block(
                    dk, dk_hi, dv, k8, ks, v, q8_base, q8t_base, qs_base, do_base, do8_base, lse_base, delta_base,
                    corr_base, dofac, start_m, mid, offs_m, offs_n, offs_d, offs_k, Sq, kend, off, qk_scale, sqm,
                    stm, std, sdom, s8m, s8d, CAUSAL, CAUSAL, not EVEN_M, PREC, HAS_CORR, DV_SCALE_IN_LOOP,
                    DK_SPLIT, True)

    dk_ptrs = row_major_ptrs(head_base(DK, b, hk, sgb, sgh), offs_n, sgn, offs_k)
    store_rows(dk_ptrs, dk * sm_scale, offs_n, Sk, EVEN_N)
    if DK_SPLIT == 2:
        store_rows(dk_ptrs + DK_COLS, dk_hi * sm_scale, offs_n, Sk, EVEN_N)
    if not DV_SCALE_IN_LOOP:  # one head (GROUP == 1, h = hk); after dK's stores, when its registers are free
        dv = dv * tl.load(DOFac + (b * H + hk) * HEAD_DIM + offs_d)[None, :]
    store_rows(row_major_ptrs(head_base(DV, b, hk, sgb, sgh), offs_n, sgn, offs_d), dv, offs_n, Sk, EVEN_N)


@triton.jit
def _s8_dq_block(dq, q8, row_s, do, lse2, delta, k_ptrs, kt_ptrs, ks_ptrs, v_ptrs, start_n, offs_m, offs_n, Sk,
                 kend, off, skn, stn, svn, MASK: tl.constexpr, CAUSAL: tl.constexpr, LOAD_N: tl.constexpr,
                 PREC: tl.constexpr):
    """One BLOCK_N slice of keys into this query block's dQ."""
    cols = start_n + offs_n
    if LOAD_N:
        k8T = tl.load(k_ptrs + start_n * skn, mask=cols[None, :] < Sk, other=0)
        k8 = tl.load(kt_ptrs + start_n * stn, mask=cols[:, None] < Sk, other=0)
        ks = tl.load(ks_ptrs + start_n, mask=cols < Sk, other=0.0)
        vT = tl.load(v_ptrs + start_n * svn, mask=cols[None, :] < Sk, other=0.0)
    else:
        k8T = tl.load(k_ptrs + start_n * skn)
        k8 = tl.load(kt_ptrs + start_n * stn)
        ks = tl.load(ks_ptrs + start_n)
        vT = tl.load(v_ptrs + start_n * svn)
    qk = tl.dot(q8, k8T).to(tl.float32) * row_s[:, None] * ks[None, :]
    p = tl.math.exp2(qk - lse2[:, None])
    if MASK:
        p = tl.where(visible(cols[None, :], offs_m[:, None], kend, off, CAUSAL), p, 0.0)
    dp = tl.dot(do, vT, input_precision=PREC)
    ds = p * (dp - delta[:, None])
    a8, sc = quant_rows_int8(ds * ks[None, :])  # keys past Sk have k_scale 0: nothing added
    dq += tl.dot(a8, k8).to(tl.float32) * sc[:, None]
    return dq


@triton.autotune(configs=SAGE8_DQ_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": make_pruner("dq")})
@triton.heuristics(EVEN_HEURISTICS)
@triton.jit
def _sage8_bwd_dq(
    Q8, QS, K8, K8T, KS, V, DO, Lse, Delta, Corr, R, KMean, DQ, QIdx, QCnt, KLen,
    sqb, sqh, sqm, skb, skh, skn, stb, sth, stn, std, svb, svh, svn, sdob, sdoh, sdom, sgb, sgh, sgm,
    sib, sih, siq, scb, sch,
    H, GROUP, Sq, Sk, qk_scale, sm_scale, SEQ_KEY,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, SPARSE: tl.constexpr, HAS_KLEN: tl.constexpr,
    HAS_CORR: tl.constexpr, HAS_R: tl.constexpr, TILE_M: tl.constexpr, TILE_N: tl.constexpr,
    PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_M: tl.constexpr,
    EVEN_N: tl.constexpr,
):
    pid_bh, b, h, hk, bhk, m0, offs_m, offs_n, offs_d = query_program(H, GROUP, BLOCK_M, BLOCK_N, HEAD_DIM)
    q_ptrs = row_major_ptrs(head_base(Q8, b, h, sqb, sqh), offs_m, sqm, offs_d)
    do_ptrs = row_major_ptrs(head_base(DO, b, h, sdob, sdoh), offs_m, sdom, offs_d)
    row_ptrs = pid_bh.to(tl.int64) * Sq + offs_m
    inb = offs_m < Sq
    if EVEN_M:
        q8 = tl.load(q_ptrs)
        do = tl.load(do_ptrs)
    else:
        q8 = tl.load(q_ptrs, mask=inb[:, None], other=0)
        do = tl.load(do_ptrs, mask=inb[:, None], other=0.0)
    qs = tl.load(QS + row_ptrs, mask=inb, other=0.0)
    lse = tl.load(Lse + row_ptrs, mask=inb, other=float("inf"))
    delta = tl.load(Delta + row_ptrs, mask=inb, other=0.0)
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    if HAS_CORR:
        lse = lse - tl.load(Corr + row_ptrs, mask=inb, other=0.0)
    lse2 = lse * 1.4426950408889634
    row_s = qs * qk_scale
    k_ptrs = transposed_ptrs(head_base(K8, b, hk, skb, skh), offs_n, skn, offs_d)
    kt_ptrs = K8T + b.to(tl.int64) * stb + hk.to(tl.int64) * sth + offs_n[:, None] * stn + offs_d[None, :] * std
    ks_ptrs = KS + bhk.to(tl.int64) * Sk + offs_n
    v_ptrs = transposed_ptrs(head_base(V, b, hk, svb, svh), offs_n, svn, offs_d)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    off = Sk - Sq

    if SPARSE:
        idx_ptr, cnt = tile_list(QIdx, QCnt, b, h, m0 // TILE_M, sib, sih, siq, scb, sch)
        for t in range(0, cnt):
            kt = tl.load(idx_ptr + t)
            kend = key_tile_end(KLen, kt, Sk, TILE_N, HAS_KLEN)
            for sub in tl.static_range(TILE_N // BLOCK_N):
                dq = _s8_dq_block(dq, q8, row_s, do, lse2, delta, k_ptrs, kt_ptrs, ks_ptrs, v_ptrs,
                                  kt * TILE_N + sub * BLOCK_N, offs_m, offs_n, Sk, kend, off, skn, stn, svn,
                                  CAUSAL or HAS_KLEN, CAUSAL, not EVEN_N, PREC)
    else:
        hi = Sk
        full_end = Sk
        if CAUSAL:
            full_end = tl.minimum(causal_full_end(m0, off, BLOCK_N), Sk)
            hi = causal_key_end(m0, off, Sk, BLOCK_M)
        for start_n in range(0, full_end, BLOCK_N):
            dq = _s8_dq_block(dq, q8, row_s, do, lse2, delta, k_ptrs, kt_ptrs, ks_ptrs, v_ptrs, start_n, offs_m,
                              offs_n, Sk, Sk, off, skn, stn, svn, False, CAUSAL, not EVEN_N, PREC)
        for start_n in range(full_end, hi, BLOCK_N):
            dq = _s8_dq_block(dq, q8, row_s, do, lse2, delta, k_ptrs, kt_ptrs, ks_ptrs, v_ptrs, start_n, offs_m,
                              offs_n, Sk, Sk, off, skn, stn, svn, True, CAUSAL, not EVEN_N, PREC)

    if HAS_R:
        r = tl.load(R + row_ptrs, mask=inb, other=0.0)
        dq = dq + r[:, None] * tl.load(KMean + bhk * HEAD_DIM + offs_d)[None, :]
    dq = dq * sm_scale
    store_rows(row_major_ptrs(head_base(DQ, b, h, sgb, sgh), offs_m, sgm, offs_d), dq, offs_m, Sq, EVEN_M)
