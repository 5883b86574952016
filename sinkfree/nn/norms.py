"""Residual-stream norms: RMSNorm, zero-centred, DyT, identity, PreAffine and GatedNorm."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from sinkfree.nn.params import no_weight_decay

NORM_KINDS = ("rmsnorm", "zero_centered", "dyt", "identity")
RESIDUAL_SINK_KINDS = ("none", "preaffine", "gatednorm")
GATEDNORM_KERNELS = ("torch", "triton", "fused_up")


def _rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()  # fp32 statistics, as HF Llama does
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)


class RMSNorm(nn.Module):
    """y = x / rms(x) · w, with w init 1 and no weight decay."""

    zero_centered = False

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.dim, self.eps = dim, eps
        init = torch.zeros(dim) if self.zero_centered else torch.ones(dim)
        self.weight = nn.Parameter(init)
        if not self.zero_centered:
            no_weight_decay(self.weight)  # zero-centred keeps decay: it pulls 1 + w towards 1

    def effective_weight(self) -> torch.Tensor:
        """The multiplicative post-norm weight (C,)."""
        return 1.0 + self.weight if self.zero_centered else self.weight

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return _rms_normalize(x, self.eps) * self.effective_weight().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._norm(x).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


class ZeroCenteredRMSNorm(RMSNorm):
    """y = x / rms(x) · (1 + w), w init 0 and weight-decayed (Qwen3-Next)."""

    zero_centered = True


class DyT(nn.Module):
    """Dynamic tanh, the norm-free ablation: y = tanh(α·x)·w + b, α init 0.5."""

    def __init__(self, dim: int, eps: float = 1e-5, alpha_init: float = 0.5):
        super().__init__()
        del eps  # accepted so every norm builds from the same arguments
        self.alpha = no_weight_decay(nn.Parameter(torch.tensor(float(alpha_init))))
        self.weight = no_weight_decay(nn.Parameter(torch.ones(dim)))
        self.bias = no_weight_decay(nn.Parameter(torch.zeros(dim)))

    def effective_weight(self) -> torch.Tensor:
        """The multiplicative output weight (C,)."""
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.alpha * x) * self.weight + self.bias


class IdentityNorm(nn.Module):
    """No normalisation (the residual-side "remove the norm" ablation)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.register_buffer("_ones", torch.ones(dim), persistent=False)

    def effective_weight(self) -> torch.Tensor:
        """Ones (C,)."""
        return self._ones

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class PreAffineRMSNorm(RMSNorm):
    """RMSNorm(λ ⊙ x) with λ = `pre_scale` init 1 and no weight decay: absorbs residual sinks."""

    def __init__(self, dim: int, eps: float = 1e-5, zero_centered: bool = False):
        self.zero_centered = zero_centered
        super().__init__(dim, eps)
        self.pre_scale = no_weight_decay(nn.Parameter(torch.ones(dim)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._norm(x.float() * self.pre_scale.float()).to(x.dtype)


def _rank_r(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """h wᵀ in fp32 for h (..., r), w (C, r): a rank-r product. While torch.compile traces, as r broadcast
    multiply-adds, so Inductor computes it inside the consumer's pointwise kernel instead of a skinny GEMM
    writing (..., C); eagerly one matmul. Operands rounded to h's dtype (as nn.Linear under autocast)."""
    w = w.to(h.dtype).float()
    if not torch.compiler.is_compiling():
        return h.float() @ w.t()
    u = h[..., 0:1].float() * w[:, 0]
    for r in range(1, w.shape[1]):
        u = u + h[..., r:r + 1].float() * w[:, r]
    return u


def _rank_r_down(y: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """y W_downᵀ (..., r) for w_down (r, C), in the autocast dtype under autocast (as nn.Linear), else y's. While
    torch.compile traces, as r row sums of y·W_down[j]: Inductor folds them into the kernel that produces y (one
    pass over the row, no (N, C) copy of y for a GEMM); eagerly F.linear."""
    dt = torch.get_autocast_dtype(y.device.type) if torch.is_autocast_enabled(y.device.type) else y.dtype
    if not torch.compiler.is_compiling():
        return F.linear(y.to(dt), w_down.to(dt))
    yl, w = y.to(dt).float(), w_down.to(dt).float()
    return torch.stack([(yl * w[j]).sum(-1) for j in range(w.shape[0])], dim=-1).to(dt)


class _Gate(torch.autograd.Function):
    """GatedNorm's gating for gatednorm_kernel='fused_up': out = y · scale·σ(W_up SiLU(W_down y)).

    While compiling, the forward is one Inductor kernel with the norm before it: a = y W_downᵀ as r row sums
    (`_rank_r_down`) and u = h W_upᵀ as r multiply-adds (`_rank_r`), so neither u nor a GEMM copy of y is written.
    The backward recomputes u the same way, takes dh = du W_up as r row sums in du's kernel and da W_down (its
    input gradient through W_down) as r multiply-adds in the dx kernel; only the reductions over the rows
    (dW_up = duᵀh, dW_down = daᵀy) stay GEMMs. Saves y and a (N, r). Products in a's dtype (the autocast dtype
    under autocast, as nn.Linear) with fp32 sums."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, w_down: torch.Tensor, w_up: torch.Tensor, scale: float) -> torch.Tensor:
        a = _rank_r_down(y, w_down)
        h = F.silu(a)
        ctx.save_for_backward(y, a, w_down, w_up)
        ctx.scale = scale
        return (y * (scale * torch.sigmoid(_rank_r(h, w_up)))).to(y.dtype)  # y's dtype, as the plain path

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        y, a, w_down, w_up = ctx.saved_tensors
        mm = a.dtype
        h = F.silu(a)
        # g rounded to the GEMM dtype, as the plain path's u (nn.Linear's output) and its sigmoid are
        g = (ctx.scale * torch.sigmoid(_rank_r(h, w_up))).to(mm).float()
        du = (dout * y * g * (1.0 - g / ctx.scale)).to(mm)
        dh = _rank_r_down(du, w_up.t())  # (N, r): du W_up, row sums while compiling (folded into du's kernel)
        rows_h = h.reshape(-1, h.shape[-1])
        dw_up = du.reshape(-1, du.shape[-1]).t() @ rows_h  # (C, r)
        sa = torch.sigmoid(a.float())
        da = (dh.float() * sa * (1.0 + a.float() * (1.0 - sa))).to(mm)  # SiLU'(a)
        dw_down = da.reshape(-1, da.shape[-1]).t() @ y.reshape(-1, y.shape[-1]).to(mm)  # (r, C)
        dy = dout * g + _rank_r(da, w_down.t())
        return dy.to(y.dtype), dw_down.to(w_down.dtype), dw_up.to(w_up.dtype), None


class GatedNorm(RMSNorm):
    """y = RMSNorm(x); y · gate_scale · σ(W_up SiLU(W_down y)) with a rank-r bottleneck.

    kernel: "torch" (the PyTorch path below, compiled by Inductor in the recipes; the reference, and what runs on
    CPU); "triton": on CUDA the fused op `sinkfree::gated_norm_fwd` / `_bwd` (sinkfree_kernels.gated_norm), also
    for every GatedNorm with SINKFREE_FUSED_GATEDNORM=1 (measured slower than the compiled PyTorch path on an H200:
    0.840x vs 0.868x of the baseline's tokens/s for 125m-gated, see kernels/NOTES.md); "fused_up": the PyTorch
    path as one autograd Function (`_Gate`) whose two (N, C)-wide rank-r products Inductor computes inside the
    pointwise kernels, never written (experimental, not yet timed on a GPU)."""

    fused = os.environ.get("SINKFREE_FUSED_GATEDNORM", "0") == "1"  # opt-in: slower than Inductor today

    def __init__(self, dim: int, eps: float = 1e-5, rank: int = 16, identity_init: bool = False,
                 zero_centered: bool = False, kernel: str = "torch"):
        if kernel not in GATEDNORM_KERNELS:
            raise ValueError(f"gatednorm_kernel={kernel!r} is not one of {list(GATEDNORM_KERNELS)}")
        self.zero_centered = zero_centered
        super().__init__(dim, eps)
        self.kernel = kernel
        if kernel == "triton":
            self.fused = True  # instance attribute: this norm uses the Triton op on CUDA
        self.gate_down = nn.Linear(dim, rank, bias=False)  # (C -> r)
        self.gate_up = nn.Linear(rank, dim, bias=False)  # (r -> C)
        self.identity_init = identity_init
        # identity_init: W_up = 0 so σ = 1/2, times 2 is exactly 1 (retrofits); else the paper's σ ≈ 1/2 start.
        self.gate_scale = 2.0 if identity_init else 1.0
        if identity_init:
            nn.init.zeros_(self.gate_up.weight)

    def gate(self, y: torch.Tensor) -> torch.Tensor:
        """The elementwise gate gate_scale·σ(W_up SiLU(W_down y)), same shape as y."""
        return self.gate_scale * torch.sigmoid(self.gate_up(F.silu(self.gate_down(y))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and x.is_cuda:
            from sinkfree_kernels.gated_norm import gated_norm, supported

            if supported(x, self.gate_down.weight):
                return gated_norm(x, self.effective_weight(), self.gate_down.weight, self.gate_up.weight,
                                  self.eps, self.gate_scale)
        y = super().forward(x)
        if self.kernel == "fused_up":
            return _Gate.apply(y, self.gate_down.weight, self.gate_up.weight, self.gate_scale)
        return y * self.gate(y)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.gate_down.out_features}, gate_scale={self.gate_scale}"


def build_norm(kind: str, residual_sink: str, dim: int, eps: float = 1e-5, rank: int = 16,
               identity_init: bool = False, gatednorm_kernel: str = "torch") -> nn.Module:
    """The norm for `norm=kind` and `residual_sink=residual_sink` over a width-`dim` stream."""
    if kind not in NORM_KINDS:
        raise ValueError(f"norm={kind!r} is not one of {list(NORM_KINDS)}")
    if residual_sink not in RESIDUAL_SINK_KINDS:
        raise ValueError(f"residual_sink={residual_sink!r} is not one of {list(RESIDUAL_SINK_KINDS)}")
    if residual_sink != "none" and kind not in ("rmsnorm", "zero_centered"):
        raise ValueError(f"residual_sink={residual_sink!r} modifies an RMSNorm; it needs norm rmsnorm or "
                         f"zero_centered, got norm={kind!r}")
    zc = kind == "zero_centered"
    if residual_sink == "preaffine":
        return PreAffineRMSNorm(dim, eps, zero_centered=zc)
    if residual_sink == "gatednorm":
        return GatedNorm(dim, eps, rank=rank, identity_init=identity_init, zero_centered=zc,
                         kernel=gatednorm_kernel)
    return {"rmsnorm": RMSNorm, "zero_centered": ZeroCenteredRMSNorm, "dyt": DyT,
            "identity": IdentityNorm}[kind](dim, eps)
