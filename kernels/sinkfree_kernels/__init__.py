"""Triton attention kernels for sinkfree (depends only on torch and triton).

`flash_attention` (dense) and `block_sparse_attention` (key-tile lists) return (out, lse), take per-head sink
logits and are differentiable through `torch.library` ops (namespace `sinkfree`); `reference` holds the fp32
PyTorch oracles and `tiles` the tile-list helpers. The 8-bit variants (`sage8_attention`,
`sage8_block_sparse_attention`, issue 7) reuse the same tiling and lists; `quant_reference` holds their
fake-quant oracles. Both of those import without triton; the ops load on
first use. Set TRITON_INTERPRET=1 before the first use to run the kernels on CPU tensors.
"""

from .quant_reference import sage8_attention_reference, sage8_block_sparse_reference
from .reference import attention_reference, block_sparse_attention_reference, masked_attention_reference
from .tiles import lists_from_map, map_from_lists, random_lists, token_mask, transpose_lists

_OPS = ("SUPPORTED_HEAD_DIMS", "block_sparse_attention", "flash_attention")
_SAGE8_OPS = ("sage8_attention", "sage8_block_sparse_attention", "sage8_quantize", "sage8_attention_quantized")

__all__ = [
    "SUPPORTED_HEAD_DIMS", "block_sparse_attention", "flash_attention", "attention_reference", "block_sparse_attention_reference", "lists_from_map", "map_from_lists",
    "masked_attention_reference", "random_lists", "token_mask", "transpose_lists", "sage8_attention",
    "sage8_block_sparse_attention", "sage8_quantize", "sage8_attention_quantized", "sage8_attention_reference", "sage8_block_sparse_reference",
]


def __getattr__(name):
    if name in _OPS:
        from . import ops

        return getattr(ops, name)
    if name in _SAGE8_OPS:
        from . import sage8_ops

        return getattr(sage8_ops, name)
    raise AttributeError(f"module 'sinkfree_kernels' has no attribute {name!r}")
