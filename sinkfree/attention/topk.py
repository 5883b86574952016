"""`topk` selector for LLMs: mean-pooled query and key tiles score every key tile, each query tile keeps the
causal top-k (the diagonal tile always kept), one selection shared by each GQA group, then the block-sparse
kernel runs on those lists. The selection is not differentiable (as in MoBA / NSA / VSA)."""
from __future__ import annotations

import math

import torch
from sinkfree_kernels.tiles import lists_from_map

from sinkfree.attention.block_sparse import block_sparse_attend
from sinkfree.attention.registry import BackendInfo, register_backend
from sinkfree.attention.spec import AttentionSpec


def _tile_means(x: torch.Tensor, tile: int) -> torch.Tensor:
    """(B, H, S, D) -> (B, H, ceil(S/tile), D) fp32 means over the real tokens of each tile."""
    b, h, s, d = x.shape
    n = -(-s // tile)
    padded = torch.nn.functional.pad(x.float(), (0, 0, 0, n * tile - s))
    counts = torch.full((n,), float(tile), device=x.device)
    counts[-1] = s - (n - 1) * tile
    return padded.view(b, h, n, tile, d).sum(3) / counts[:, None]


@torch.no_grad()
def topk_tile_lists(q: torch.Tensor, k: torch.Tensor, tile: int, keep: float, causal: bool = True):
    """Key-tile lists (idx (B, Hq, Nq, K), cnt (B, Hq, Nq)) int32: the top ceil(keep * Nk) key tiles per query
    tile by mean-pooled scores, the diagonal tile(s) forced in, future tiles excluded when causal."""
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    group = hq // hkv
    nq, nk = -(-sq // tile), -(-sk // tile)
    qm = _tile_means(q, tile).view(b, hkv, group, nq, d).mean(2)  # one selection per GQA group
    km = _tile_means(k, tile)
    scores = qm @ km.transpose(-1, -2) / math.sqrt(d)  # (B, Hkv, Nq, Nk)
    off = sk - sq
    first = torch.arange(nq, device=q.device) * tile + off  # diagonal key of each query tile's first row
    last = torch.clamp(torch.arange(1, nq + 1, device=q.device) * tile, max=sq) - 1 + off
    cols = torch.arange(nk, device=q.device)
    lo_t = first.clamp(0, sk - 1)[:, None] // tile
    hi_t = last.clamp(0, sk - 1)[:, None] // tile
    diag = (cols[None, :] >= lo_t) & (cols[None, :] <= hi_t) & (last[:, None] >= 0)
    if causal:
        scores = scores.masked_fill(cols[None, :] * tile > last[:, None], float("-inf"))
    scores = scores.masked_fill(diag, float("inf"))
    n_sel = min(nk, max(math.ceil(keep * nk), int(diag.sum(-1).max())))
    top = scores.topk(n_sel, dim=-1)
    tile_map = torch.zeros(b, hkv, nq, nk, dtype=torch.bool, device=q.device)
    tile_map.scatter_(-1, top.indices, top.values > float("-inf"))
    idx, cnt = lists_from_map(tile_map, max_kept=n_sel)
    return idx.repeat_interleave(group, dim=1), cnt.repeat_interleave(group, dim=1)


def topk_attention(q, k, v, spec: AttentionSpec, sink=None) -> torch.Tensor:
    """Causal (or not) top-k tile attention: spec.tile_size tokens per tile, spec.topk_keep of tiles kept."""
    idx, cnt = topk_tile_lists(q, k, spec.tile_size, spec.topk_keep, spec.causal)
    return block_sparse_attend(q, k, v, idx, cnt, spec, sink)


TOPK = register_backend(BackendInfo(
    "topk", topk_attention, supports_sink=True,
    description="top-k key tiles per query tile from mean-pooled scores (diagonal kept, shared per GQA "
                "group) through the sinkfree block-sparse kernel"))
