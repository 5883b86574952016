"""Outlier clipping, the "clip the outliers, keep the norm" ablation (expected to hurt)."""
from __future__ import annotations

import torch


def clip_output(x: torch.Tensor, clip: float | None) -> torch.Tensor:
    """Clamp a block output to (-clip, clip) before the residual add (outlier_clip ablation); None = no-op."""
    return x if clip is None else x.clamp(-clip, clip)
