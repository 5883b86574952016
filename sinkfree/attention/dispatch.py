"""`attend`: check shapes and dispatch to the backend named by the spec."""
from __future__ import annotations

import torch

from sinkfree.attention.registry import check_spec
from sinkfree.attention.spec import AttentionSpec


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sink: torch.Tensor | None) -> None:
    """Raise ValueError unless q (B,Hq,Sq,D), k/v (B,Hkv,Sk,D), Hq % Hkv == 0, sink (Hq,) or None."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attend expects 4-D q, k, v (B, H, S, D); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    b, hq, _, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k and v must be (B={b}, Hkv, Sk, D={d}) and equal; got k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if hq % k.shape[1] != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({k.shape[1]})")
    if sink is not None and tuple(sink.shape) != (hq,):
        raise ValueError(f"sink must have shape ({hq},) (one logit per query head); got {tuple(sink.shape)}")


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec,
           sink: torch.Tensor | None = None) -> torch.Tensor:
    """Attention (B,Hq,Sq,D) from q (B,Hq,Sq,D), k/v (B,Hkv,Sk,D), computed by spec.backend."""
    check_inputs(q, k, v, sink)
    info = check_spec(spec, has_sink=sink is not None)
    return info.fn(q, k, v, spec, sink)
