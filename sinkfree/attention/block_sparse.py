"""`block_sparse` backend: our Triton block-sparse flash attention over per-(b, h, query tile) key-tile
lists. Selectors (`topk`, VSA) build the lists and call `block_sparse_attend`; the registered function takes
them as `tiles=(idx, cnt)` or `tiles=(idx, cnt, kv_tile_len)`."""
from __future__ import annotations

import torch

from sinkfree.attention.flash import use_triton
from sinkfree.attention.registry import BackendInfo, register_backend
from sinkfree.attention.spec import AttentionSpec


def block_sparse_attend(q, k, v, q2k_idx, q2k_cnt, spec: AttentionSpec, sink=None, kv_tile_len=None):
    """Attention over key-tile lists idx (B|1, Hq|1, Nq, K) int32, cnt (B|1, Hq|1, Nq) int32, tiles of
    spec.tile_size tokens (queries and keys); kv_tile_len (Nk,) counts the real tokens of padded key tiles."""
    t = spec.tile_size
    if use_triton(q):
        from sinkfree_kernels import block_sparse_attention

        return block_sparse_attention(q, k, v, q2k_idx, q2k_cnt, sink, spec.causal, spec.scale, t, t,
                                      kv_tile_len)[0]
    from sinkfree_kernels.reference import block_sparse_attention_reference

    return block_sparse_attention_reference(q, k, v, q2k_idx, q2k_cnt, sink, spec.causal, spec.scale, t, t,
                                            kv_tile_len)[0]


def block_sparse_backend(q, k, v, spec: AttentionSpec, sink=None, tiles=None) -> torch.Tensor:
    """Registry entry: needs the tile lists as `tiles=(idx, cnt[, kv_tile_len])`."""
    if tiles is None:
        raise ValueError("attn_backend='block_sparse' needs key-tile lists (tiles=(idx, cnt)); to pick tiles "
                         "automatically use a selector backend such as attn_backend='topk'")
    return block_sparse_attend(q, k, v, *tiles[:2], spec, sink, *tiles[2:])


BLOCK_SPARSE = register_backend(BackendInfo(
    "block_sparse", block_sparse_backend, supports_sink=True,
    description="sinkfree Triton block-sparse flash attention over given key-tile lists (64/128 tiles)"))
