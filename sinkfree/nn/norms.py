"""Residual-stream norms: RMSNorm, zero-centred, DyT, identity, PreAffine and GatedNorm."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from sinkfree.nn.params import no_weight_decay

NORM_KINDS = ("rmsnorm", "zero_centered", "dyt", "identity")
RESIDUAL_SINK_KINDS = ("none", "preaffine", "gatednorm")
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # Triton kernels run on CPU tensors (tests)
GATEDNORM_KERNELS = ("torch", "triton_gate", "triton")
GATE_OP_MAX_RANK = 64  # the largest rank sinkfree_kernels.gate_up takes (its MAX_RANK; a test keeps them equal)


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


class GatedNorm(RMSNorm):
    """y = RMSNorm(x); y · gate_scale · σ(W_up SiLU(W_down y)) with a rank-r bottleneck.

    kernel: "torch" (the PyTorch path below, compiled by Inductor in the recipes; the reference, and what runs on
    CPU); "triton_gate": the norm and the down-projection as in "torch", the gate's up-projection, sigmoid and
    product as the Triton op `sinkfree::gate_up_fwd` / `_bwd` (sinkfree_kernels.gate_up: the (N, C) pre-activation
    and its gradient stay in registers) on CUDA or under TRITON_INTERPRET=1, else the torch path; "triton": on
    CUDA the whole norm as the fused op `sinkfree::gated_norm_fwd` / `_bwd` (sinkfree_kernels.gated_norm), also
    for every GatedNorm with SINKFREE_FUSED_GATEDNORM=1 (measured slower than the compiled PyTorch path on an H200:
    0.822x vs 0.895x of the baseline's tokens/s for 125m-gated, see kernels/NOTES.md).

    Under autocast the output is in the autocast dtype (what the next Linear consumes), else in x's dtype."""

    fused = os.environ.get("SINKFREE_FUSED_GATEDNORM", "0") == "1"  # opt-in: slower than Inductor today

    def __init__(self, dim: int, eps: float = 1e-5, rank: int = 16, identity_init: bool = False,
                 zero_centered: bool = False, kernel: str = "torch"):
        if kernel not in GATEDNORM_KERNELS:
            raise ValueError(f"gatednorm_kernel={kernel!r} is not one of {list(GATEDNORM_KERNELS)}")
        self.zero_centered = zero_centered
        super().__init__(dim, eps)
        if kernel == "triton_gate" and rank > GATE_OP_MAX_RANK:
            raise ValueError(f"gatednorm_kernel='triton_gate' supports gatednorm_rank <= {GATE_OP_MAX_RANK}, got "
                             f"{rank}; use gatednorm_kernel 'torch' for larger ranks")
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
        dev = x.device.type
        if torch.is_autocast_enabled(dev):
            # The consumer (a Linear, or DiT's modulation before one) takes autocast-dtype operands, so y and the
            # gated output are kept in that dtype: the compiled step then writes no fp32 copy of y (N, C) for the
            # gate multiply and its backward (GPU kernel traffic, kernels/NOTES.md "GatedNorm in the autocast dtype").
            y = self._norm(x).to(torch.get_autocast_dtype(dev))
        else:
            y = super().forward(x)
        if self.kernel == "triton_gate" and (y.is_cuda or _INTERPRET):
            from sinkfree_kernels.gate_up import gate_up

            h = F.silu(self.gate_down(y))
            return gate_up(y, h, self.gate_up.weight.to(h.dtype), self.gate_scale)
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
