"""`vsa` selector: Video Sparse Attention (VSA, arXiv 2505.13389) as its authors' code computes it.

Tokens of a (T, H, W) grid are kept in tile-major order: (4, 4, 4) tiles (images (1, 8, 8)) one after the
other, each tile's tokens in raster order. Inside attention only, every tile is padded to the tile volume
(real tokens first, the count per tile in `tile_len`). Then
  coarse: mean-pooled q, k, v per tile (real tokens only), dense tile-level softmax attention (autograd);
  select: top-k key tiles per (batch, head, query tile) on the coarse logits (not differentiable);
  fine:   block-sparse attention over the selected tiles (the `block_sparse` backend);
  out   = fine + gate ⊙ coarse (coarse broadcast to every token of its tile; gate None: fine + coarse).
With every tile kept and gate = 0 this is dense attention. Non-causal only.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import torch

from sinkfree.attention.block_sparse import block_sparse_attend
from sinkfree.attention.registry import BackendInfo, register_backend
from sinkfree.attention.spec import AttentionSpec

VSA_HEAD_DIMS = (64, 128)  # head dims of the block-sparse kernel the fine stage runs on
VSA_TILE_VOLUMES = (64, 128)  # tokens per tile the kernel takes


def check_vsa_tile(tile, option: str = "vsa_tile") -> tuple[int, int, int]:
    """Validate a (t, h, w) tile shape: three positive ints whose product is 64 or 128."""
    try:
        tile = tuple(int(n) for n in tile)
    except (TypeError, ValueError):
        raise ValueError(f"{option}={tile!r} must be three positive integers (t, h, w)") from None
    if len(tile) != 3 or min(tile) < 1:
        raise ValueError(f"{option}={list(tile)} must be three positive integers (t, h, w)")
    if math.prod(tile) not in VSA_TILE_VOLUMES:
        raise ValueError(f"{option}={list(tile)} holds {math.prod(tile)} tokens; VSA tiles must hold one of "
                         f"{list(VSA_TILE_VOLUMES)} tokens, e.g. [4, 4, 4] (video) or [1, 8, 8] (images)")
    return tile


def check_vsa_head_dim(head_dim: int) -> None:
    """ValueError unless the fine stage's kernel supports head_dim."""
    if head_dim not in VSA_HEAD_DIMS:
        raise ValueError(f"head_dim={head_dim} is not supported by attn_backend='vsa' (its block-sparse kernel "
                         f"has head dims {list(VSA_HEAD_DIMS)}); change n_embd/n_head or head_dim, or use "
                         f"attn_backend='sdpa'")


@dataclasses.dataclass(frozen=True)
class VSATiling:
    """Token order and padding of one (T, H, W) grid cut into tiles.

    perm (S,): raster index of the i-th token in tile-major order; inverse (S,): its inverse.
    slot (S,): position of tile-major token i in the padded (n_tiles * volume) buffer.
    tile_len (n_tiles,) int32: real tokens per tile; tile_of (S,): tile of tile-major token i.
    """

    grid: tuple[int, int, int]
    tile: tuple[int, int, int]
    perm: torch.Tensor
    inverse: torch.Tensor
    slot: torch.Tensor
    tile_len: torch.Tensor
    tile_of: torch.Tensor

    @property
    def volume(self) -> int:
        """Tokens per (padded) tile."""
        return math.prod(self.tile)

    @property
    def n_tiles(self) -> int:
        return self.tile_len.numel()

    @property
    def padded(self) -> bool:
        """True when some tile is partial (the grid does not divide by the tile)."""
        return any(g % t for g, t in zip(self.grid, self.tile))


