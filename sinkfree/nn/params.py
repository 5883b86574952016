"""Weight-decay marking: the rule lives where a parameter is created, the grouping reads it."""
from __future__ import annotations

import torch
from torch import nn


def no_weight_decay(p: torch.Tensor | None) -> torch.Tensor | None:
    """Mark a parameter to be excluded from weight decay (norm gains, biases, sink logits)."""
    if p is not None:
        p._no_weight_decay = True
    return p


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on unmarked parameters, none on those marked by no_weight_decay."""
    decay, no_decay = [], []
    for _, p in module.named_parameters():
        if p.requires_grad:
            (no_decay if getattr(p, "_no_weight_decay", False) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]
