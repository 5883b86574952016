"""fp32 reference attention that materialises the probabilities (tests, diagnostics, ablations)."""
from __future__ import annotations

import math

import torch

from sinkfree.attention.registry import BackendInfo, register_backend
from sinkfree.attention.spec import AttentionSpec


def causal_visible(sq: int, sk: int, device=None) -> torch.Tensor:
    """Bool (Sq, Sk): query i sees key j iff j <= i + (Sk - Sq) (bottom-right aligned)."""
    i = torch.arange(sq, device=device).unsqueeze(1)
    j = torch.arange(sk, device=device).unsqueeze(0)
    return j <= i + (sk - sq)


def _safe_softmax(z: torch.Tensor) -> torch.Tensor:
    # Like softmax, but a row that is all -inf gives zeros instead of NaN (SDPA does the same).
    m = z.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(z - m)
    return e / e.sum(-1, keepdim=True).clamp_min(torch.finfo(e.dtype).tiny)


def attend_with_probs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec,
                      sink: torch.Tensor | None = None):
    """fp32 attention returning (out in q's dtype, probs (B,Hq,Sq,Sk) fp32, sink_mass (B,Hq,Sq) or None)."""
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    if sink is not None and spec.softmax == "sigmoid":
        raise ValueError("attn_softmax=sigmoid cannot be combined with a sink logit (attn_sink)")
    group = hq // hkv
    qf = q.float()
    kf = k.float().repeat_interleave(group, dim=1)  # (B, Hq, Sk, D): query head h reads kv head h // group
    vf = v.float().repeat_interleave(group, dim=1)
    scale = spec.scale if spec.scale is not None else 1.0 / math.sqrt(d)
    z = (qf @ kf.transpose(-1, -2)) * scale  # (B, Hq, Sq, Sk)
    if spec.logit_clip is not None:
        z = z.clamp(-spec.logit_clip, spec.logit_clip)
    visible = causal_visible(sq, sk, q.device) if spec.causal else None
    sink_mass = None
    if spec.softmax == "sigmoid":
        if visible is None:
            n = torch.full((sq, 1), float(sk), device=q.device)
        else:
            n = visible.sum(-1, keepdim=True).clamp_min(1).float()  # (Sq, 1) visible keys per row
        probs = torch.sigmoid(z - torch.log(n))
        if visible is not None:
            probs = probs.masked_fill(~visible, 0.0)
    else:
        if visible is not None:
            z = z.masked_fill(~visible, float("-inf"))
        if sink is None:
            probs = _safe_softmax(z)
        else:
            s = sink.float().view(1, hq, 1, 1).expand(b, hq, sq, 1)
            full = _safe_softmax(torch.cat([z, s], dim=-1))  # (B, Hq, Sq, Sk + 1), last column = sink
            probs, sink_mass = full[..., :sk], full[..., sk]
    out = probs @ vf  # (B, Hq, Sq, D); the sink's value is 0
    return out.to(q.dtype), probs, sink_mass


def eager_attention(q, k, v, spec: AttentionSpec, sink=None) -> torch.Tensor:
    """Reference backend: attend_with_probs without returning the probabilities."""
    return attend_with_probs(q, k, v, spec, sink)[0]


EAGER = register_backend(BackendInfo(
    "eager", eager_attention, supports_sink=True, supports_sigmoid=True, supports_logit_clip=True,
    description="fp32 reference that materialises probabilities; O(S^2) memory"))