def _build_tiling(grid: tuple[int, int, int], tile: tuple[int, int, int], device: str) -> VSATiling:
    # Built on `device` from static-shape ops only (no bincount), so torch.compile traces it into the graph
    # without a break or host-to-device copies.
    T, H, W = grid
    a, b, c = tile
    dev = torch.device(device)
    nt, nh, nw = -(-T // a), -(-H // b), -(-W // c)
    t, h, w = torch.meshgrid(torch.arange(T, device=dev), torch.arange(H, device=dev), torch.arange(W, device=dev),
                             indexing="ij")
    t, h, w = t.flatten(), h.flatten(), w.flatten()  # raster coordinates (S,)
    tile_id = ((t // a) * nh + h // b) * nw + w // c
    # actual extent of each token's tile along h and w (edge tiles are partial)
    sb = torch.clamp(H - (h // b) * b, max=b)
    sc = torch.clamp(W - (w // c) * c, max=c)
    local = ((t % a) * sb + h % b) * sc + w % c  # raster order inside the tile, 0..count-1
    key = tile_id * (a * b * c) + local
    perm = torch.argsort(key)
    slot = key[perm]

    def extent(n: int, size: int, count: int) -> torch.Tensor:  # tokens of each tile along one axis
        return torch.clamp(n - torch.arange(count, device=dev) * size, max=size)

    tile_len = (extent(T, a, nt)[:, None, None] * extent(H, b, nh)[None, :, None]
                * extent(W, c, nw)[None, None, :]).flatten().to(torch.int32)
    return VSATiling(grid, tile, perm, torch.argsort(perm), slot, tile_len, slot // (a * b * c))


_tiling = functools.lru_cache(maxsize=64)(_build_tiling)  # eager calls reuse the index tensors


def vsa_tiling(grid, tile=(4, 4, 4), device=None) -> VSATiling:
    """The (cached) tiling of a (T, H, W) token grid by a (t, h, w) tile."""
    grid = tuple(int(n) for n in grid)
    if len(grid) != 3 or min(grid) < 1:
        raise ValueError(f"VSA token grid {list(grid)} must be three positive sizes (T, H, W)")
    build = _build_tiling if torch.compiler.is_compiling() else _tiling  # Dynamo would skip the cache anyway
    return build(grid, check_vsa_tile(tile), str(torch.device(device or "cpu")))


def tile_tokens(x: torch.Tensor, tiling: VSATiling, dim: int = 1) -> torch.Tensor:
    """Raster token order -> tile-major (unpadded) along `dim`."""
    return x.index_select(dim, tiling.perm)


def untile_tokens(x: torch.Tensor, tiling: VSATiling, dim: int = 1) -> torch.Tensor:
    """Tile-major token order -> raster along `dim`."""
    return x.index_select(dim, tiling.inverse)


def pad_tiles(x: torch.Tensor, tiling: VSATiling) -> torch.Tensor:
    """(B, H, S, D) tile-major -> (B, H, n_tiles * volume, D), zeros in the padding slots."""
    if not tiling.padded:
        return x
    b, h, _, d = x.shape
    return x.new_zeros(b, h, tiling.n_tiles * tiling.volume, d).index_copy(2, tiling.slot, x)


def unpad_tiles(x: torch.Tensor, tiling: VSATiling) -> torch.Tensor:
    """(B, H, n_tiles * volume, D) -> (B, H, S, D): the real tokens, tile-major."""
    return x if not tiling.padded else x.index_select(2, tiling.slot)


def vsa_topk(n_tiles: int, sparsity: float) -> int:
    """Key tiles kept per query tile: max(1, min(ceil((1 - sparsity) * n_tiles), n_tiles)) (authors' rule)."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"vsa_sparsity={sparsity!r} must be in [0, 1)")
    return max(1, min(math.ceil(round((1.0 - sparsity) * n_tiles, 6)), n_tiles))


def _tile_means(x: torch.Tensor, tiling: VSATiling) -> torch.Tensor:
    """(B, H, n_tiles * volume, D) padded -> (B, H, n_tiles, D) fp32 means over each tile's real tokens."""
    b, h, _, d = x.shape
    sums = x.view(b, h, tiling.n_tiles, tiling.volume, d).sum(3, dtype=torch.float32)  # no fp32 copy of x
    return sums / tiling.tile_len.to(sums.dtype)[:, None]


def vsa_coarse(q, k, v, tiling: VSATiling, scale: float, sink=None):
    """Coarse stage on padded q (B, Hq, Sp, D), k/v (B, Hkv, Sp, D): (logits (B, Hq, Nt, Nt) fp32,
    out (B, Hq, Nt, D) in q's dtype); a sink logit joins the tile-level softmax as it does the fine one.

    The tile means are summed in fp32, then the two tile-level matmuls take q's dtype (bf16 on a GPU: tensor
    cores, as the authors' plain-torch coarse stage on their bf16 means) with fp32 accumulation; the logits the
    top-k reads and the softmax are fp32. fp32 inputs (the CPU) keep every step in fp32."""
    dt = q.dtype
    hq, hkv = q.shape[1], k.shape[1]
    qc, kc, vc = (_tile_means(t, tiling).to(dt) for t in (q, k, v))
    if hq != hkv:
        kc, vc = kc.repeat_interleave(hq // hkv, 1), vc.repeat_interleave(hq // hkv, 1)
    logits = (qc @ kc.transpose(-1, -2)).float() * scale  # (B, Hq, Nt, Nt)
    z = logits
    if sink is not None:
        z = torch.cat([logits, sink.float().view(1, hq, 1, 1).expand(*logits.shape[:3], 1)], dim=-1)
    p = torch.softmax(z, dim=-1)[..., :logits.shape[-1]]
    return logits, p.to(dt) @ vc


@torch.no_grad()
def vsa_select(logits: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k key tiles per query tile on the coarse logits -> tile lists (idx int32 ascending, cnt int32)."""
    # unsorted top-k (the set is the same; sorting the k values is wasted work), then the indices ascending
    top = logits.topk(topk, dim=-1, sorted=False).indices.sort(dim=-1).values
    cnt = torch.full(top.shape[:-1], topk, dtype=torch.int32, device=top.device)
    return top.to(torch.int32).contiguous(), cnt


def vsa_attention(q, k, v, tiling: VSATiling, topk: int, gate: torch.Tensor | None = None,
                  sink: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """VSA on tile-major q (B, Hq, S, D), k/v (B, Hkv, S, D): fine + gate ⊙ coarse, (B, Hq, S, D) in q's dtype.

    gate: None (out = fine + coarse) or (B, Hq, S, D), tile-major like q; sink: None or (Hq,) fp32 logits."""
    s = q.shape[2]
    if s != math.prod(tiling.grid) or k.shape[2] != s:
        raise ValueError(f"VSA: q/k/v hold {s}/{k.shape[2]} tokens but the grid {list(tiling.grid)} has "
                         f"{math.prod(tiling.grid)}")
    check_vsa_head_dim(q.shape[-1])
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    topk = max(1, min(int(topk), tiling.n_tiles))
    qp, kp, vp = pad_tiles(q, tiling), pad_tiles(k, tiling), pad_tiles(v, tiling)
    logits, coarse = vsa_coarse(qp, kp, vp, tiling, scale, sink)
    idx, cnt = vsa_select(logits, topk)
    spec = AttentionSpec("block_sparse", causal=False, scale=scale, tile_size=tiling.volume)
    fine = block_sparse_attend(qp, kp, vp, idx, cnt, spec, sink, tiling.tile_len)  # padded, tile-major
    # Combine in the padded layout, where a tile's tokens are `volume` consecutive slots: each token gets its
    # tile's coarse output through a broadcast view (backward: a sum over the tile, no scatter), and one fused
    # addcmul (fp32 math, one rounding) writes the output in q's dtype.
    b, hq, _, d = fine.shape
    shape5 = (b, hq, tiling.n_tiles, tiling.volume, d)
    coarse = coarse[:, :, :, None, :].expand(shape5)
    fine = fine.view(shape5)
    if gate is None:
        out = fine + coarse
    else:
        out = torch.addcmul(fine, pad_tiles(gate, tiling).view(shape5), coarse)
    return unpad_tiles(out.reshape(b, hq, -1, d), tiling)


def vsa_backend(q, k, v, spec: AttentionSpec, sink=None) -> torch.Tensor:
    """Registry entry: VSA needs the token grid, which only a model that tiles its tokens knows."""
    raise ValueError("attn_backend='vsa' needs the (T, H, W) token grid: use it through a DiT "
                     "(sinkfree.models.dit, which tiles its tokens) or call sinkfree.attention.vsa.vsa_attention")


VSA = register_backend(BackendInfo(
    "vsa", vsa_backend, supports_sink=True, supports_causal=False,
    description="video sparse attention: coarse mean-pooled tile attention, top-k tiles, block-sparse fine "
                "stage, fine + gate*coarse (DiTs; non-causal; head dims 64/128)"))
