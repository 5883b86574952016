"""What an attention call computes, independent of the backend that computes it."""
from __future__ import annotations

import math
from dataclasses import dataclass

SOFTMAX_KINDS = ("softmax", "sigmoid")


@dataclass(frozen=True)
class AttentionSpec:
    """Backend name, masking, scale and normalisation of one attention call."""

    backend: str = "sdpa"
    causal: bool = True
    scale: float | None = None  # None = 1/sqrt(head_dim)
    softmax: str = "softmax"  # softmax | sigmoid (no normalisation, bias -log n_visible)
    logit_clip: float | None = None  # clamp logits to (-c, c) before the softmax
    tile_size: int = 64  # block_sparse / topk: tokens per query and key tile (64 or 128)
    topk_keep: float = 0.125  # topk: fraction of key tiles each query tile keeps (the diagonal always)

    def __post_init__(self):
        if self.softmax not in SOFTMAX_KINDS:
            raise ValueError(f"attn_softmax={self.softmax!r} is not one of {list(SOFTMAX_KINDS)}")
        if self.logit_clip is not None and not (self.logit_clip > 0 and math.isfinite(self.logit_clip)):
            raise ValueError(f"outlier_clip={self.logit_clip!r} must be a positive finite number or None")
        if self.tile_size not in (64, 128):
            raise ValueError(f"attention tile_size={self.tile_size!r} must be 64 or 128")
        if not 0.0 < self.topk_keep <= 1.0:
            raise ValueError(f"attention topk_keep={self.topk_keep!r} must be in (0, 1]")
        if self.scale is not None and not self.scale > 0:
            raise ValueError(f"attention scale={self.scale!r} must be positive or None")
