"""GatedNorm's gate as one op: out = y · gate_scale · σ(h W_upᵀ), h = SiLU(W_down y) of rank r.

Only the part of GatedNorm that Inductor cannot fuse well: the rank-r up-projection u = h W_upᵀ is a GEMM with
K = r (16 in the recipes), which cuBLAS runs as a kernel that writes u (N, C) for an elementwise kernel to read
back, and whose backward is two more skinny GEMMs (dW_up = duᵀ h, dh = du W_up) reading a written du (N, C).
Here u and du live only in registers:

- forward (`_gate_fwd`), one program per (BLOCK_M rows, BLOCK_C columns) tile: u = h W_upᵀ with one tl.dot over
  K = r (padded to 16), out = y · gate_scale · σ(u) rounded once to y's dtype. Reads y and h, writes out.
- backward (`_gate_bwd`), one program per BLOCK_M_BWD rows, looping over column chunks: recompute u, σ;
  dy = dout · gate_scale · σ (stored); du = dout · y · gate_scale · σ(1 − σ) (rounded to the matmul dtype, as
  the GEMMs of the PyTorch path get it); dh += du W_up; this block's dW_up partial duᵀ h (BLOCK_C, r) goes to
  an (n_blocks, C, r) fp32 buffer that torch sums (deterministic, no atomics). Reads dout, y, h, writes dy, dh.

The RMSNorm, the down-projection, SiLU and their backward stay in PyTorch (Inductor fuses them with the residual
stream); the earlier whole-norm op (`gated_norm.py`) lost to Inductor because it hid those from it.
The ops are `torch.library.triton_op`s, so a compiled graph calls the kernels directly and fuses the partial
sum and casts around them (custom ops under the interpreter, see `_op`). Operands of the dots are in h's dtype
(the autocast dtype under autocast), fp32 accumulation; fp32 inputs use IEEE dots.
Measured variants (kernels/NOTES.md "GatedNorm gate op"): u by rank-1 FMA updates instead of tl.dot (2x slower
backward, never picked forward), column groups with per-group dh partials, prefetching the next chunk, 64/256
rows per backward program: none beat this layout on an H200.
"""

import torch
import triton
import triton.language as tl
from torch.library import custom_op, triton_op, wrap_triton

from ._tuning import INTERPRET, seq_bucket
from .gated_norm import _prec, _rows

# Under TRITON_INTERPRET=1 wrap_triton hands back the raw kernel, so tracing a triton_op would run the interpreter on
# fake tensors: there the ops are opaque custom ops (same kernels, fake functions and autograd), elsewhere triton_ops.
_op = custom_op if INTERPRET else triton_op
_wrap = (lambda kernel: kernel) if INTERPRET else wrap_triton

MAX_RANK = 64
BLOCK_M_BWD = 128  # rows per backward program: fixed, since it sizes the dW_up partial buffer (128 was fastest)


