"""SwiGLU feed-forward block."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """down_proj(SiLU(gate_proj x) ⊙ up_proj x), no biases."""

    def __init__(self, dim: int, hidden: int, fused_proj: bool = False):
        super().__init__()
        self.fused_proj = fused_proj  # one GEMM over [gate_proj; up_proj] concatenated at each call
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def reset_parameters(self, std: float, out_std: float) -> None:
        """Normal init: std on the input projections, out_std on down_proj (the residual write)."""
        nn.init.normal_(self.gate_proj.weight, std=std)
        nn.init.normal_(self.up_proj.weight, std=std)
        nn.init.normal_(self.down_proj.weight, std=out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_proj:
            gate, up = F.linear(x, torch.cat([self.gate_proj.weight, self.up_proj.weight])).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)

