"""Attention module: projections, qk-norm, RoPE, output gate, sink logits and the probe hook."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sinkfree.attention import AttentionSpec, attend, attend_with_probs, check_spec
from sinkfree.nn.norms import RMSNorm
from sinkfree.nn.params import no_weight_decay
from sinkfree.nn.rope import apply_rope

ATTN_GATE_KINDS = ("none", "headwise", "elementwise")
ATTN_SINK_KINDS = ("none", "learnable", "off_by_one")


class Attention(nn.Module):
    """Multi-head (GQA) attention with optional qk-norm, sigmoid output gate and sink logits."""

    def __init__(self, dim: int, n_head: int, n_kv_head: int | None = None, head_dim: int | None = None, *,
                 bias: bool = False, qk_norm: bool = False, norm_eps: float = 1e-5, gate: str = "none",
                 sink: str = "none", sink_init: float = 0.0, spec: AttentionSpec | None = None,
                 gate_identity_init: bool = False, fused_proj: bool = False):
        super().__init__()
        n_kv_head = n_kv_head or n_head
        head_dim = head_dim or dim // n_head
        if gate not in ATTN_GATE_KINDS:
            raise ValueError(f"attn_gate={gate!r} is not one of {list(ATTN_GATE_KINDS)}")
        if sink not in ATTN_SINK_KINDS:
            raise ValueError(f"attn_sink={sink!r} is not one of {list(ATTN_SINK_KINDS)}")
        if n_head % n_kv_head:
            raise ValueError(f"n_head={n_head} must be a multiple of n_kv_head={n_kv_head}")
        self.spec = spec or AttentionSpec()
        check_spec(self.spec, has_sink=sink != "none")
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, head_dim
        self.gate_kind, self.sink_kind = gate, sink
        self.q_proj = nn.Linear(dim, n_head * head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, n_kv_head * head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, n_kv_head * head_dim, bias=bias)
        self.o_proj = nn.Linear(n_head * head_dim, dim, bias=False)
        for lin in (self.q_proj, self.k_proj, self.v_proj):
            no_weight_decay(lin.bias)
        self.q_norm = RMSNorm(head_dim, norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, norm_eps) if qk_norm else None
        # gate column h*D + d multiplies head h, dim d (elementwise); column h multiplies head h (headwise).
        gate_out = {"none": 0, "headwise": n_head, "elementwise": n_head * head_dim}[gate]
        self.gate_proj = nn.Linear(dim, gate_out, bias=False) if gate_out else None
        # gate_identity_init (retrofits): zero gate weights and 2·σ(·), so the gate starts as exactly 1.
        self.gate_identity_init = gate_identity_init
        self.gate_scale = 2.0 if gate_identity_init else 1.0
        if sink == "learnable":
            self.sink = no_weight_decay(nn.Parameter(torch.full((n_head,), float(sink_init))))
        elif sink == "off_by_one":
            self.register_buffer("sink", torch.zeros(n_head), persistent=False)
        else:
            self.sink = None
        self.sink_init = float(sink_init)
        self.capture: dict | None = None  # set to a dict to record probs/gate/v on the next forwards
        self.fused_proj = fused_proj

    def reset_parameters(self, std: float, out_std: float) -> None:
        """Normal init (std; out_std on o_proj), zero biases, sink logits to sink_init."""
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.gate_proj):
            if lin is not None:
                nn.init.normal_(lin.weight, std=std)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
        nn.init.normal_(self.o_proj.weight, std=out_std)
        if self.gate_proj is not None and self.gate_identity_init:
            nn.init.zeros_(self.gate_proj.weight)
        if self.sink_kind == "learnable":
            with torch.no_grad():
                self.sink.fill_(self.sink_init)

    def in_projections(self) -> list[nn.Linear]:
        """The linear maps of the block input x, in order: q, k, v, then the output gate's (if any)."""
        lins = [self.q_proj, self.k_proj, self.v_proj]
        return lins + [self.gate_proj] if self.gate_proj is not None else lins

    def in_project(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every `in_projections()` map applied to x. With `fused_proj`, one GEMM over their weights concatenated
        at each call (parameters and state dict stay per projection), so x is read once and the backward's input
        gradient is one GEMM instead of a sum of several."""
        lins = self.in_projections()
        if not self.fused_proj:
            return [lin(x) for lin in lins]
        weight = torch.cat([lin.weight for lin in lins])
        bias = None
        if any(lin.bias is not None for lin in lins):
            bias = torch.cat([lin.weight.new_zeros(lin.out_features) if lin.bias is None else lin.bias
                              for lin in lins])
        return list(F.linear(x, weight, bias).split([lin.out_features for lin in lins], dim=-1))

    def project(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None):
        """x (B, S, C) -> q (B, H, S, D), k, v (B, Hkv, S, D) after qk-norm and RoPE, and the list of the
        other `in_projections()` outputs (B, S, ·): the output gate's pre-activation first, if any."""
        b, s, _ = x.shape
        q, k, v, *rest = self.in_project(x)
        q = q.view(b, s, self.n_head, self.head_dim)
        k = k.view(b, s, self.n_kv_head, self.head_dim)
        v = v.view(b, s, self.n_kv_head, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)  # per head, before RoPE (Qwen3)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, S, D)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q, k, v, rest

    def output(self, out: torch.Tensor, gate_pre: torch.Tensor | None = None) -> torch.Tensor:
        """Attention output (B, H, S, D) -> (B, S, C): the sigmoid output gate (pre-activation `gate_pre`
        (B, S, H·D | H) from `project`, required when the module has a gate) and o_proj."""
        b, _, s, _ = out.shape
        out = out.transpose(1, 2)  # (B, S, H, D)
        gate = None
        if self.gate_proj is not None:
            if gate_pre is None:
                raise ValueError("Attention.output needs the gate pre-activation from project() (attn_gate is on)")
            gate = self.gate_scale * torch.sigmoid(gate_pre).view(b, s, self.n_head, -1)  # (B,S,H,D|1)
            out = out * gate
        if self.capture is not None:
            self.capture["gate"] = None if gate is None else gate.detach()
        return self.o_proj(out.reshape(b, s, self.n_head * self.head_dim))

    def probe_attend(self, q, k, v, sink):
        """fp32 eager attention that records probs, sink mass and v into `capture` (diagnostics)."""
        eager = AttentionSpec("eager", self.spec.causal, self.spec.scale, self.spec.softmax, self.spec.logit_clip)
        out, probs, sink_mass = attend_with_probs(q.float(), k.float(), v.float(), eager, sink)
        self.capture.update(probs=probs.detach(), v=v.detach(),
                            sink_mass=None if sink_mass is None else sink_mass.detach())
        return out.to(q.dtype)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x (B, S, C) -> (B, S, C); rope = (cos, sin) each (S, D) or (B, S, D), or None."""
        q, k, v, rest = self.project(x, rope)
        sink = None if self.sink is None else self.sink.float()
        if self.capture is not None:
            out = self.probe_attend(q, k, v, sink)
        else:
            out = attend(q, k, v, self.spec, sink)
        return self.output(out, rest[0] if rest else None)