def _fwd_configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_C": 32}, num_warps=4, num_stages=1)]
    specs = [(32, 128, 4, 2), (64, 128, 8, 1), (64, 128, 4, 2), (32, 256, 8, 2), (128, 128, 8, 2), (32, 64, 4, 1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_C": bc}, num_warps=w, num_stages=s) for bm, bc, w, s in specs]


def _bwd_configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_C": 32}, num_warps=4, num_stages=1)]
    specs = [(32, 8, 3), (32, 4, 3), (32, 8, 4), (64, 4, 3), (64, 8, 3)]
    return [triton.Config({"BLOCK_C": bc}, num_warps=w, num_stages=s) for bc, w, s in specs]


@triton.jit
def _pre_activation(h, w_ptr, cols, rk, cmask, kmask, R: tl.constexpr, PREC: tl.constexpr):
    """u = h W_upᵀ (fp32) for the rows of h (BLOCK_M, BLOCK_R) and the columns `cols`; also returns the W_up
    tile (BLOCK_C, BLOCK_R), zero outside C and r."""
    w = tl.load(w_ptr + cols[:, None] * R + rk[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
    return tl.dot(h, tl.trans(w), input_precision=PREC), w


@triton.autotune(configs=_fwd_configs(), key=["C", "BLOCK_R", "N_BUCKET"])
@triton.jit
def _gate_fwd(y_ptr, h_ptr, w_ptr, out_ptr, N, C, R: tl.constexpr, stride_y, stride_h, stride_o, gate_scale, N_BUCKET,
              BLOCK_R: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rk = tl.arange(0, BLOCK_R)
    rmask, cmask, kmask = rows < N, cols < C, rk < R
    rows64 = rows.to(tl.int64)
    h = tl.load(h_ptr + rows64[:, None] * stride_h + rk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
    u, _ = _pre_activation(h, w_ptr, cols, rk, cmask, kmask, R, PREC)
    m2 = rmask[:, None] & cmask[None, :]
    y = tl.load(y_ptr + rows64[:, None] * stride_y + cols[None, :], mask=m2, other=0.0)
    out = y.to(tl.float32) * (gate_scale * tl.sigmoid(u))
    tl.store(out_ptr + rows64[:, None] * stride_o + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=m2)


@triton.autotune(configs=_bwd_configs(), key=["C", "BLOCK_R", "N_BUCKET"])
@triton.jit
def _gate_bwd(do_ptr, y_ptr, h_ptr, w_ptr, dy_ptr, dh_ptr, dwp_ptr, N, C, R: tl.constexpr, stride_do, stride_y,
              stride_h, stride_dy, stride_dh, gate_scale, N_BUCKET, BLOCK_R: tl.constexpr, PREC: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_R)
    rmask, kmask = rows < N, rk < R
    rows64 = rows.to(tl.int64)
    h = tl.load(h_ptr + rows64[:, None] * stride_h + rk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
    dh = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < C
        u, w = _pre_activation(h, w_ptr, cols, rk, cmask, kmask, R, PREC)
        s = tl.sigmoid(u)
        m2 = rmask[:, None] & cmask[None, :]
        do = tl.load(do_ptr + rows64[:, None] * stride_do + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + rows64[:, None] * stride_y + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        g = gate_scale * s
        tl.store(dy_ptr + rows64[:, None] * stride_dy + cols[None, :], (do * g).to(dy_ptr.dtype.element_ty), mask=m2)
        du = (do * y * g * (1.0 - s)).to(h.dtype)  # zero outside the rows and columns (do is)
        dh += tl.dot(du, w, input_precision=PREC)
        dwp = tl.dot(tl.trans(du), h, input_precision=PREC)  # (BLOCK_C, BLOCK_R)
        tl.store(dwp_ptr + (pid * C + cols[:, None]).to(tl.int64) * R + rk[None, :], dwp,
                 mask=cmask[:, None] & kmask[None, :])
    tl.store(dh_ptr + rows64[:, None] * stride_dh + rk[None, :], dh.to(dh_ptr.dtype.element_ty),
             mask=rmask[:, None] & kmask[None, :])


@_op("sinkfree::gate_up_fwd", mutates_args={})
def gate_up_fwd(y: torch.Tensor, h: torch.Tensor, w_up: torch.Tensor, gate_scale: float) -> torch.Tensor:
    """out = y · gate_scale · σ(h W_upᵀ): y (..., C), h (..., r), w_up (C, r) in h's dtype; out like y."""
    c, r = y.shape[-1], h.shape[-1]
    y2, h2, w = _rows(y, c), _rows(h, r), w_up.contiguous()
    n = y2.shape[0]
    out = torch.empty((n, c), dtype=y.dtype, device=y.device)
    if n > 0:
        def grid(meta):
            return (triton.cdiv(n, meta["BLOCK_M"]), triton.cdiv(c, meta["BLOCK_C"]))
        _wrap(_gate_fwd)[grid](y2, h2, w, out, n, c, r, y2.stride(0), h2.stride(0), out.stride(0),
                                     gate_scale, seq_bucket(n), BLOCK_R=max(16, triton.next_power_of_2(r)),
                                     PREC=_prec(h.dtype))
    return out.view(y.shape)


@_op("sinkfree::gate_up_bwd", mutates_args={})
def gate_up_bwd(dout: torch.Tensor, y: torch.Tensor, h: torch.Tensor, w_up: torch.Tensor,
                gate_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dy, dh, dw_up) of `gate_up_fwd` for the output gradient dout."""
    c, r = y.shape[-1], h.shape[-1]
    do2, y2, h2, w = _rows(dout, c), _rows(y, c), _rows(h, r), w_up.contiguous()
    n = y2.shape[0]
    dy = torch.empty((n, c), dtype=y.dtype, device=y.device)
    dh = torch.empty((n, r), dtype=h.dtype, device=h.device)
    n_blocks = triton.cdiv(n, BLOCK_M_BWD)
    dwp = torch.empty((n_blocks, c, r), dtype=torch.float32, device=y.device)
    if n > 0:
        _wrap(_gate_bwd)[(n_blocks,)](do2, y2, h2, w, dy, dh, dwp, n, c, r, do2.stride(0), y2.stride(0),
                                      h2.stride(0), dy.stride(0), dh.stride(0), gate_scale, seq_bucket(n),
                                      BLOCK_R=max(16, triton.next_power_of_2(r)), PREC=_prec(h.dtype),
                                      BLOCK_M=BLOCK_M_BWD)
    return dy.view(y.shape), dh.view(h.shape), dwp.sum(0).to(w_up.dtype)


@gate_up_fwd.register_fake
def _(y, h, w_up, gate_scale):
    return torch.empty_like(y, memory_format=torch.contiguous_format)


@gate_up_bwd.register_fake
def _(dout, y, h, w_up, gate_scale):
    return (torch.empty_like(y, memory_format=torch.contiguous_format),
            torch.empty_like(h, memory_format=torch.contiguous_format), torch.empty_like(w_up))


def _setup(ctx, inputs, output):
    y, h, w_up, gate_scale = inputs
    ctx.save_for_backward(y, h, w_up)
    ctx.gate_scale = gate_scale


def _grad(ctx, dout):
    y, h, w_up = ctx.saved_tensors
    dy, dh, dw = gate_up_bwd(dout.contiguous(), y, h, w_up, ctx.gate_scale)
    return dy, dh, dw, None


gate_up_fwd.register_autograd(_grad, setup_context=_setup)


def gate_up_reference(y, h, w_up, gate_scale=1.0):
    """The PyTorch math of `gate_up`: y · gate_scale · σ(h W_upᵀ)."""
    return y * (gate_scale * torch.sigmoid(torch.nn.functional.linear(h, w_up)))


def gate_up(y: torch.Tensor, h: torch.Tensor, w_up: torch.Tensor, gate_scale: float = 1.0) -> torch.Tensor:
    """y · gate_scale · σ(h W_upᵀ) over the last dim, differentiable in y, h and w_up: y (..., C), h (..., r)
    with r <= 64, w_up (C, r) in h's dtype (cast it as autocast would: `w_up.to(h.dtype)`)."""
    c, r = y.shape[-1], h.shape[-1]
    if h.shape[:-1] != y.shape[:-1] or w_up.shape != (c, r):
        raise ValueError(f"gate_up wants y (..., C), h (..., r) with the same leading dims and w_up (C, r); got "
                         f"y {tuple(y.shape)}, h {tuple(h.shape)}, w_up {tuple(w_up.shape)}")
    if r > MAX_RANK or h.dtype != w_up.dtype or y.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"gate_up supports r <= {MAX_RANK}, w_up in h's dtype and fp16/bf16/fp32 y; got r={r}, "
                         f"h {h.dtype}, w_up {w_up.dtype}, y {y.dtype}")
    return gate_up_fwd(y, h, w_up, float(gate_scale))
