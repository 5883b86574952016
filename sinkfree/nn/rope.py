"""Rotary position embeddings, HF half-split layout, with linear / llama3 / yarn frequency scaling."""
from __future__ import annotations

import math

import torch
from torch import nn

ROPE_SCALING_TYPES = ("linear", "llama3", "yarn")
_REQUIRED = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor",),
}
_OPTIONAL = {
    "linear": (),
    "llama3": (),
    "yarn": ("original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor", "mscale",
             "mscale_all_dim", "truncate"),
}


def rope_scaling_type(scaling: dict | None) -> str | None:
    """The scaling type of a rope_scaling dict (`type` or HF's `rope_type`), validated; None if unscaled."""
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise ValueError(f"rope_scaling must be a dict or None, got {type(scaling).__name__}")
    kind = scaling.get("type", scaling.get("rope_type"))
    if kind in (None, "default"):
        return None
    if kind not in ROPE_SCALING_TYPES:
        raise ValueError(f"rope_scaling type={kind!r} is not one of {list(ROPE_SCALING_TYPES)}")
    missing = [key for key in _REQUIRED[kind] if key not in scaling]
    if missing:
        raise ValueError(f"rope_scaling type={kind!r} needs keys {missing}")
    unknown = set(scaling) - {"type", "rope_type"} - set(_REQUIRED[kind]) - set(_OPTIONAL[kind])
    if unknown:
        raise ValueError(f"rope_scaling type={kind!r} does not take keys {sorted(unknown)}; "
                         f"allowed: {list(_REQUIRED[kind] + _OPTIONAL[kind])}")
    if not scaling["factor"] > 0:
        raise ValueError(f"rope_scaling factor={scaling['factor']!r} must be positive")
    return kind


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(inv_freq: torch.Tensor, dim: int, theta: float, cfg: dict, max_positions: int):
    factor = cfg["factor"]
    original = cfg.get("original_max_position_embeddings") or max_positions
    attention_factor = cfg.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = cfg.get("mscale"), cfg.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast, beta_slow = cfg.get("beta_fast") or 32, cfg.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        # The rotary dim index whose wavelength fits `rotations` turns into the original context.
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if cfg.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1 on fast (high-frequency) dims: keep them, interpolate the slow ones
    return inv_freq / factor * (1 - extrapolate) + inv_freq * extrapolate, float(attention_factor)


def _llama3(inv_freq: torch.Tensor, cfg: dict) -> torch.Tensor:
    factor, low, high = cfg["factor"], cfg["low_freq_factor"], cfg["high_freq_factor"]
    original = cfg["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= original / high) & (wavelen <= original / low)
    return torch.where(medium, smoothed, scaled)


def rope_inv_freq(head_dim: int, theta: float = 10000.0, scaling: dict | None = None,
                  max_positions: int = 2048) -> tuple[torch.Tensor, float]:
    """(inv_freq (head_dim/2,) fp32, attention_factor) as HF transformers computes them."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    kind = rope_scaling_type(scaling)
    if kind == "linear":
        return inv_freq / scaling["factor"], 1.0
    if kind == "llama3":
        return _llama3(inv_freq, scaling), 1.0
    if kind == "yarn":
        return _yarn(inv_freq, head_dim, theta, scaling, max_positions)
    return inv_freq, 1.0


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, S, D) by cos/sin (S, D) or (B, S, D)."""
    if cos.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, S, D)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


class RotaryEmbedding(nn.Module):
    """Computes cos/sin (S, D) for positions 0..S-1 (or given positions), scaled by attention_factor."""

    def __init__(self, head_dim: int, theta: float = 10000.0, scaling: dict | None = None,
                 max_positions: int = 2048):
        super().__init__()
        inv_freq, self.attention_factor = rope_inv_freq(head_dim, theta, scaling, max_positions)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, seq_len: int | None = None, positions: torch.Tensor | None = None):
        """(cos, sin), each (S, D) for range(seq_len) or (..., D) for integer `positions`."""
        if positions is None:
            positions = torch.arange(seq_len, device=self.inv_freq.device)
        freqs = positions.float().unsqueeze(-1) * self.inv_freq.float()  # (..., D/2)
        emb = torch.cat([freqs, freqs], dim=-1)  # (..., D), half-split layout
        return emb.cos() * self.attention_factor, emb.sin() * self.attention_factor
