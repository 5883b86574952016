"""Llama-style decoder with the sink switches: `LLMConfig`, `Block`, `LLM`."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sinkfree.attention import AttentionSpec, check_spec
from sinkfree.attention.spec import SOFTMAX_KINDS
from sinkfree.nn import (
    ATTN_GATE_KINDS,
    ATTN_SINK_KINDS,
    GATEDNORM_KERNELS,
    MLP,
    NORM_KINDS,
    RESIDUAL_SINK_KINDS,
    Attention,
    RotaryEmbedding,
    build_norm,
    clip_output,
)
from sinkfree.nn import param_groups as _param_groups
from sinkfree.nn.rope import rope_scaling_type

from ._config import (
    check_choice,
    check_optional_positive_ints,
    check_positive_finite,
    check_positive_ints,
    from_preset,
    none_to_off,
)


@dataclass
class LLMConfig:
    """Architecture of the decoder; field names are the YAML keys under `model.arch`."""

    vocab_size: int = 32000
    """Vocabulary size (embedding rows); at least the tokenizer's vocabulary."""
    n_layer: int = 12
    """Number of decoder blocks."""
    n_embd: int = 768
    """Residual stream width."""
    n_head: int = 12
    """Query heads."""
    n_kv_head: int | None = None
    """Key/value heads for GQA; None = n_head."""
    head_dim: int | None = None
    """Per-head dimension; None = n_embd // n_head (which must divide)."""
    intermediate_size: int | None = None
    """SwiGLU hidden size; None = 8/3 * n_embd rounded up to a multiple of 64."""
    block_size: int = 2048
    """Maximum sequence length (RoPE tables)."""
    rms_norm_eps: float = 1e-5
    """Epsilon of every RMSNorm."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    rope_scaling: dict | None = None
    """RoPE scaling: None, or {type: linear|llama3|yarn, factor, ...} as in HF configs."""
    tie_embeddings: bool = False
    """Share the input embedding and the output projection."""
    attn_bias: bool = False
    """Biases on the q/k/v projections (Qwen2)."""
    qk_norm: bool = False
    """RMSNorm on each head's q and k before RoPE (Qwen3; needed for stable 8-bit attention)."""
    attn_gate: str = "none"
    """Sigmoid gate on the attention output before o_proj: none, headwise or elementwise."""
    attn_gate_identity_init: bool = False
    """Start the gate as exactly 1 (zero weights, 2*sigmoid): for retrofitting a trained model."""
    fused_proj: bool = True
    """One GEMM for the attention's input projections (q, k, v and the output gate's) and one
    for SwiGLU's gate/up, over their weights concatenated at each step; same parameters and checkpoints. False:
    one GEMM per projection (measured slower: docs/switches/attn_gate.md)."""
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
    gatednorm_kernel: str = "torch"
    """GatedNorm implementation: torch (compiled by Inductor), triton_gate (torch norm and down-projection,
    the gate's up-projection, sigmoid and product as one Triton op on CUDA), triton (the whole norm as one
    sinkfree_kernels op on CUDA, slower today): docs/switches/residual_sink.md."""
    norm: str = "rmsnorm"
    """Residual-side norm: rmsnorm, zero_centered ((1+w), keeps weight decay), dyt or identity (ablations)."""
    attn_softmax: str = "softmax"
    """softmax, or sigmoid (no normalization, bias -log n; the ablation, eager backend only)."""
    outlier_clip: float | None = None
    """Clamp block outputs (attention, MLP) to (-c, c) before the residual add: the clipping ablation."""
    attn_logit_clip: float | None = None
    """Clamp attention logits to (-c, c) before the softmax (eager backend only)."""
    attn_backend: str = "sdpa"
    """Attention backend from the registry: sdpa (default), eager, flash, block_sparse, topk, sage8, ..."""
    attn_tile_size: int = 64
    """Tokens per query/key tile of the tile-based backends (block_sparse, topk, sage8 with tile lists): 64 or 128."""
    attn_topk_keep: float = 0.125
    """topk backend: fraction of key tiles each query tile keeps (the diagonal tile always), in (0, 1]."""
    attn_fallback_layers: list[int] | None = None
    """Layers (negative = from the end) that use attn_fallback_backend instead, e.g. [0, -1] keeps the first
    and last layers of an 8-bit (sage8) model in bf16."""
    attn_fallback_backend: str = "flash"
    """Backend of the attn_fallback_layers (bf16 flash attention by default)."""
    init_std: float = 0.02
    """Std of the normal init of linear and embedding weights."""

    def __post_init__(self):
        # YAML `none`/null for the string switches and the clip both mean "off".
        none_to_off(self, ("attn_gate", "attn_sink", "residual_sink"))
        for name in ("outlier_clip", "attn_logit_clip"):
            if isinstance(getattr(self, name), str) and getattr(self, name).lower() == "none":
                setattr(self, name, None)
        check_positive_ints(self, ("vocab_size", "n_layer", "n_embd", "n_head", "block_size", "gatednorm_rank"))
        if self.attn_tile_size not in (64, 128):
            raise ValueError(f"attn_tile_size={self.attn_tile_size!r} must be 64 or 128 (tokens per attention tile)")
        if not isinstance(self.attn_topk_keep, (int, float)) or not 0.0 < self.attn_topk_keep <= 1.0:
            raise ValueError(f"attn_topk_keep={self.attn_topk_keep!r} must be a fraction in (0, 1] of key tiles kept")
        check_optional_positive_ints(self, ("n_kv_head", "head_dim", "intermediate_size"))
        if self.n_head % self.num_kv_heads:
            raise ValueError(f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head} (GQA groups)")
        if self.head_dim is None and self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; set head_dim "
                             f"explicitly or choose n_head dividing n_embd")
        if self.head_size % 2:
            raise ValueError(f"head_dim={self.head_size} must be even for RoPE")
        check_positive_finite(self, ("rms_norm_eps", "rope_theta", "init_std"))
        if not math.isfinite(self.sink_init):
            raise ValueError(f"sink_init={self.sink_init!r} must be finite")
        for name in ("outlier_clip", "attn_logit_clip"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise ValueError(f"{name}={value!r} must be none or a positive number")
        check_choice("attn_gate", self.attn_gate, ATTN_GATE_KINDS)
        check_choice("attn_sink", self.attn_sink, ATTN_SINK_KINDS)
        check_choice("residual_sink", self.residual_sink, RESIDUAL_SINK_KINDS)
        check_choice("gatednorm_kernel", self.gatednorm_kernel, GATEDNORM_KERNELS)
        check_choice("norm", self.norm, NORM_KINDS)
        check_choice("attn_softmax", self.attn_softmax, SOFTMAX_KINDS)
        if self.residual_sink != "none" and self.norm not in ("rmsnorm", "zero_centered"):
            raise ValueError(f"residual_sink={self.residual_sink!r} modifies an RMSNorm; it needs norm "
                             f"rmsnorm or zero_centered, got norm={self.norm!r}")
        try:
            rope_scaling_type(self.rope_scaling)
        except ValueError as err:
            raise ValueError(f"rope_scaling: {err}") from None
        check_spec(self.attention_spec, has_sink=self.attn_sink != "none")
        if self.attn_fallback_layers is not None:
            bad = [i for i in self.attn_fallback_layers
                   if not isinstance(i, int) or isinstance(i, bool) or not -self.n_layer <= i < self.n_layer]
            if bad:
                raise ValueError(f"attn_fallback_layers={self.attn_fallback_layers!r}: {bad} are not layer "
                                 f"indices in [-{self.n_layer}, {self.n_layer})")
            check_spec(dataclasses.replace(self.attention_spec, backend=self.attn_fallback_backend),
                       has_sink=self.attn_sink != "none")

    # Derived sizes (the fields stay None so `dataclasses.replace` and YAML round-trips keep defaults).
    @property
    def num_kv_heads(self) -> int:
        """Key/value heads (n_kv_head, or n_head when None)."""
        return self.n_kv_head or self.n_head

    @property
    def head_size(self) -> int:
        """Per-head dim (head_dim, or n_embd // n_head when None)."""
        return self.head_dim or self.n_embd // self.n_head

    @property
    def mlp_hidden(self) -> int:
        """SwiGLU hidden size (intermediate_size, or 8/3·n_embd rounded up to a multiple of 64)."""
        if self.intermediate_size is not None:
            return self.intermediate_size
        return -(-int(8 * self.n_embd / 3) // 64) * 64

    @property
    def attention_spec(self) -> AttentionSpec:
        """The causal AttentionSpec every layer uses."""
        return AttentionSpec(backend=self.attn_backend, causal=True, softmax=self.attn_softmax,
                             logit_clip=self.attn_logit_clip, tile_size=self.attn_tile_size,
                             topk_keep=self.attn_topk_keep)

    def layer_attention_spec(self, layer: int) -> AttentionSpec:
        """The AttentionSpec of one layer: attn_fallback_backend for the attn_fallback_layers."""
        spec = self.attention_spec
        fallback = {i % self.n_layer for i in self.attn_fallback_layers or ()}
        if layer % self.n_layer in fallback:
            spec = dataclasses.replace(spec, backend=self.attn_fallback_backend)
        return spec

    @classmethod
    def from_name(cls, name: str, **overrides) -> LLMConfig:
        """A named preset (tiny, 125m, 350m, 1b) with fields overridden by keyword."""
        return from_preset(cls, PRESETS, "LLM", name, overrides)


PRESETS: dict[str, dict] = {
    "tiny": dict(vocab_size=4096, n_layer=4, n_embd=128, n_head=4, n_kv_head=2, block_size=256),
    "125m": dict(n_layer=12, n_embd=768, n_head=12),
    "350m": dict(n_layer=24, n_embd=1024, n_head=16),
    # Llama-3.2-1B shapes: GQA 32/8, head 64, SwiGLU 8192, tied, theta 5e5 with llama3 scaling.
    "1b": dict(vocab_size=128256, n_layer=16, n_embd=2048, n_head=32, n_kv_head=8, head_dim=64,
               intermediate_size=8192, block_size=4096, rope_theta=500000.0, tie_embeddings=True,
               rope_scaling={"type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}


class Block(nn.Module):
    """Pre-norm block: h = x + clip(attn(attn_norm(x))); out = h + clip(mlp(mlp_norm(h)))."""

    def __init__(self, config: LLMConfig, layer: int | None = None):
        super().__init__()
        c = config
        norm_args = (c.norm, c.residual_sink, c.n_embd, c.rms_norm_eps, c.gatednorm_rank,
                     c.gatednorm_identity_init, c.gatednorm_kernel)
        self.attn_norm = build_norm(*norm_args)
        self.attn = Attention(c.n_embd, c.n_head, c.num_kv_heads, c.head_size, bias=c.attn_bias,
                              qk_norm=c.qk_norm, norm_eps=c.rms_norm_eps, gate=c.attn_gate, sink=c.attn_sink,
                              sink_init=c.sink_init,
                              spec=c.attention_spec if layer is None else c.layer_attention_spec(layer),
                              gate_identity_init=c.attn_gate_identity_init, fused_proj=c.fused_proj)
        self.mlp_norm = build_norm(*norm_args)
        self.mlp = MLP(c.n_embd, c.mlp_hidden, fused_proj=c.fused_proj)
        self.clip = c.outlier_clip

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x (B, S, C) -> residual stream after this block (B, S, C)."""
        h = x + clip_output(self.attn(self.attn_norm(x), rope), self.clip)
        return h + clip_output(self.mlp(self.mlp_norm(h)), self.clip)


class LLM(nn.Module):
    """Decoder-only language model: embed -> Blocks -> norm -> lm_head (or tied embedding)."""

    def __init__(self, config: LLMConfig):
        super().__init__()
        c = self.config = config
        self.embed = nn.Embedding(c.vocab_size, c.n_embd)
        self.layers = nn.ModuleList(Block(c, i) for i in range(c.n_layer))
        self.norm = build_norm(c.norm, c.residual_sink, c.n_embd, c.rms_norm_eps, c.gatednorm_rank,
                               c.gatednorm_identity_init, c.gatednorm_kernel)
        self.lm_head = None if c.tie_embeddings else nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.rope = RotaryEmbedding(c.head_size, c.rope_theta, c.rope_scaling, c.block_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(init_std) weights; residual writes (o_proj, down_proj) scaled by 1/sqrt(2·n_layer)."""
        c = self.config
        out_std = c.init_std / math.sqrt(2 * c.n_layer)
        nn.init.normal_(self.embed.weight, std=c.init_std)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, std=c.init_std)
        for block in self.layers:
            block.attn.reset_parameters(c.init_std, out_std)
            block.mlp.reset_parameters(c.init_std, out_std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (B, S) -> logits (B, S, vocab_size)."""
        s = idx.shape[1]
        if s > self.config.block_size:
            raise ValueError(f"sequence length {s} exceeds block_size={self.config.block_size}")
        x = self.embed(idx)  # (B, S, C)
        rope = self.rope(s)  # (S, D) each
        for block in self.layers:
            x = block(x, rope)
        x = self.norm(x)
        return self.lm_head(x) if self.lm_head is not None else F.linear(x, self.embed.weight)

    def num_params(self, exclude_embedding: bool = False) -> int:
        """Parameter count; exclude_embedding drops the lookup table (kept when tied: it is the head)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding and self.lm_head is not None:
            n -= self.embed.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token for MFU: 6·N (matmul params) + 6·L·H·D·S (causal attention: half of
        the 12·L·H·D·S of full attention, as DESIGN.md counts attention FLOPs)."""
        c = self.config
        return 6 * self.num_params(exclude_embedding=True) + 6 * c.n_layer * c.n_head * c.head_size * seq_len

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: decay on matmul weights and embeddings; none on gains, biases, sinks."""
        return _param_groups(self, weight_decay)
