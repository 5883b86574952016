"""`VSAAttention`: the attention module with Video Sparse Attention and its coarse-branch gate."""
from __future__ import annotations

import torch
from torch import nn

from sinkfree.attention import AttentionSpec
from sinkfree.attention.vsa import VSATiling, check_vsa_head_dim, vsa_attention, vsa_topk
from sinkfree.nn.attention import Attention
from sinkfree.nn.params import no_weight_decay


class VSAAttention(Attention):
    """Attention whose core is VSA over tile-major tokens: fine + gate_compress(x) ⊙ coarse, then the usual
    sigmoid output gate (attn_gate) and o_proj. `sparsity` (or a fixed `topk`) sets the kept tiles; the
    sparsity-ramp callback changes it while training.

    gate_compress is the authors' `to_gate_compress`: Linear(dim, H*D) of the normed input, no sigmoid;
    zero_init starts it at 0 (pure sparse attention: the retrofit of a dense model)."""

    def __init__(self, dim: int, n_head: int, n_kv_head: int | None = None, head_dim: int | None = None, *,
                 sparsity: float = 0.875, topk: int | None = None, coarse_gate: bool = True,
                 coarse_gate_zero_init: bool = False, spec: AttentionSpec | None = None, **kwargs):
        spec = spec or AttentionSpec("vsa", causal=False)
        super().__init__(dim, n_head, n_kv_head, head_dim, spec=spec, **kwargs)
        check_vsa_head_dim(self.head_dim)
        vsa_topk(1, sparsity)  # validates the value
        if topk is not None and topk < 1:
            raise ValueError(f"vsa_topk={topk!r} must be a positive number of tiles or None")
        self.sparsity, self.topk = float(sparsity), topk
        self.coarse_gate_zero_init = coarse_gate_zero_init
        self.gate_compress = nn.Linear(dim, n_head * self.head_dim) if coarse_gate else None
        if self.gate_compress is not None:
            no_weight_decay(self.gate_compress.bias)

    def reset_parameters(self, std: float, out_std: float) -> None:
        """Attention's init; gate_compress normal(std) or zero (zero_init), bias zero."""
        super().reset_parameters(std, out_std)
        if self.gate_compress is not None:
            nn.init.normal_(self.gate_compress.weight, std=0.0 if self.coarse_gate_zero_init else std)
            nn.init.zeros_(self.gate_compress.bias)

    def in_projections(self) -> list[nn.Linear]:
        """Attention's input projections, then gate_compress (if any): fused into one GEMM with `fused_proj`."""
        lins = super().in_projections()
        return lins + [self.gate_compress] if self.gate_compress is not None else lins

    def kept_tiles(self, n_tiles: int) -> int:
        """Key tiles each query tile keeps: `topk` if set, else from `sparsity`."""
        return min(self.topk, n_tiles) if self.topk is not None else vsa_topk(n_tiles, self.sparsity)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                tiling: VSATiling | None = None) -> torch.Tensor:
        """x (B, S, C) tile-major -> (B, S, C); `tiling` describes the token grid (required)."""
        if tiling is None:
            raise ValueError("attn_backend='vsa' needs the token tiling: call VSAAttention(x, rope, tiling)")
        q, k, v, rest = self.project(x, rope)
        gate_pre = rest[0] if self.gate_proj is not None else None
        sink = None if self.sink is None else self.sink.float()
        if self.capture is not None:  # diagnostics see the dense attention pattern
            return self.output(self.probe_attend(q, k, v, sink), gate_pre)
        gate = None
        if self.gate_compress is not None:
            b, s, _ = x.shape
            gate = rest[-1].view(b, s, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, S, D)
        out = vsa_attention(q, k, v, tiling, self.kept_tiles(tiling.n_tiles), gate, sink, self.spec.scale)
        return self.output(out, gate_pre)
