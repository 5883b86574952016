"""Diffusion transformer over (T, H, W) grids (images are T = 1) with the sink switches and VSA:
`DiTConfig`, `DiTBlock`, `DiT`.

x (B, C, T, H, W) -> 3D patches -> tokens (B, S, width) -> [tile-major when VSA] -> blocks with adaLN-Zero
timestep (+ class) conditioning and 3D RoPE -> final adaLN + linear -> unpatchify -> (B, C_out, T, H, W).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sinkfree.attention import AttentionSpec, check_spec
from sinkfree.attention.vsa import VSATiling, check_vsa_head_dim, check_vsa_tile, tile_tokens, untile_tokens
from sinkfree.attention.vsa import vsa_tiling, vsa_topk
from sinkfree.nn import (
    ATTN_GATE_KINDS,
    ATTN_SINK_KINDS,
    MLP,
    NORM_KINDS,
    RESIDUAL_SINK_KINDS,
    Attention,
    build_norm,
    clip_output,
    no_weight_decay,
    rope_inv_freq,
)
from sinkfree.nn import param_groups as _param_groups
from sinkfree.nn.vsa import VSAAttention

from ._config import (
    check_choice,
    check_optional_positive_ints,
    check_positive_finite,
    check_positive_ints,
    from_preset,
    none_to_off,
)


@dataclass
class DiTConfig:
    """Architecture of the DiT; field names are the YAML keys under `model.arch`."""

    in_channels: int = 3
    """Channels of the input (3 for RGB pixels, the VAE's latent channels for latents)."""
    out_channels: int | None = None
    """Channels predicted; None = in_channels."""
    patch_size: tuple[int, int, int] = (1, 2, 2)
    """Patch (t, h, w) in input voxels; each patch is one token. Images need t = 1."""
    n_layer: int = 12
    """Number of transformer blocks."""
    n_embd: int = 768
    """Residual stream width."""
    n_head: int = 12
    """Attention heads."""
    head_dim: int | None = None
    """Per-head dimension; None = n_embd // n_head (which must divide)."""
    intermediate_size: int | None = None
    """SwiGLU hidden size; None = 8/3 * n_embd rounded up to a multiple of 64."""
    num_classes: int = 0
    """Class-conditional with this many classes (plus a null class for classifier-free guidance); 0 = none."""
    rms_norm_eps: float = 1e-6
    """Epsilon of every RMSNorm."""
    rope_theta: float = 10000.0
    """RoPE base frequency (each of the t, h, w axes gets its own share of the head dim)."""
    qk_norm: bool = False
    """RMSNorm on each head's q and k before RoPE (needed for stable 8-bit attention)."""
    attn_gate: str = "none"
    """Sigmoid gate on the attention output before o_proj: none, headwise or elementwise."""
    attn_gate_identity_init: bool = False
    """Start the gate as exactly 1 (zero weights, 2*sigmoid): for retrofitting a trained model."""
    fused_proj: bool = False
    """One GEMM for the attention's input projections (q, k, v, the output gate's, VSA's gate_compress) and one
    for SwiGLU's gate/up, over their weights concatenated at each step; same parameters and checkpoints. False
    (the DiT default): one GEMM per projection. Measured on dit-video-b, compiled, H200, one process: fused makes
    the dense step 3.7% slower (Inductor's kernel for the fused q/k/v gradient runs 7x slower than the separate
    ones) and the VSA step 0.8% faster (docs/dit.md)."""
    attn_sink: str = "none"
    """Sink logit in the softmax denominator: none, learnable (per head) or off_by_one (fixed 0)."""
    sink_init: float = 0.0
    """Initial value of the learnable sink logits."""
    residual_sink: str = "none"
    """Residual-sink fix on the RMSNorms: none, preaffine (RMSNorm(lambda*x)) or gatednorm."""
    gatednorm_rank: int = 16
    """Bottleneck rank of GatedNorm's gate."""
    gatednorm_identity_init: bool = False
    """Start GatedNorm as exactly RMSNorm (W_up = 0, 2*sigmoid): for retrofits."""
    norm: str = "rmsnorm"
    """Residual-side norm: rmsnorm, zero_centered, dyt or identity (ablations)."""
    outlier_clip: float | None = None
    """Clamp block outputs (attention, MLP) to (-c, c) before the residual add: the clipping ablation."""
    attn_backend: str = "sdpa"
    """Attention backend from the registry: sdpa (default), eager, flash, vsa (video sparse attention)."""
    vsa_tile: tuple[int, int, int] = (4, 4, 4)
    """VSA: tile (t, h, w) in tokens for videos (T > 1 after patchify); 64 or 128 tokens."""
    vsa_image_tile: tuple[int, int, int] = (1, 8, 8)
    """VSA: tile (t, h, w) in tokens for images (T = 1 after patchify)."""
    vsa_sparsity: float = 0.875
    """VSA: fraction of key tiles each query tile skips (the sparsity-ramp callback raises it to this)."""
    vsa_topk: int | None = None
    """VSA: a fixed number of key tiles per query tile instead of vsa_sparsity."""
    vsa_gate: bool = True
    """VSA: out = fine + G*coarse with G a linear map of the normed input (no sigmoid); False: fine + coarse."""
    vsa_gate_zero_init: bool = False
    """VSA: start G at zero (pure sparse attention): for retrofitting a dense model."""
    init_std: float = 0.02
    """Std of the normal init of linear weights."""

    def __post_init__(self):
        none_to_off(self, ("attn_gate", "attn_sink", "residual_sink"))
        if isinstance(self.outlier_clip, str) and self.outlier_clip.lower() == "none":
            self.outlier_clip = None
        check_positive_ints(self, ("in_channels", "n_layer", "n_embd", "n_head", "gatednorm_rank"))
        check_optional_positive_ints(self, ("out_channels", "head_dim", "intermediate_size", "vsa_topk"))
        if not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ValueError(f"num_classes={self.num_classes!r} must be 0 (unconditional) or a positive integer")
        self.patch_size = tuple(self.patch_size)
        if len(self.patch_size) != 3 or any(not isinstance(p, int) or p < 1 for p in self.patch_size):
            raise ValueError(f"patch_size={list(self.patch_size)} must be three positive integers (t, h, w)")
        if self.head_dim is None and self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; set head_dim")
        if self.head_size % 2 or min(self.rope_axes) < 2:
            raise ValueError(f"head_dim={self.head_size} is too small or odd for 3D RoPE (t, h, w shares "
                             f"{list(self.rope_axes)} must be even and >= 2)")
        check_positive_finite(self, ("rms_norm_eps", "rope_theta", "init_std"))
        if self.outlier_clip is not None and not self.outlier_clip > 0:
            raise ValueError(f"outlier_clip={self.outlier_clip!r} must be none or a positive number")
        check_choice("attn_gate", self.attn_gate, ATTN_GATE_KINDS)
        check_choice("attn_sink", self.attn_sink, ATTN_SINK_KINDS)
        check_choice("residual_sink", self.residual_sink, RESIDUAL_SINK_KINDS)
        check_choice("norm", self.norm, NORM_KINDS)
        if self.residual_sink != "none" and self.norm not in ("rmsnorm", "zero_centered"):
            raise ValueError(f"residual_sink={self.residual_sink!r} needs norm rmsnorm or zero_centered, "
                             f"got norm={self.norm!r}")
        check_spec(self.attention_spec, has_sink=self.attn_sink != "none")
        self.vsa_tile = check_vsa_tile(self.vsa_tile, "vsa_tile")
        self.vsa_image_tile = check_vsa_tile(self.vsa_image_tile, "vsa_image_tile")
        if self.vsa_image_tile[0] != 1:
            raise ValueError(f"vsa_image_tile={list(self.vsa_image_tile)} must have t = 1 (images have one frame)")
        vsa_topk(1, self.vsa_sparsity)
        if self.attn_backend == "vsa":
            check_vsa_head_dim(self.head_size)

    @property
    def head_size(self) -> int:
        """Per-head dim (head_dim, or n_embd // n_head)."""
        return self.head_dim or self.n_embd // self.n_head

    @property
    def rope_axes(self) -> tuple[int, int, int]:
        """Head dims rotated by the t, h, w positions: h and w get 2*(D//6) each, t the rest (Wan's split)."""
        hw = 2 * (self.head_size // 6)
        return self.head_size - 2 * hw, hw, hw

    @property
    def channels_out(self) -> int:
        return self.out_channels or self.in_channels

    @property
    def mlp_hidden(self) -> int:
        """SwiGLU hidden size (intermediate_size, or 8/3·n_embd rounded up to a multiple of 64)."""
        if self.intermediate_size is not None:
            return self.intermediate_size
        return -(-int(8 * self.n_embd / 3) // 64) * 64

    @property
    def attention_spec(self) -> AttentionSpec:
        """The non-causal AttentionSpec every block uses."""
        return AttentionSpec(backend=self.attn_backend, causal=False)

    @classmethod
    def from_name(cls, name: str, **overrides) -> DiTConfig:
        """A named preset (dit-tiny, dit-s, dit-b, dit-video-b) with fields overridden by keyword."""
        return from_preset(cls, PRESETS, "DiT", name, overrides)


PRESETS: dict[str, dict] = {
    "dit-tiny": dict(n_layer=4, n_embd=128, n_head=2),  # CPU: heads of 64 so VSA runs too
    "dit-s": dict(n_layer=12, n_embd=384, n_head=6),
    "dit-b": dict(n_layer=12, n_embd=768, n_head=12),
    "dit-video-b": dict(in_channels=16, patch_size=(1, 2, 2), n_layer=24, n_embd=1536, n_head=12),
}


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (B, S, C) * (1 + scale) + shift, with shift/scale (B, 1, C)."""
    return x * (1 + scale) + shift


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features (B, dim) of t in [0, 1] (scaled by 1000, as DiT's integer steps)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class DiTBlock(nn.Module):
    """adaLN-Zero block: x + g1·attn(mod(norm(x))), then + g2·mlp(mod(norm(·))); gates start at 0."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        c = config
        norm_args = (c.norm, c.residual_sink, c.n_embd, c.rms_norm_eps, c.gatednorm_rank,
                     c.gatednorm_identity_init)
        self.attn_norm = build_norm(*norm_args)
        attn_kwargs = dict(qk_norm=c.qk_norm, norm_eps=c.rms_norm_eps, gate=c.attn_gate, sink=c.attn_sink,
                           sink_init=c.sink_init, spec=c.attention_spec, gate_identity_init=c.attn_gate_identity_init,
                           fused_proj=c.fused_proj)
        if c.attn_backend == "vsa":
            self.attn = VSAAttention(c.n_embd, c.n_head, None, c.head_size, sparsity=c.vsa_sparsity,
                                     topk=c.vsa_topk, coarse_gate=c.vsa_gate,
                                     coarse_gate_zero_init=c.vsa_gate_zero_init, **attn_kwargs)
        else:
            self.attn = Attention(c.n_embd, c.n_head, None, c.head_size, **attn_kwargs)
        self.mlp_norm = build_norm(*norm_args)
        self.mlp = MLP(c.n_embd, c.mlp_hidden, fused_proj=c.fused_proj)
        self.adaln = nn.Linear(c.n_embd, 6 * c.n_embd)  # shift, scale, gate for attention and MLP
        self.clip = c.outlier_clip

    def forward(self, x: torch.Tensor, cond: torch.Tensor, rope, tiling: VSATiling | None = None) -> torch.Tensor:
        """x (B, S, C), cond (B, C) -> (B, S, C)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaln(F.silu(cond)).unsqueeze(1).chunk(6, dim=-1)
        h = modulate(self.attn_norm(x), shift1, scale1)
        a = self.attn(h, rope, tiling) if tiling is not None else self.attn(h, rope)
        x = x + gate1 * clip_output(a, self.clip)
        h = modulate(self.mlp_norm(x), shift2, scale2)
        return x + gate2 * clip_output(self.mlp(h), self.clip)


class DiT(nn.Module):
    """Diffusion transformer: forward(x (B, C, T, H, W), t (B,) in [0, 1], y (B,) or None) -> (B, C_out, T, H, W)."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        c = self.config = config
        pt, ph, pw = c.patch_size
        self.patch_embed = nn.Linear(c.in_channels * pt * ph * pw, c.n_embd)
        self.t_embed = nn.Sequential(nn.Linear(256, c.n_embd), nn.SiLU(), nn.Linear(c.n_embd, c.n_embd))
        # row num_classes is the null class (classifier-free guidance)
        self.y_embed = nn.Embedding(c.num_classes + 1, c.n_embd) if c.num_classes else None
        self.layers = nn.ModuleList(DiTBlock(c) for _ in range(c.n_layer))
        self.norm = build_norm(c.norm, c.residual_sink, c.n_embd, c.rms_norm_eps, c.gatednorm_rank,
                               c.gatednorm_identity_init)
        self.final_adaln = nn.Linear(c.n_embd, 2 * c.n_embd)
        self.head = nn.Linear(c.n_embd, c.channels_out * pt * ph * pw)
        for axis, dim in zip("thw", c.rope_axes):
            self.register_buffer(f"inv_freq_{axis}", rope_inv_freq(dim, c.rope_theta)[0], persistent=False)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                no_weight_decay(m.bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DiT init: xavier patch embedding, normal(init_std) linears, zero adaLN and output head."""
        c = self.config
        out_std = c.init_std / math.sqrt(2 * c.n_layer)
        nn.init.xavier_uniform_(self.patch_embed.weight)
        nn.init.zeros_(self.patch_embed.bias)
        for lin in (self.t_embed[0], self.t_embed[2]):
            nn.init.normal_(lin.weight, std=c.init_std)
            nn.init.zeros_(lin.bias)
        if self.y_embed is not None:
            nn.init.normal_(self.y_embed.weight, std=c.init_std)
        for block in self.layers:
            block.attn.reset_parameters(c.init_std, out_std)
            block.mlp.reset_parameters(c.init_std, out_std)
            nn.init.zeros_(block.adaln.weight)
            nn.init.zeros_(block.adaln.bias)
        for lin in (self.final_adaln, self.head):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    @property
    def null_class(self) -> int:
        """Label of the unconditional (null) class."""
        return self.config.num_classes

    def token_grid(self, shape) -> tuple[int, int, int]:
        """(T, H, W) of tokens for an input of shape (..., T, H, W); ValueError if patches do not divide it."""
        T, H, W = shape[-3:]
        if any(n % p for n, p in zip((T, H, W), self.config.patch_size)):
            raise ValueError(f"input (T, H, W)=({T}, {H}, {W}) is not divisible by patch_size="
                             f"{list(self.config.patch_size)}")
        return tuple(n // p for n, p in zip((T, H, W), self.config.patch_size))

    def tiling(self, grid: tuple[int, int, int]) -> VSATiling | None:
        """The VSA tiling of a token grid ((1, 8, 8)-style tiles for images), None for dense backends."""
        if self.config.attn_backend != "vsa":
            return None
        tile = self.config.vsa_image_tile if grid[0] == 1 else self.config.vsa_tile
        return vsa_tiling(grid, tile, self.inv_freq_t.device)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) -> (B, S, C·pt·ph·pw), tokens in raster (t, h, w) order."""
        b, ch = x.shape[:2]
        (T, H, W), (pt, ph, pw) = self.token_grid(x.shape), self.config.patch_size
        x = x.reshape(b, ch, T, pt, H, ph, W, pw).permute(0, 2, 4, 6, 1, 3, 5, 7)
        return x.reshape(b, T * H * W, ch * pt * ph * pw)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """(B, S, C·pt·ph·pw) raster -> (B, C, T·pt, H·ph, W·pw)."""
        b = x.shape[0]
        (T, H, W), (pt, ph, pw) = grid, self.config.patch_size
        x = x.reshape(b, T, H, W, -1, pt, ph, pw).permute(0, 4, 1, 5, 2, 6, 3, 7)
        return x.reshape(b, -1, T * pt, H * ph, W * pw)

    def rope(self, grid: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """3D RoPE (cos, sin), each (S, D) in raster order: the t, h, w positions rotate their own dims."""
        dev = self.inv_freq_t.device
        t, h, w = torch.meshgrid(*(torch.arange(n, device=dev, dtype=torch.float32) for n in grid), indexing="ij")
        freqs = torch.cat([t.reshape(-1, 1) * self.inv_freq_t, h.reshape(-1, 1) * self.inv_freq_h,
                           w.reshape(-1, 1) * self.inv_freq_w], dim=-1)  # (S, D/2)
        emb = torch.cat([freqs, freqs], dim=-1)  # half-split layout, as apply_rope expects
        return emb.cos(), emb.sin()

    def condition(self, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """Conditioning vector (B, C) from the flow time t (B,) and labels y (B,) (None = null class)."""
        cond = self.t_embed(timestep_embedding(t, 256).to(self.t_embed[0].weight.dtype))
        if self.y_embed is not None:
            if y is None:
                y = torch.full_like(t, self.null_class, dtype=torch.long)
            cond = cond + self.y_embed(y)
        return cond

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Velocity (B, C_out, T, H, W) for noisy input x (B, C, T, H, W) at times t (B,)."""
        if x.dim() != 5 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"DiT input must be (B, C={self.config.in_channels}, T, H, W); got {tuple(x.shape)}")
        grid = self.token_grid(x.shape)
        tiling = self.tiling(grid)
        h = self.patch_embed(self.patchify(x))  # (B, S, C)
        cos, sin = self.rope(grid)
        if tiling is not None:  # tile-major once here; only attention sees the padding of partial tiles
            h, cos, sin = tile_tokens(h, tiling), tile_tokens(cos, tiling, 0), tile_tokens(sin, tiling, 0)
        cond = self.condition(t, y)
        for block in self.layers:
            h = block(h, cond, (cos, sin), tiling)
        shift, scale = self.final_adaln(F.silu(cond)).unsqueeze(1).chunk(2, dim=-1)
        h = self.head(modulate(self.norm(h), shift, scale))
        if tiling is not None:
            h = untile_tokens(h, tiling)
        return self.unpatchify(h, grid)

    def set_vsa_sparsity(self, sparsity: float) -> None:
        """Set the sparsity of every VSA layer (the ramp callback calls this)."""
        vsa_topk(1, sparsity)
        for block in self.layers:
            if isinstance(block.attn, VSAAttention):
                block.attn.sparsity = float(sparsity)

    def num_params(self) -> int:
        """Parameter count."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int, attn_density: float = 1.0) -> int:
        """Training FLOPs per token: 6·N + 12·L·H·D·S·density (attention), for MFU."""
        c = self.config
        return int(6 * self.num_params() + 12 * c.n_layer * c.n_head * c.head_size * seq_len * attn_density)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: decay on matmul weights and embeddings; none on gains, biases, sinks."""
        return _param_groups(self, weight_decay)
