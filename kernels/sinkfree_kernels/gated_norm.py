"""Fused GatedNorm: out = y · gate_scale · σ(W_up SiLU(W_down y)), y = RMSNorm(x) · w (fp32 statistics).

v2 (chunked, 64-row wgmma blocks). One program per block of BLOCK_M = 64 rows (the dots with M = 64 lower to
wgmma on sm_90), 4 warps, looping over column chunks of BLOCK_C (any C: the last chunk is masked; the rank
r <= 64 is padded to a power of two >= 16).

Forward (`_gn_fwd`), per row block:
  pass 1 over chunks: Σx² and a_raw = (x·w) W_downᵀ (a = rstd · a_raw, so one pass gives both);
  h = SiLU(a);
  pass 2 over chunks (last chunk first, so the most recently read part of x is re-read from L2 first):
  u = h W_upᵀ, out = y · gate_scale · σ(u), y = (x̂ · w) cast to x.dtype as in the reference.
  Saves rstd (N,) and a (N, r) fp32.
Backward (`_gn_bwd`), per row block:
  pass 1 over chunks: recompute y, u, g; du = dout·y·gate_scale·σ(1−σ); dh += du W_up; S1 += Σ dout·g·ŷ;
  this block's dW_up partial duᵀ h (BLOCK_C, r);
  da = dh · SiLU'(a); the RMSNorm row term Σ_c w·dy·x̂ = S1 + da·a (Σ_c (da W_down)_c ŷ_c = da · a), so no
  extra pass over the row is needed for it;
  pass 2 over chunks (reversed): recompute y, u, g; dy = dout·g + da W_down; dx = rstd·(w·dy − x̂·Σ/C);
  this block's partials of dw (Σ_rows dy·x̂) and dW_downᵀ (yᵀ da).
  The partials go to (n_blocks, C[, r]) fp32 buffers summed by torch (deterministic, no atomics; du and y never
  round-trip through HBM). At BLOCK_C < 64 the two (BLOCK_C, 64) x (64, r) weight-gradient dots are mma.sync.

The small matmuls take their operands in `mm_dtype` (the autocast dtype under autocast, else x.dtype; fp32
runs IEEE) with fp32 accumulation, as `nn.Linear` would under autocast; W_down / W_up are cast to it on the
host. Rounding difference to the reference: a is rstd · ((x·w) in mm_dtype) W_downᵀ, the reference rounds
x̂·w instead of x·w (same relative error; with fp16 x, |x·w| > 65504 would overflow where x̂·w does not).
Public entry point: `gated_norm(x, weight, w_down, w_up, eps, gate_scale)`; `gated_norm_reference` is the
PyTorch oracle. SINKFREE_GN_CONFIG overrides the launch config (see `_config`).
"""

import os
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

MAX_RANK = 64  # r padded to a power of two >= 16; the (64, r) fp32 tiles stay in registers
# launch config, see _config and kernels/NOTES.md "v2 (chunked, 64-row wgmma blocks)" for the sm_90 compile facts
DEFAULT_CONFIG = (64, 64, 32, 4, 4, 2, 2, 0, 160)


# ---- reference ----------------------------------------------------------------------------------------------

def gated_norm_reference(x, weight, w_down, w_up, eps=1e-5, gate_scale=1.0):
    """The PyTorch GatedNorm math (as `sinkfree.nn.norms.GatedNorm`): y = RMSNorm(x)·w cast to x.dtype,
    out = y · gate_scale · σ(W_up SiLU(W_down y))."""
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)
    gate = gate_scale * torch.sigmoid(F.linear(F.silu(F.linear(y, w_down.to(y.dtype))), w_up.to(y.dtype)))
    return y * gate


# ---- kernels ------------------------------------------------------------------------------------------------

@triton.jit
def _load_tile(ptrs, rmask, cmask, EVEN_M: tl.constexpr, EVEN_C: tl.constexpr):
    """A 2-D tile in its stored dtype, zero outside; masked only where the launch cannot prove the mask true."""
    if EVEN_M and EVEN_C:
        v = tl.load(ptrs)
    elif EVEN_M:
        v = tl.load(ptrs, mask=cmask[None, :], other=0.0)
    elif EVEN_C:
        v = tl.load(ptrs, mask=rmask[:, None], other=0.0)
    else:
        v = tl.load(ptrs, mask=rmask[:, None] & cmask[None, :], other=0.0)
    return v


