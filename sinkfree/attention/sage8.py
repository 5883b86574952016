"""`sage8` (trainable 8-bit attention: INT8 QK^T with K smoothing, FP8 PV, 8-bit backward with dP in the input
dtype) and `sage8-infer` (the same forward, no backward) backends. Dense by default; block-sparse when the
caller passes key-tile lists (`tiles=(idx, cnt[, kv_tile_len])`, as the `block_sparse` backend takes them),
so sparse selectors and quantization compose. CUDA tensors (or the Triton interpreter) run the kernels;
other CPU tensors run the fake-quant PyTorch reference (same quantization, differentiable).

Keep the first and last layers in bf16 with `LLMConfig.attn_fallback_layers` (e.g. [0, -1]).

`sage8-vsplit` / `sage8-infer-vsplit` store V as two FP8 terms (hi + lo/16, one more FP8 dot per key block):
on N(0, 1) inputs (H200, `sinkfree bench accuracy`) the plain FP8 P·V forward reaches cosine 0.9994 / relative
L1 0.036 against fp64, the split one 0.9997 / 0.025 (the issue-7 forward bar is 0.9995 / 0.03); on the same
card its forward takes 1.8x as long at D 128 (1.1x at D 64) and fwd+bwd 1.03-1.11x (`sinkfree bench attention`).
"""
from __future__ import annotations

import functools

import torch

from sinkfree.attention.flash import use_triton
from sinkfree.attention.registry import BackendInfo, register_backend
from sinkfree.attention.spec import AttentionSpec


def sage8_attend(q, k, v, spec: AttentionSpec, sink=None, tiles=None, infer: bool = False,
                 smooth_k: bool = True, v_split: bool = False) -> torch.Tensor:
    """8-bit attention (B, Hq, Sq, D); tiles=(idx, cnt[, kv_tile_len]) of spec.tile_size tokens for block-sparse."""
    t = spec.tile_size
    if use_triton(q):
        from sinkfree_kernels.sage8_ops import sage8_attention, sage8_block_sparse_attention

        if tiles is None:
            return sage8_attention(q, k, v, sink, spec.causal, spec.scale, smooth_k, infer, v_split)[0]
        return sage8_block_sparse_attention(q, k, v, tiles[0], tiles[1], sink, spec.causal, spec.scale, t, t,
                                            *tiles[2:3], smooth_k=smooth_k, infer=infer, v_split=v_split)[0]
    from sinkfree_kernels.quant_reference import sage8_attention_reference, sage8_block_sparse_reference

    if infer and torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (q, k, v, sink)):
        raise RuntimeError("attn_backend='sage8-infer' (and sage8-infer-vsplit) is forward-only (no backward): "
                           "train with attn_backend='sage8' or 'sage8-vsplit', or run under torch.no_grad()")
    if tiles is None:
        return sage8_attention_reference(q, k, v, sink, spec.causal, spec.scale, smooth_k, v_split=v_split)[0]
    return sage8_block_sparse_reference(q, k, v, tiles[0], tiles[1], sink, spec.causal, spec.scale, t, t,
                                        *tiles[2:3], smooth_k=smooth_k, v_split=v_split)[0]


# name -> (sage8_attend keywords, description); each registered as fn(q, k, v, spec, sink=None, tiles=None)
_VARIANTS = {
    "sage8": ({}, "trainable 8-bit attention (INT8 QK^T, FP8 PV, 8-bit backward, dP in bf16); head dims 64/128"),
    "sage8-infer": ({"infer": True},
                    "8-bit attention forward only (INT8 QK^T + FP8 PV, the SageAttention2 Hopper recipe)"),
    "sage8-vsplit": ({"v_split": True},
                     "sage8 with V as two FP8 terms (hi + lo/16): meets cos >= 0.9995 / relL1 <= 0.03 on N(0,1)"),
    "sage8-infer-vsplit": ({"infer": True, "v_split": True}, "sage8-infer with V as two FP8 terms (hi + lo/16)"),
}
BACKENDS = {name: register_backend(BackendInfo(name, functools.partial(sage8_attend, **kw), supports_sink=True,
                                               description=desc))
            for name, (kw, desc) in _VARIANTS.items()}
