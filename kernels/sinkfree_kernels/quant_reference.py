"""Fake-quant PyTorch references of the 8-bit attention kernels (quantize -> dequantize -> fp32 math).

`sage8` (trainable) and `sage8-infer` share one forward:
- S = Q K^T in INT8: Q per token (absmax/127 over D), K smoothed (K' = K - mean_tokens(K), per (b, kv head))
  then per token. The scales vary along the output rows/columns only, never along the contraction (D).
- P V in FP8 e4m3 (`v_split`: V as two FP8 terms, hi + lo/16, one more FP8 product): P in [0, 1] (exp2 of the score minus the *running* max of the online softmax) times 448,
  V per channel (448 / absmax over tokens), fp32 accumulation of each key block's product (two-level). The
  row sum l is taken on the unquantized fp32 P.
- The forward is emulated key block by key block (`block_n`, the kernel's BLOCK_N) because the FP8 rounding
  of P depends on the running max; with the kernel's block size the reference matches the kernel up to
  fp32 summation order.

What K-smoothing leaves invariant (c_i = scale * q_i . k_mean, one number per query row):
- Every visible logit of row i shifts by the same -c_i (a mask only removes columns, so causal, block-sparse
  and padded tiles keep the invariance). softmax over the keys alone is unchanged.
- The sink logit s_h is *not* a key, so it is not shifted: with a learnable sink the kernel compares the
  smoothed logits against s_h - c_i (per row), which restores exactly the unsmoothed probabilities,
  including the sink's own mass.
- LSE: LSE_true = LSE_smoothed + c_i (with or without sink); the ops return LSE_true.
- Backward: with dS = P o (dP - delta'), delta' = rowsum(dO o O) - dLSE, dK = scale dS^T Q needs no
  correction, dQ = scale dS K = scale (dS K' + r_i k_mean) with r_i = rowsum_j dS_ij = dLSE_i + delta'_i
  p_sink_i (exact: sum_j P_ij dP_ij = dO_i . O_i and sum_j P_ij = 1 - p_sink_i). Without a sink and
  without an LSE gradient r = 0, the "smoothing is free" case; with a sink it is not zero and is added.

Backward (sage8): S recomputed in INT8 as above; dV = P^T dO in INT8: P per key column within each query
block (`block_m`, the dK/dV kernel's BLOCK_M; absmax/127 of the block's rows), dO per channel (absmax/127 over
the queries); both scales lie along dV's output dims (key rows, channels), not the contraction (the queries),
so they factor out of each block's INT8 product (a static 1/127 step on P would flush its small values, e4m3
P and dO round to 3 mantissa bits: cos 0.9993 vs 0.9999 on N(0, 1)); dP = dO V^T in the input dtype
(bf16/fp16) with fp32 accumulation; dS = P o (dP - delta'); dQ = dS K in INT8 with dS*k_scale quantized
per query row within each key block (`block_n`) and dK = dS^T Q in INT8 with dS*q_scale quantized per key
row within each query block (`block_m`) -- the per-token Q/K scales lie along the contraction of these two
products, so they are folded into dS before its quantization. dsink as in the dense kernel.
"""

import math

import torch

from .tiles import token_mask

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
INT8_MAX = 127.0
FP8_MAX = 448.0
TINY = 1e-30


def _rdiv(c, x):
    """c / x as one IEEE division (torch's `c / tensor` is reciprocal-then-multiply, 1 ulp off the kernels)."""
    return torch.full_like(x, c) / x


def round_half_away(x):
    """x rounded to the nearest integer, ties away from zero (what the kernels' (x +- 0.5) -> int cast does)."""
    return torch.trunc(x + 0.5 * torch.sign(x))


def to_e4m3(x):
    """fp32 -> nearest float8 e4m3fn value (saturated at +-448), returned as fp32."""
    return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()


def quant_int8_rows(x):
    """Symmetric INT8 over the last dim: (integer values as fp32, scale = absmax / 127)."""
    amax = x.abs().amax(-1)
    inv = _rdiv(INT8_MAX, amax.clamp_min(TINY))
    return round_half_away(x * inv[..., None]), amax / torch.full_like(amax, INT8_MAX)  # IEEE, as the kernels