@triton.jit
def _store_tile(ptrs, v, rmask, cmask, EVEN_M: tl.constexpr, EVEN_C: tl.constexpr):
    if EVEN_M and EVEN_C:
        tl.store(ptrs, v)
    elif EVEN_M:
        tl.store(ptrs, v, mask=cmask[None, :])
    elif EVEN_C:
        tl.store(ptrs, v, mask=rmask[:, None])
    else:
        tl.store(ptrs, v, mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _load_vec(ptrs, cmask, EVEN_C: tl.constexpr):
    if EVEN_C:
        v = tl.load(ptrs)
    else:
        v = tl.load(ptrs, mask=cmask, other=0.0)
    return v


@triton.jit
def _reversed_chunk(i, n_chunks, xb, xo, W, WU, offs_r, rmask, rkmask, C, R, BLOCK_C: tl.constexpr,
                    EVEN_M: tl.constexpr, EVEN_C: tl.constexpr, EVEN_R: tl.constexpr):
    """The i-th column chunk of a second pass, last chunk first (the part of x read last in the first pass is
    the likeliest still in L2): its offsets and mask, x (fp32), w (fp32) and the W_up rows (C-chunk, R)."""
    offs_c = (n_chunks - 1 - i) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    x = _load_tile(xb + (xo + offs_c[None, :]), rmask, cmask, EVEN_M, EVEN_C).to(tl.float32)
    w = _load_vec(W + offs_c, cmask, EVEN_C).to(tl.float32)
    wu = _load_tile(WU + (offs_c[:, None] * R + offs_r[None, :]), cmask, rkmask, EVEN_C, EVEN_R)
    return offs_c, cmask, x, w, wu


@triton.jit
def _gn_fwd(X, W, WDT, WU, OUT, RSTD, A, N, C, R, stride_x, stride_o, eps, gate_scale,
            BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, PREC: tl.constexpr,
            EVEN_M: tl.constexpr, EVEN_C: tl.constexpr, EVEN_R: tl.constexpr):
    """WDT = W_downᵀ and WU = W_up, both (C, R) contiguous in the matmul dtype."""
    pid = tl.program_id(0)
    mm = WDT.dtype.element_ty
    row0 = pid.to(tl.int64) * BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    rmask = row0 + offs_m < N
    offs_r = tl.arange(0, BLOCK_R)
    rkmask = offs_r < R
    xb = X + row0 * stride_x  # int32 offsets inside the block
    xo = offs_m[:, None] * stride_x
    ss = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        cmask = offs_c < C
        x = _load_tile(xb + (xo + offs_c[None, :]), rmask, cmask, EVEN_M, EVEN_C).to(tl.float32)
        w = _load_vec(W + offs_c, cmask, EVEN_C).to(tl.float32)
        wdt = _load_tile(WDT + (offs_c[:, None] * R + offs_r[None, :]), cmask, rkmask, EVEN_C, EVEN_R)
        ss += tl.sum(x * x, axis=1)
        acc = tl.dot((x * w[None, :]).to(mm), wdt, acc=acc, input_precision=PREC)
    rstd = tl.rsqrt(ss / C + eps)
    a = acc * rstd[:, None]
    h = (a * tl.sigmoid(a)).to(mm)
    ob = OUT + row0 * stride_o
    n_chunks = tl.cdiv(C, BLOCK_C)
    for i in range(n_chunks):
        offs_c, cmask, x, w, wu = _reversed_chunk(i, n_chunks, xb, xo, W, WU, offs_r, rmask, rkmask, C, R,
                                                  BLOCK_C, EVEN_M, EVEN_C, EVEN_R)
        u = tl.dot(h, tl.trans(wu), input_precision=PREC)  # (M, BLOCK_C)
        y = (x * rstd[:, None] * w[None, :]).to(X.dtype.element_ty).to(tl.float32)
        out = (y * (gate_scale * tl.sigmoid(u))).to(OUT.dtype.element_ty)
        _store_tile(ob + (offs_m[:, None] * stride_o + offs_c[None, :]), out, rmask, cmask, EVEN_M, EVEN_C)
    tl.store(RSTD + row0 + offs_m, rstd, mask=rmask)
    tl.store(A + (row0 + offs_m[:, None]) * R + offs_r[None, :], a, mask=rmask[:, None] & rkmask[None, :])


@triton.jit
def _gn_bwd(X, DOUT, W, WDT, WU, RSTD, A, DX, DW_P, DWD_P, DWU_P, N, C, R, stride_x, stride_do, stride_dx,
            gate_scale, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, PREC: tl.constexpr,
            EVEN_M: tl.constexpr, EVEN_C: tl.constexpr, EVEN_R: tl.constexpr):
    """Writes dx and this row block's partials: DW_P (n_blocks, C), DWD_P = dW_downᵀ and DWU_P = dW_up
    (n_blocks, C, R)."""
    pid = tl.program_id(0)
    mm = WDT.dtype.element_ty
    xdt = X.dtype.element_ty
    row0 = pid.to(tl.int64) * BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    rmask = row0 + offs_m < N
    offs_r = tl.arange(0, BLOCK_R)
    rkmask = offs_r < R
    xb = X + row0 * stride_x  # int32 offsets inside the block
    dob = DOUT + row0 * stride_do
    xo = offs_m[:, None] * stride_x
    doo = offs_m[:, None] * stride_do
    rstd = tl.load(RSTD + row0 + offs_m, mask=rmask, other=0.0)
    a = tl.load(A + (row0 + offs_m[:, None]) * R + offs_r[None, :], mask=rmask[:, None] & rkmask[None, :], other=0.0)
    sa = tl.sigmoid(a)
    h = (a * sa).to(mm)
    part = pid.to(tl.int64) * C  # this block's rows of the partial weight-gradient buffers
    dh = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    s1 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        cmask = offs_c < C
        x = _load_tile(xb + (xo + offs_c[None, :]), rmask, cmask, EVEN_M, EVEN_C).to(tl.float32)
        dout = _load_tile(dob + (doo + offs_c[None, :]), rmask, cmask, EVEN_M, EVEN_C).to(tl.float32)
        w = _load_vec(W + offs_c, cmask, EVEN_C).to(tl.float32)
        wu = _load_tile(WU + (offs_c[:, None] * R + offs_r[None, :]), cmask, rkmask, EVEN_C, EVEN_R)
        yf = x * rstd[:, None] * w[None, :]
        y = yf.to(xdt).to(tl.float32)
        sg = tl.sigmoid(tl.dot(h, tl.trans(wu), input_precision=PREC))
        dg = dout * gate_scale
        du = (dg * y * sg * (1.0 - sg)).to(mm)  # dL/du, u = h W_upᵀ
        dh = tl.dot(du, wu, acc=dh, input_precision=PREC)
        s1 += tl.sum(dg * sg * yf, axis=1)
        dwu = tl.dot(tl.trans(du), h, input_precision=PREC)  # (BLOCK_C, R): this block's dW_up
        _store_tile(DWU_P + part * R + (offs_c[:, None] * R + offs_r[None, :]), dwu, cmask, rkmask, EVEN_C, EVEN_R)
    da = dh * sa * (1.0 + a * (1.0 - sa))  # SiLU'(a)
    da_mm = da.to(mm)
    # Σ_c w·dy·x̂ = Σ_c dout·g·ŷ + Σ_k da_k (W_down ŷ)_k, and W_down ŷ = a
    rsum = (s1 + tl.sum(da_mm.to(tl.float32) * a, axis=1)) / C
    dxb = DX + row0 * stride_dx
    n_chunks = tl.cdiv(C, BLOCK_C)
    for i in range(n_chunks):
        offs_c, cmask, x, w, wu = _reversed_chunk(i, n_chunks, xb, xo, W, WU, offs_r, rmask, rkmask, C, R,
                                                  BLOCK_C, EVEN_M, EVEN_C, EVEN_R)
        dout = _load_tile(dob + (doo + offs_c[None, :]), rmask, cmask, EVEN_M, EVEN_C).to(tl.float32)
        wdt = _load_tile(WDT + (offs_c[:, None] * R + offs_r[None, :]), cmask, rkmask, EVEN_C, EVEN_R)
        xhat = x * rstd[:, None]
        y = (xhat * w[None, :]).to(xdt).to(tl.float32)
        sg = tl.sigmoid(tl.dot(h, tl.trans(wu), input_precision=PREC))
        dy = dout * (gate_scale * sg) + tl.dot(da_mm, tl.trans(wdt), input_precision=PREC)
        dx = ((w[None, :] * dy - xhat * rsum[:, None]) * rstd[:, None]).to(DX.dtype.element_ty)
        _store_tile(dxb + (offs_m[:, None] * stride_dx + offs_c[None, :]), dx, rmask, cmask, EVEN_M, EVEN_C)
        if EVEN_C:
            tl.store(DW_P + part + offs_c, tl.sum(dy * xhat, axis=0))
        else:
            tl.store(DW_P + part + offs_c, tl.sum(dy * xhat, axis=0), mask=cmask)
        dwd = tl.dot(tl.trans(y.to(mm)), da_mm, input_precision=PREC)  # (BLOCK_C, R): this block's dW_downᵀ
        _store_tile(DWD_P + part * R + (offs_c[:, None] * R + offs_r[None, :]), dwd, cmask, rkmask, EVEN_C, EVEN_R)


# ---- launchers ----------------------------------------------------------------------------------------------

def _config(c):
    """(BLOCK_M, fwd BLOCK_C, bwd BLOCK_C, fwd warps, bwd warps, fwd stages, bwd stages, fwd maxnreg, bwd maxnreg).

    SINKFREE_GN_CONFIG="m,fc,bc,fw,bw,fs,bs[,fr,br]" overrides it (GPU sweeps; a maxnreg of 0 leaves ptxas
    free, up to 255 registers). Keep m = 64 per warp group of 4 warps for wgmma. The chunks are capped at C's
    next power of two (>= 16)."""
    env = os.environ.get("SINKFREE_GN_CONFIG")
    cfg = tuple(int(v) for v in env.split(",")) if env else DEFAULT_CONFIG
    if len(cfg) == 7:
        cfg = cfg + (0, 0)
    if len(cfg) != 9:
        raise ValueError(f"SINKFREE_GN_CONFIG={env!r}: want 7 or 9 ints m,fwd_bc,bwd_bc,fwd_warps,bwd_warps,"
                         f"fwd_stages,bwd_stages[,fwd_maxnreg,bwd_maxnreg]")
    cap = max(16, triton.next_power_of_2(c))
    bm, fc, bc, fw, bw, fs, bs, fr, br = cfg
    return bm, min(fc, cap), min(bc, cap), fw, bw, fs, bs, fr or None, br or None


def _prec(mm_dtype):
    return "ieee" if mm_dtype == torch.float32 else "tf32"


def _blocks(n, c, r, block_m, block_c):
    block_r = max(16, triton.next_power_of_2(r))
    return dict(BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_R=block_r, EVEN_M=n % block_m == 0,
                EVEN_C=c % block_c == 0, EVEN_R=r == block_r)


def _mm_weights(w_down, w_up, mm_dtype):
    """W_downᵀ and W_up as (C, r) contiguous in the matmul dtype (tiny; cast once per call)."""
    return w_down.to(mm_dtype).t().contiguous(), w_up.to(mm_dtype).contiguous()


def _rows(t, c):
    t2 = t.reshape(-1, c)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _forward(x, weight, w_down, w_up, eps, gate_scale, mm_dtype):
    c, r = x.shape[-1], w_down.shape[0]
    x2 = _rows(x, c)
    n = x2.shape[0]
    out = torch.empty((n, c), dtype=x.dtype, device=x.device)
    rstd = torch.empty((n,), dtype=torch.float32, device=x.device)
    a = torch.empty((n, r), dtype=torch.float32, device=x.device)
    if n > 0:
        block_m, block_c, _, warps, _, stages, _, maxnreg, _ = _config(c)
        wdt, wu = _mm_weights(w_down, w_up, mm_dtype)
        _gn_fwd[(triton.cdiv(n, block_m),)](
            x2, weight.contiguous(), wdt, wu, out, rstd, a, n, c, r, x2.stride(0), out.stride(0), eps, gate_scale,
            PREC=_prec(mm_dtype), num_warps=warps, num_stages=stages, maxnreg=maxnreg, **_blocks(n, c, r, block_m, block_c),
        )
    lead = x.shape[:-1]
    return out.view(*lead, c), rstd.view(lead), a.view(*lead, r)


def _backward(dout, x, weight, w_down, w_up, rstd, a, gate_scale, mm_dtype):
    c, r = x.shape[-1], w_down.shape[0]
    x2 = _rows(x, c)
    do2 = _rows(dout, c)
    n = x2.shape[0]
    dx = torch.empty((n, c), dtype=x.dtype, device=x.device)
    if n == 0:
        return (dx.view(x.shape), torch.zeros_like(weight), torch.zeros_like(w_down), torch.zeros_like(w_up))
    block_m, _, block_c, _, warps, _, stages, _, maxnreg = _config(c)
    n_blocks = triton.cdiv(n, block_m)
    dw_p = torch.empty((n_blocks, c), dtype=torch.float32, device=x.device)
    dwd_p = torch.empty((n_blocks, c, r), dtype=torch.float32, device=x.device)
    dwu_p = torch.empty((n_blocks, c, r), dtype=torch.float32, device=x.device)
    wdt, wu = _mm_weights(w_down, w_up, mm_dtype)
    _gn_bwd[(n_blocks,)](
        x2, do2, weight.contiguous(), wdt, wu, rstd.reshape(-1).contiguous(), a.reshape(-1, r).contiguous(), dx,
        dw_p, dwd_p, dwu_p, n, c, r, x2.stride(0), do2.stride(0), dx.stride(0), gate_scale,
        PREC=_prec(mm_dtype), num_warps=warps, num_stages=stages, maxnreg=maxnreg, **_blocks(n, c, r, block_m, block_c),
    )
    return (dx.view(x.shape), dw_p.sum(0).to(weight.dtype), dwd_p.sum(0).t().contiguous().to(w_down.dtype),
            dwu_p.sum(0).to(w_up.dtype))


# ---- ops ----------------------------------------------------------------------------------------------------

@torch.library.custom_op("sinkfree::gated_norm_fwd", mutates_args=())
def gated_norm_fwd(x: torch.Tensor, weight: torch.Tensor, w_down: torch.Tensor, w_up: torch.Tensor, eps: float,
                   gate_scale: float, mm_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused GatedNorm forward: (out, rstd, a) with rstd (...,) and a = y W_downᵀ (..., r), both fp32."""
    return _forward(x, weight, w_down, w_up, eps, gate_scale, mm_dtype)


@gated_norm_fwd.register_fake
def _(x, weight, w_down, w_up, eps, gate_scale, mm_dtype):
    lead = x.shape[:-1]
    return (x.new_empty(x.shape), x.new_empty(lead, dtype=torch.float32),
            x.new_empty((*lead, w_down.shape[0]), dtype=torch.float32))


@torch.library.custom_op("sinkfree::gated_norm_bwd", mutates_args=())
def gated_norm_bwd(dout: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, w_down: torch.Tensor,
                   w_up: torch.Tensor, rstd: torch.Tensor, a: torch.Tensor, gate_scale: float,
                   mm_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused GatedNorm backward: (dx, dweight, dw_down, dw_up)."""
    return _backward(dout, x, weight, w_down, w_up, rstd, a, gate_scale, mm_dtype)


@gated_norm_bwd.register_fake
def _(dout, x, weight, w_down, w_up, rstd, a, gate_scale, mm_dtype):
    return x.new_empty(x.shape), weight.new_empty(weight.shape), w_down.new_empty(w_down.shape), \
        w_up.new_empty(w_up.shape)


def _gn_setup(ctx, inputs, output):
    x, weight, w_down, w_up, eps, gate_scale, mm_dtype = inputs
    _, rstd, a = output
    ctx.save_for_backward(x, weight, w_down, w_up, rstd, a)
    ctx.args = (gate_scale, mm_dtype)


def _gn_grad(ctx, dout, drstd, da):
    x, weight, w_down, w_up, rstd, a = ctx.saved_tensors
    dx, dw, dwd, dwu = gated_norm_bwd(dout, x, weight, w_down, w_up, rstd, a, *ctx.args)
    return dx, dw, dwd, dwu, None, None, None


gated_norm_fwd.register_autograd(_gn_grad, setup_context=_gn_setup)


# ---- public API ---------------------------------------------------------------------------------------------

def supported(x, w_down) -> bool:
    """Whether the fused kernels take this rank and dtype (any width C)."""
    return w_down.shape[0] <= MAX_RANK and x.dtype in (torch.float16, torch.bfloat16, torch.float32)


def gated_norm(x, weight, w_down, w_up, eps=1e-5, gate_scale=1.0, mm_dtype: Optional[torch.dtype] = None):
    """Fused GatedNorm over the last dim of x: weight (C,) the multiplicative norm weight, w_down (r, C),
    w_up (C, r) (nn.Linear layouts). Differentiable in x, weight, w_down and w_up. mm_dtype (the operand dtype
    of the rank-r matmuls) defaults to the autocast dtype when autocast is on for x's device, else x.dtype."""
    c, r = x.shape[-1], w_down.shape[0]
    if weight.shape != (c,) or w_down.shape != (r, c) or w_up.shape != (c, r):
        raise ValueError(f"gated_norm wants weight ({c},), w_down (r, {c}), w_up ({c}, r); got "
                         f"{tuple(weight.shape)}, {tuple(w_down.shape)}, {tuple(w_up.shape)}")
    if not supported(x, w_down):
        raise ValueError(f"gated_norm supports r <= {MAX_RANK} and fp16/bf16/fp32, got r={r}, {x.dtype}")
    if mm_dtype is None:
        dev = x.device.type
        mm_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    return gated_norm_fwd(x, weight, w_down, w_up, float(eps), float(gate_scale), mm_dtype)[0]
