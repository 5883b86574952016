"""Triton attention kernels for sinkfree (depends only on torch and triton).

`flash_attention` (dense) and `block_sparse_attention` (key-tile lists) return (out, lse), take per-head sink
logits and are differentiable through `torch.library` ops; `reference` holds the fp32 PyTorch oracles and
`tiles` the tile-list helpers.
"""

from .ops import SUPPORTED_HEAD_DIMS, block_sparse_attention, flash_attention
from .reference import attention_reference, block_sparse_attention_reference, masked_attention_reference
from .tiles import lists_from_map, map_from_lists, random_lists, token_mask, transpose_lists

__all__ = [
    "SUPPORTED_HEAD_DIMS", "attention_reference", "block_sparse_attention", "block_sparse_attention_reference",
    "flash_attention", "lists_from_map", "map_from_lists", "masked_attention_reference", "random_lists",
    "token_mask", "transpose_lists",
]