def quant_int8_blocks(a, block, dim):
    """Quantize-dequantize `a` (B, H, Sq, Sk) to INT8 with one scale per vector along `dim` within each run
    of `block` entries of that dim (dim -1: per row within key blocks; dim -2: per column within query blocks)."""
    if dim == -2:
        return quant_int8_blocks(a.transpose(-1, -2), block, -1).transpose(-1, -2)
    n = a.shape[-1]
    nb = -(-n // block)
    ap = torch.nn.functional.pad(a, (0, nb * block - n)).unflatten(-1, (nb, block))
    a8, sc = quant_int8_rows(ap)
    return (a8 * sc[..., None]).flatten(-2)[..., :n]


def quantize_qkv(q, k, v, scale, smooth_k=True, v_split=False):
    """The forward's quantization of q (B, Hq, Sq, D), k, v (B, Hkv, Sk, D): dict of q8, qs, k8, ks, kmean,
    corr (B, Hq, Sq) = scale * q . kmean (zeros without smoothing), v8 (fp8 values), vfac (B, Hkv, D) with
    V = v8 * vfac * 448 (so P~ V~ * vfac = P V once P~ = 448 P); v_split: V = (v8 + vlo / 16) * vfac * 448
    with vlo = e4m3(16 * residual), the two-term V."""
    hq, hkv = q.shape[1], k.shape[1]
    qf, kf, vf = q.float(), k.float(), v.float()
    km = kf.mean(2, keepdim=True) if smooth_k else torch.zeros_like(kf[:, :, :1])
    q8, qs = quant_int8_rows(qf)
    k8, ks = quant_int8_rows(kf - km)
    vamax = vf.abs().amax(2)  # (B, Hkv, D)
    y = vf * _rdiv(FP8_MAX, vamax.clamp_min(TINY))[:, :, None, :]
    v8 = to_e4m3(y)
    vlo = to_e4m3((y - v8) * 16.0) if v_split else None
    kmq = km.repeat_interleave(hq // hkv, dim=1)  # (B, Hq, 1, D)
    corr = (qf * kmq).sum(-1) * scale
    return dict(q8=q8, qs=qs, k8=k8, ks=ks, kmean=km[:, :, 0], corr=corr, v8=v8, vlo=vlo,
                vfac=vamax / (FP8_MAX * FP8_MAX))


def _expand(x, group):
    return x.repeat_interleave(group, dim=1) if group > 1 else x


def _keep_mask(b, hq, sq, sk, mask, causal, device):
    keep = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if causal:
        keep = keep.tril(sk - sq)
    if mask is not None:
        keep = keep & mask
    return keep.expand(b, hq, sq, sk)


def _scores2(qz, kz, scale, keep):
    """Base-2 scores from the INT8 operands, with the kernels' order of the scale products."""
    row = qz["qs"] * (scale * LOG2E)
    z = torch.einsum("bhid,bhjd->bhij", qz["q8"], kz["k8"]) * row[..., None] * kz["ks"][..., None, :]
    return z.masked_fill(~keep, float("-inf"))


def _group_view(qz, group):
    return {"k8": _expand(qz["k8"], group), "ks": _expand(qz["ks"], group), "v8": _expand(qz["v8"], group),
            "vfac": _expand(qz["vfac"], group), "kmean": _expand(qz["kmean"], group),
            "vlo": _expand(qz["vlo"], group) if qz["vlo"] is not None else None}


def sage8_forward_emulated(q, k, v, keep, sink, scale, smooth_k=True, block_n=64, v_split=False):
    """The sage8 forward as the kernel runs it (online softmax over key blocks of block_n): (out fp32, lse)."""
    b, hq, sq, d = q.shape
    group = hq // k.shape[1]
    qz = quantize_qkv(q, k, v, scale, smooth_k, v_split)
    kz = _group_view(qz, group)
    z = _scores2(qz, kz, scale, keep)
    corr = qz["corr"]
    if sink is not None:
        s2 = (sink.float().view(1, hq, 1) - corr) * LOG2E
        m = s2.clamp_min(-1e30)
        l_i = torch.exp2(s2 - m)
    else:
        m = torch.full((b, hq, sq), -1e30, device=q.device)
        l_i = torch.zeros(b, hq, sq, device=q.device)
    acc = torch.zeros(b, hq, sq, d, device=q.device)
    for j0 in range(0, k.shape[2], block_n):
        zb = z[..., j0:j0 + block_n]
        m_new = torch.maximum(m, zb.amax(-1))
        p = torch.exp2(zb - m_new[..., None])
        alpha = torch.exp2(m - m_new)
        l_i = l_i * alpha + p.sum(-1)
        p8 = to_e4m3(p * FP8_MAX)
        pv = torch.einsum("bhij,bhjd->bhid", p8, kz["v8"][:, :, j0:j0 + block_n])
        if v_split:
            pv = pv + torch.einsum("bhij,bhjd->bhid", p8, kz["vlo"][:, :, j0:j0 + block_n]) * 0.0625
        acc = acc * alpha[..., None] + pv
        m = m_new
    empty = l_i == 0
    out = (acc * kz["vfac"][:, :, None, :]) / torch.where(empty, 1.0, l_i)[..., None]
    lse = torch.where(empty, float("-inf"), (m + torch.log2(torch.where(empty, 1.0, l_i))) * LN2 + corr)
    return out, lse


def sage8_backward_emulated(dout, dlse, q, k, v, out, lse, keep, sink, scale, smooth_k=True, block_m=64,
                            block_n=64):
    """The sage8 backward (see the module docstring): (dq, dk, dv, dsink or None), fp32."""
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    group = hq // hkv
    qz = quantize_qkv(q, k, v, scale, smooth_k)
    kz = _group_view(qz, group)
    z = _scores2(qz, kz, scale, keep)
    lse_f = torch.where(lse == float("-inf"), float("inf"), lse)
    lse2 = (lse_f - qz["corr"]) * LOG2E
    p = torch.exp2(z - lse2[..., None])
    do = dout.float()
    delta = (do * out.float()).sum(-1)
    if dlse is not None:
        delta = delta - dlse.float()
    dsink = None
    psink = torch.zeros_like(delta)
    if sink is not None:
        psink = torch.exp(sink.float().view(1, hq, 1) - lse_f)
        dsink = -(psink * delta).sum((0, 2))
    # dV = P^T dO in INT8: P per key column within query blocks, dO per channel (scale applied after the sum)
    doamax = do.abs().amax(2)  # (B, Hq, D)
    do8 = round_half_away(do * _rdiv(INT8_MAX, doamax.clamp_min(TINY))[:, :, None, :])
    dv = torch.einsum("bhij,bhid->bhjd", quant_int8_blocks(p, block_m, -2), do8)
    dv = dv * (doamax / torch.full_like(doamax, INT8_MAX))[:, :, None]
    # dP in the input dtype's values, fp32 accumulation
    dp = torch.einsum("bhid,bhjd->bhij", do, _expand(v, group).float())
    ds = p * (dp - delta[..., None])
    # dQ = scale (dS K' + r kmean): dS * k_scale quantized per query row within key blocks
    a_q = quant_int8_blocks(ds * kz["ks"][..., None, :], block_n, -1)
    dq = torch.einsum("bhij,bhjd->bhid", a_q, kz["k8"])
    if smooth_k:
        r = psink * delta + (dlse.float() if dlse is not None else 0.0)
        r = torch.where(lse == float("-inf"), 0.0, r)
        dq = dq + r[..., None] * kz["kmean"][:, :, None, :]
    dq = dq * scale
    # dK = scale dS^T Q: dS * q_scale quantized per key column within query blocks
    a_k = quant_int8_blocks(ds * qz["qs"][..., None], block_m, -2)
    dk = torch.einsum("bhij,bhid->bhjd", a_k, qz["q8"]) * scale
    if group > 1:
        dk = dk.view(b, hkv, group, sk, d).sum(2)
        dv = dv.view(b, hkv, group, sk, d).sum(2)
    return dq, dk, dv, dsink


class _Sage8Ref(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sink, keep, scale, smooth_k, block_m, block_n, v_split):
        out, lse = sage8_forward_emulated(q, k, v, keep, sink, scale, smooth_k, block_n, v_split)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, sink, keep, out, lse)
        ctx.args = (scale, smooth_k, block_m, block_n)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, sink, keep, out, lse = ctx.saved_tensors
        scale, smooth_k, block_m, block_n = ctx.args
        dq, dk, dv, dsink = sage8_backward_emulated(dout, dlse, q, k, v, out, lse, keep, sink, scale, smooth_k,
                                                    block_m, block_n)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dsink if sink is not None else None,
                None, None, None, None, None, None)


