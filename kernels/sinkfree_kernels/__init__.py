"""Triton attention kernels for sinkfree (depends only on torch and triton).

`flash_attention` (dense) and `block_sparse_attention` (key-tile lists) return (out, lse), take per-head sink
logits and are differentiable through `torch.library` ops (namespace `sinkfree`); `reference` holds the fp32
PyTorch oracles and `tiles` the tile-list helpers. Both of those import without triton; the ops load on
first use. Set TRITON_INTERPRET=1 before the first use to run the kernels on CPU tensors.
"""

from .reference import attention_reference, block_sparse_attention_reference, masked_attention_reference
from .tiles import lists_from_map, map_from_lists, random_lists, token_mask, transpose_lists

_OPS = ("SUPPORTED_HEAD_DIMS", "block_sparse_attention", "flash_attention")

__all__ = [
    "SUPPORTED_HEAD_DIMS", "block_sparse_attention", "flash_attention", "attention_reference", "block_sparse_attention_reference", "lists_from_map", "map_from_lists",
    "masked_attention_reference", "random_lists", "token_mask", "transpose_lists",
]


def __getattr__(name):
    if name in _OPS:
        from . import ops

        return getattr(ops, name)
    raise AttributeError(f"module 'sinkfree_kernels' has no attribute {name!r}")
