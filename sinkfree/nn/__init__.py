"""Building blocks: attention module, norms, RoPE, MLP, clipping."""
from sinkfree.nn.attention import ATTN_GATE_KINDS, ATTN_SINK_KINDS, Attention
from sinkfree.nn.clip import clip_output
from sinkfree.nn.mlp import MLP
from sinkfree.nn.norms import (
                               GATEDNORM_KERNELS,
                               NORM_KINDS,
                               RESIDUAL_SINK_KINDS,
                               DyT,
                               GatedNorm,
                               IdentityNorm,
                               PreAffineRMSNorm,
                               RMSNorm,
                               ZeroCenteredRMSNorm,
                               build_norm,
)
from sinkfree.nn.params import no_weight_decay, param_groups
from sinkfree.nn.rope import RotaryEmbedding, apply_rope, rope_inv_freq, rotate_half

__all__ = [
                               "ATTN_GATE_KINDS",
                               "ATTN_SINK_KINDS",
                               "GATEDNORM_KERNELS",
                               "MLP",
                               "NORM_KINDS",
                               "RESIDUAL_SINK_KINDS",
                               "Attention",
                               "DyT",
                               "GatedNorm",
                               "IdentityNorm",
                               "PreAffineRMSNorm",
                               "RMSNorm",
                               "RotaryEmbedding",
                               "ZeroCenteredRMSNorm",
                               "apply_rope",
                               "build_norm",
                               "clip_output",
                               "no_weight_decay",
                               "param_groups",
                               "rope_inv_freq",
                               "rotate_half",
]