def sage8_masked_reference(q, k, v, mask=None, sink=None, scale=None, causal=False, smooth_k=True, block_m=64,
                           block_n=64, v_split=False):
    """Fake-quant sage8 attention for a bool mask (B|1, Hq|1, Sq, Sk) or None: (out in q's dtype, lse fp32),
    differentiable in q, k, v, sink through the quantized backward."""
    b, hq, sq, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    keep = _keep_mask(b, hq, sq, k.shape[2], mask, causal, q.device)
    return _Sage8Ref.apply(q, k, v, sink, keep, scale, bool(smooth_k), block_m, block_n, bool(v_split))


def sage8_attention_reference(q, k, v, sink=None, causal=False, scale=None, smooth_k=True, block_m=64,
                              block_n=64, v_split=False):
    """Dense fake-quant sage8 attention: (out, lse)."""
    return sage8_masked_reference(q, k, v, None, sink, scale, causal, smooth_k, block_m, block_n, v_split)


def sage8_block_sparse_reference(q, k, v, q2k_idx, q2k_cnt, sink=None, causal=False, scale=None, tile_q=64,
                                 tile_k=64, kv_tile_len=None, smooth_k=True, block_m=64, block_n=64,
                                 v_split=False):
    """Block-sparse fake-quant sage8 attention over key-tile lists: (out, lse)."""
    b, hq, sq, _ = q.shape
    idx = q2k_idx.expand(b, hq, *q2k_idx.shape[2:])
    cnt = q2k_cnt.expand(b, hq, *q2k_cnt.shape[2:])
    mask = token_mask(idx, cnt, sq, k.shape[2], tile_q, tile_k, kv_tile_len, causal=False)
    return sage8_masked_reference(q, k, v, mask, sink, scale, causal, smooth_k, block_m, block_n, v_split)
