"""Quantization kernels and in-register helpers of the 8-bit attention (sage8): per-token INT8 of Q and of
mean-smoothed K (with the smoothing's per-row LSE correction), per-channel FP8 e4m3 of V and per-channel INT8
of dO, both written K-major (transposed, [D, S]) as 8-bit wgmma wants its B operand.

The same rounding is used by the fake-quant reference (`quant_reference.py`): INT8 = trunc(x*127/absmax
+- 0.5), scale absmax/127, both divisions correctly rounded (`_rdiv`, not the GPU's approximate fp32 `/`);
FP8 = round-to-nearest-even e4m3, saturated at 448. On the Triton interpreter the fp32 -> fp8 cast is not
correctly rounded (e.g. 127.9 -> 64), so there the value is rounded to an e4m3 number first
(`EXACT_FP8`); on GPUs the hardware cvt.rn.satfinite does it.
"""

import triton
import triton.language as tl

from ._common import head_base, load_rows_f32, row_major_ptrs, row_program
from ._tuning import INTERPRET

EXACT_FP8 = INTERPRET
FP8_MAX = 448.0
QUANT_BLOCK = 64


@triton.jit
def _rdiv(c, amax):
    """c / max(amax, 1e-30) correctly rounded (IEEE div.rn), as the fake-quant reference divides. Not `/`:
    on NVIDIA GPUs Triton lowers an fp32 `/` to the approximate div.full.f32 (up to 2 ulp off), and half
    inputs (fp16/bf16) put x * c / amax exactly on a rounding tie often (x = amax / 2 gives 63.5 for INT8),
    where one ulp flips the INT8/FP8 value: with an unsmoothed common K offset, one Q step moves the whole
    row's logits, i.e. the LSE, by ~2e-2 (the GPU failure of tests/test_sage8_gpu.py). The fma that the GPU
    makes of `x * inv + 0.5` is harmless: RN(p + 0.5) and RN(RN(p) + 0.5) have the same integer part."""
    return tl.math.div_rn(tl.full(amax.shape, c, tl.float32), tl.maximum(amax, 1e-30))


@triton.jit
def _round_e4m3(x):
    """x rounded to the nearest e4m3fn value (ties to even on normals, half up on subnormals), saturated."""
    a = tl.minimum(tl.abs(x), 448.0)
    bits = a.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576  # keep 3 mantissa bits
    normal = bits.to(tl.float32, bitcast=True)
    sub = tl.floor(a * 512.0 + 0.5) * 0.001953125  # below 2^-6 the step is 2^-9
    r = tl.where(a < 0.015625, sub, normal)
    return tl.where(x < 0, -r, r)


@triton.jit
def to_fp8(x, EXACT: tl.constexpr):
    """fp32 -> float8e4nv (e4m3fn)."""
    if EXACT:
        x = _round_e4m3(x)
    return x.to(tl.float8e4nv)


@triton.jit
def _round_int8(x):
    """fp32 (already scaled into [-127, 127]) -> int8, rounding half away from zero (the +-0.5 may be fused with
    the scaling product into an fma on the GPU: the same integer, see _rdiv)."""
    return tl.where(x >= 0, x + 0.5, x - 0.5).to(tl.int8)


@triton.jit
def quant_rows_int8(a, NONNEG: tl.constexpr = False):
    """(R, C) fp32 -> (int8 values, fp32 scale per row = absmax/127), rounding half away from zero. NONNEG: a >= 0
    (probabilities): the same values without the abs and the sign select (x + 0.5 truncated)."""
    if NONNEG:
        amax = tl.max(a, 1)
    else:
        amax = tl.max(tl.abs(a), 1)
    inv = _rdiv(127.0, amax)
    scale = tl.math.div_rn(amax, tl.full(amax.shape, 127.0, tl.float32))  # IEEE too (the reference's)
    if NONNEG:
        return (a * inv[:, None] + 0.5).to(tl.int8), scale
    return _round_int8(a * inv[:, None]), scale


@triton.jit
def _quant_tokens_int8(
    X, Mean, X8, X8T, Scale, Corr, KMean,
    sxb, sxh, sxs, s8b, s8h, s8s, stb, sth, std,
    H, HKV, GROUP, S, corr_scale,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, SUB_MEAN: tl.constexpr, HAS_T: tl.constexpr,
    HAS_CORR: tl.constexpr,
):
    """Per-token INT8 of x (B, H, S, D) (minus Mean (B, H, D) when SUB_MEAN): x8 row-major, optionally a
    transposed copy, scale (B, H, S); HAS_CORR also writes corr (B, H, S) = corr_scale * x . KMean[kv head]."""
    pid, bh, b, h, rows, d, inb = row_program(H, S, BLOCK, HEAD_DIM)
    x = load_rows_f32(X, b, h, sxb, sxh, sxs, rows, d, inb)
    if SUB_MEAN:
        x = x - tl.load(Mean + bh * HEAD_DIM + d)[None, :]
    if HAS_CORR:
        km = tl.load(KMean + (b * HKV + h // GROUP) * HEAD_DIM + d)
        c = tl.sum(x * km[None, :], 1) * corr_scale
        tl.store(Corr + bh.to(tl.int64) * S + rows, c, mask=inb)
    x8, sc = quant_rows_int8(x)
    tl.store(Scale + bh.to(tl.int64) * S + rows, sc, mask=inb)
    tl.store(row_major_ptrs(head_base(X8, b, h, s8b, s8h), rows, s8s, d), x8, mask=inb[:, None])
    if HAS_T:
        tl.store(head_base(X8T, b, h, stb, sth) + rows[:, None] + d[None, :] * std, x8, mask=inb[:, None])


@triton.jit
def _quant_channels(
    X, Amax, X8, XLo, sxb, sxh, sxs, s8b, s8h, s8s, s8d, H, S,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, EXACT: tl.constexpr, HAS_LO: tl.constexpr, INT8: tl.constexpr,
):
    """Per-channel 8-bit x (B, H, S, D), stored through strides (the launcher passes a [D, S] K-major buffer).
    FP8 (V; dO before INT8 dV): x8 = e4m3(y), y = x * 448 / Amax[b, h, d]; HAS_LO also stores the residual
    e4m3(16 (y - x8)) in XLo (same strides): y ~ x8 + lo / 16 to ~2^-8 relative (the `v_split` two-term V).
    INT8 (dO): x8 = round half away (x * 127 / Amax[b, h, d]), the scale Amax / 127 is the launcher's."""
    pid, bh, b, h, rows, d, inb = row_program(H, S, BLOCK, HEAD_DIM)
    x = load_rows_f32(X, b, h, sxb, sxh, sxs, rows, d, inb)
    amax = tl.load(Amax + bh * HEAD_DIM + d)
    offs = b.to(tl.int64) * s8b + h.to(tl.int64) * s8h + rows[:, None] * s8s + d[None, :] * s8d
    if INT8:
        tl.store(X8 + offs, _round_int8(x * _rdiv(127.0, amax)[None, :]), mask=inb[:, None])
    else:
        y = x * _rdiv(448.0, amax)[None, :]
        x8 = to_fp8(y, EXACT)
        tl.store(X8 + offs, x8, mask=inb[:, None])
        if HAS_LO:
            tl.store(XLo + offs, to_fp8((y - x8.to(tl.float32)) * 16.0, EXACT), mask=inb[:, None])
