"""Fused GatedNorm: out = y · gate_scale · σ(W_up SiLU(W_down y)), y = RMSNorm(x) · w (fp32 statistics).

One forward kernel and one backward kernel over blocks of BLOCK_M full rows (C <= 1024, padded to a power of
two and masked; the rank r <= 16 is padded to 16 for tl.dot; larger shapes fall back to PyTorch). The forward stores out (x.dtype), rstd
(N,) fp32 and the gate pre-activation a = y W_downᵀ (N, r) fp32; the backward recomputes y, h = SiLU(a),
u = h W_upᵀ and g from them and writes dx plus per-program partial weight gradients (summed with torch:
deterministic). Both kernels are persistent (programs loop over row blocks) so the weights are read once
per program.

The small matmuls take their operands in `mm_dtype` (the autocast dtype under autocast, else x.dtype; fp32
runs IEEE) with fp32 accumulation, as `nn.Linear` would under autocast. Public entry point:
`gated_norm(x, weight, w_down, w_up, eps, gate_scale)`; `gated_norm_reference` is the PyTorch oracle.
"""

import os
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._tuning import INTERPRET

MAX_DIM = 1024  # one row block holds whole rows; wider rows need more than 227 KB of shared memory on sm_90
MAX_RANK = 16  # W_down and W_up stay in shared memory; rank 32 at C 1024 does not fit
# Software-pipelining depth of the persistent row loops: 1 (none). Triton's default (3) buffers every
# (BLOCK_M, BLOCK_C) tile per stage; on an H200 at C = 768 (BLOCK_C 1024) that asked for 267-398 KB of shared
# memory (227 KB per block) and the first GPU runs failed with OutOfResources; the forward at 2 stages still
# asked for 262 KB with bf16 inputs. Unpipelined, the sm_90 compile needs <= 164 KB.
FWD_STAGES = 1
BWD_STAGES = 1


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
def _load_weights(W, WD, WU, MMREF, C, R, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """w (BLOCK_C,) fp32, W_downᵀ (BLOCK_C, BLOCK_R) and W_up (BLOCK_C, BLOCK_R) in the matmul dtype."""
    mm = MMREF.dtype.element_ty
    offs_c = tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    cmask = offs_c < C
    wmask = cmask[:, None] & (offs_r < R)[None, :]
    w = tl.load(W + offs_c, mask=cmask, other=0.0).to(tl.float32)
    wd_t = tl.load(WD + offs_r[None, :] * C + offs_c[:, None], mask=wmask, other=0.0).to(mm)
    wu = tl.load(WU + offs_c[:, None] * R + offs_r[None, :], mask=wmask, other=0.0).to(mm)
    return w, wd_t, wu


@triton.jit
def _gn_fwd(X, W, WD, WU, OUT, RSTD, A, MMREF, N, C, R, stride_x, stride_o, eps, gate_scale,
            BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    mm = MMREF.dtype.element_ty
    w, wd_t, wu = _load_weights(W, WD, WU, MMREF, C, R, BLOCK_C, BLOCK_R)
    offs_c = tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    cmask = offs_c < C
    n_blocks = tl.cdiv(N, BLOCK_M)
    for blk in range(pid, n_blocks, nprog):
        rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < N
        m2 = rmask[:, None] & cmask[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(X + rows64[:, None] * stride_x + offs_c[None, :], mask=m2, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / C + eps)
        y = x * rstd[:, None] * w[None, :]
        a = tl.dot(y.to(mm), wd_t, input_precision=PREC)  # (M, R) fp32
        h = a * tl.sigmoid(a)
        u = tl.dot(h.to(mm), tl.trans(wu), input_precision=PREC)  # (M, C)
        out = y * (gate_scale * tl.sigmoid(u))
        tl.store(OUT + rows64[:, None] * stride_o + offs_c[None, :], out.to(OUT.dtype.element_ty), mask=m2)
        tl.store(RSTD + rows, rstd, mask=rmask)
        tl.store(A + rows64[:, None] * R + offs_r[None, :], a, mask=rmask[:, None] & (offs_r < R)[None, :])


@triton.jit
def _gn_bwd(X, DOUT, W, WD, WU, RSTD, A, DX, DW_P, DWD_P, DWU_P, MMREF, N, C, R,
            stride_x, stride_do, stride_dx, gate_scale,
            BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    mm = MMREF.dtype.element_ty
    w, wd_t, wu = _load_weights(W, WD, WU, MMREF, C, R, BLOCK_C, BLOCK_R)
    offs_c = tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    cmask = offs_c < C
    rkmask = offs_r < R
    dw_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    dwd_acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)  # dL/dW_down (r, C)
    dwu_acc = tl.zeros((BLOCK_C, BLOCK_R), dtype=tl.float32)  # dL/dW_up (C, r)
    n_blocks = tl.cdiv(N, BLOCK_M)
    for blk in range(pid, n_blocks, nprog):
        rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < N
        m2 = rmask[:, None] & cmask[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(X + rows64[:, None] * stride_x + offs_c[None, :], mask=m2, other=0.0).to(tl.float32)
        dout = tl.load(DOUT + rows64[:, None] * stride_do + offs_c[None, :], mask=m2, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        a = tl.load(A + rows64[:, None] * R + offs_r[None, :], mask=rmask[:, None] & rkmask[None, :], other=0.0)
        xhat = x * rstd[:, None]
        y = xhat * w[None, :]
        y_mm = y.to(mm)
        sa = tl.sigmoid(a)
        h_mm = (a * sa).to(mm)
        s = tl.sigmoid(tl.dot(h_mm, tl.trans(wu), input_precision=PREC))
        g = gate_scale * s
        du = dout * y * g * (1.0 - s)  # dL/du, u = h W_upᵀ
        du_mm = du.to(mm)
        dh = tl.dot(du_mm, wu, input_precision=PREC)  # (M, R)
        da = dh * sa * (1.0 + a * (1.0 - sa))  # SiLU'(a)
        da_mm = da.to(mm)
        dy = dout * g + tl.dot(da_mm, tl.trans(wd_t), input_precision=PREC)
        wdy = w[None, :] * dy
        c1 = tl.sum(xhat * wdy, axis=1) / C
        dx = (wdy - xhat * c1[:, None]) * rstd[:, None]
        tl.store(DX + rows64[:, None] * stride_dx + offs_c[None, :], dx.to(DX.dtype.element_ty), mask=m2)
        dw_acc += tl.sum(dy * xhat, axis=0)
        dwu_acc = tl.dot(tl.trans(du_mm), h_mm, acc=dwu_acc, input_precision=PREC)
        dwd_acc = tl.dot(tl.trans(da_mm), y_mm, acc=dwd_acc, input_precision=PREC)
    base = pid.to(tl.int64) * C * R
    wmask = cmask[:, None] & rkmask[None, :]
    tl.store(DW_P + pid.to(tl.int64) * C + offs_c, dw_acc, mask=cmask)
    tl.store(DWU_P + base + offs_c[:, None] * R + offs_r[None, :], dwu_acc, mask=wmask)
    tl.store(DWD_P + base + offs_r[:, None] * C + offs_c[None, :], dwd_acc, mask=rkmask[:, None] & cmask[None, :])


# ---- launchers ----------------------------------------------------------------------------------------------

_SM_COUNT = {}


def _n_programs(x, n_blocks, per_sm):
    if INTERPRET or not x.is_cuda:
        return max(1, min(n_blocks, 4))
    idx = x.device.index if x.device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return max(1, min(n_blocks, _SM_COUNT[idx] * per_sm))


def _config(block_c):
    """(BLOCK_M, fwd warps, bwd warps, fwd programs per SM, bwd programs per SM); SINKFREE_GN_CONFIG="m,fw,bw,fp,bp"
    overrides it (for tuning sweeps)."""
    env = os.environ.get("SINKFREE_GN_CONFIG")
    if env:
        return tuple(int(v) for v in env.split(","))
    if block_c <= 256:
        return 32, 4, 4, 4, 2
    return 16, 8, 16, 2, 1  # block_c <= MAX_DIM = 1024


def _prec(mm_dtype):
    return "ieee" if mm_dtype == torch.float32 else "tf32"


def _shapes(x, w_down):
    c = x.shape[-1]
    r = w_down.shape[0]
    return c, r, triton.next_power_of_2(c), max(16, triton.next_power_of_2(r))


def _mmref(mm_dtype, device):
    return torch.empty(1, dtype=mm_dtype, device=device)


def _forward(x, weight, w_down, w_up, eps, gate_scale, mm_dtype):
    c, r, block_c, block_r = _shapes(x, w_down)
    x2 = x.reshape(-1, c)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    n = x2.shape[0]
    out = torch.empty((n, c), dtype=x.dtype, device=x.device)
    rstd = torch.empty((n,), dtype=torch.float32, device=x.device)
    a = torch.empty((n, r), dtype=torch.float32, device=x.device)
    if n > 0:
        block_m, warps, _, per_sm, _ = _config(block_c)
        n_blocks = triton.cdiv(n, block_m)
        _gn_fwd[(_n_programs(x, n_blocks, per_sm),)](
            x2, weight.contiguous(), w_down.contiguous(), w_up.contiguous(), out, rstd, a,
            _mmref(mm_dtype, x.device), n, c, r, x2.stride(0), out.stride(0), eps, gate_scale,
            BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_R=block_r, PREC=_prec(mm_dtype), num_warps=warps, num_stages=FWD_STAGES,
        )
    lead = x.shape[:-1]
    return out.view(*lead, c), rstd.view(lead), a.view(*lead, r)


def _backward(dout, x, weight, w_down, w_up, rstd, a, gate_scale, mm_dtype):
    c, r, block_c, block_r = _shapes(x, w_down)
    x2 = x.reshape(-1, c)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    do2 = dout.reshape(-1, c)
    if do2.stride(-1) != 1:
        do2 = do2.contiguous()
    n = x2.shape[0]
    dx = torch.empty((n, c), dtype=x.dtype, device=x.device)
    if n == 0:
        return (dx.view(x.shape), torch.zeros_like(weight), torch.zeros_like(w_down), torch.zeros_like(w_up))
    block_m, _, warps, _, per_sm = _config(block_c)
    n_blocks = triton.cdiv(n, block_m)
    p = _n_programs(x, n_blocks, per_sm)
    dw_p = torch.empty((p, c), dtype=torch.float32, device=x.device)
    dwd_p = torch.empty((p, r, c), dtype=torch.float32, device=x.device)
    dwu_p = torch.empty((p, c, r), dtype=torch.float32, device=x.device)
    _gn_bwd[(p,)](
        x2, do2, weight.contiguous(), w_down.contiguous(), w_up.contiguous(), rstd.reshape(-1).contiguous(),
        a.reshape(-1, r).contiguous(), dx, dw_p, dwd_p, dwu_p, _mmref(mm_dtype, x.device), n, c, r,
        x2.stride(0), do2.stride(0), dx.stride(0), gate_scale,
        BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_R=block_r, PREC=_prec(mm_dtype), num_warps=warps, num_stages=BWD_STAGES,
    )
    return (dx.view(x.shape), dw_p.sum(0).to(weight.dtype), dwd_p.sum(0).to(w_down.dtype),
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
    """Whether the fused kernels take this width and rank."""
    return x.shape[-1] <= MAX_DIM and w_down.shape[0] <= MAX_RANK and x.dtype in (
        torch.float16, torch.bfloat16, torch.float32)


def gated_norm(x, weight, w_down, w_up, eps=1e-5, gate_scale=1.0, mm_dtype: Optional[torch.dtype] = None):
    """Fused GatedNorm over the last dim of x: weight (C,) the multiplicative norm weight, w_down (r, C),
    w_up (C, r) (nn.Linear layouts). Differentiable in x, weight, w_down and w_up. mm_dtype (the operand dtype
    of the rank-r matmuls) defaults to the autocast dtype when autocast is on for x's device, else x.dtype."""
    c, r = x.shape[-1], w_down.shape[0]
    if weight.shape != (c,) or w_down.shape != (r, c) or w_up.shape != (c, r):
        raise ValueError(f"gated_norm wants weight ({c},), w_down (r, {c}), w_up ({c}, r); got "
                         f"{tuple(weight.shape)}, {tuple(w_down.shape)}, {tuple(w_up.shape)}")
    if not supported(x, w_down):
        raise ValueError(f"gated_norm supports C <= {MAX_DIM}, r <= {MAX_RANK} and fp16/bf16/fp32, got C={c}, "
                         f"r={r}, {x.dtype}")
    if mm_dtype is None:
        dev = x.device.type
        mm_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    return gated_norm_fwd(x, weight, w_down, w_up, float(eps), float(gate_scale), mm_dtype)[0]
