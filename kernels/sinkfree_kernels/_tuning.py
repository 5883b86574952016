"""Autotuning helpers shared by the attention kernels: config lists, pruning, the interpreter switch."""

import functools
import os

import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# the opt-in shared memory of sm_80 (99 KB): what we assume when the device limit cannot be read
SAFE_SMEM_BYTES = 101376
# slack for what the estimate leaves out (barriers, per-row LSE/delta buffers, small layout scratch)
SMEM_SLACK_BYTES = 2048


def autotune_enabled() -> bool:
    """SINKFREE_AUTOTUNE=0 keeps only the first valid config of each kernel: quick compiles for tests. Read at
    each tuning decision (not at import), so a test can set it after the package was imported."""
    return os.environ.get("SINKFREE_AUTOTUNE", "1") != "0"


def tma_mode() -> str:
    """SINKFREE_ATTN_TMA: '0' (default) pointer loads only; '1' adds the tensor-descriptor (TMA) configs of the
    dense forward and backward (dK/dV, dQ) to their autotune lists (the autotuner then picks between both kinds); 'only' keeps only them
    wherever descriptors can be used (an A/B of the two load paths). The config list is built at import, so set
    it before the first import of the kernels; the launchers read it at each launch (descriptors or not). 'ws'
    (warp-specialized forward with in-kernel descriptors) was removed: its first config hit an illegal memory
    access on an H200 (kernels/NOTES.md), so it is an error like any other unknown value."""
    v = os.environ.get("SINKFREE_ATTN_TMA", "0").strip().lower() or "0"
    if v not in ("0", "1", "only"):
        removed = " (ws was removed after it crashed on an H200; see kernels/NOTES.md)" if v == "ws" else ""
        raise ValueError(f"SINKFREE_ATTN_TMA={v!r}: allowed values are 0 (pointer loads, the default), 1 (add the "
                         f"TMA configs) and only (TMA configs only){removed}")
    return v


def seq_bucket(n: int) -> int:
    """Autotune key for a sequence length: the next power of two (tuning once per size class)."""
    return 1 << max(int(n) - 1, 1).bit_length()


def even_span(args, seq: str, block: str, tile: str) -> bool:
    """True when every block a kernel walks along `seq` lies inside the sequence, so its loads need no bound
    mask. Dense: blocks step through [0, S), so S % BLOCK == 0 suffices. Sparse: the walked blocks cover whole
    tiles (TILE // BLOCK sub-blocks each), so the last tile's later sub-blocks reach past S whenever S is not
    a multiple of the tile, even if it is a multiple of the block: S % TILE == 0 is needed there."""
    n, span = args[seq], args[block]
    if args.get("SPARSE", False):
        span = max(span, args[tile])
    return n % span == 0


EVEN_HEURISTICS = {
    "EVEN_M": lambda a: even_span(a, "Sq", "BLOCK_M", "TILE_M"),
    "EVEN_N": lambda a: even_span(a, "Sk", "BLOCK_N", "TILE_N"),
}


def make_configs(specs):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) tuples as triton.Configs; on the interpreter one 64x64
    config, since the autotuner cannot time there."""
    if INTERPRET:
        specs = [(64, 64, 4, 2)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in specs]


def make_pair_configs(specs, force: bool = False):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) tuples as configs of the sparse kernels' gathered tile-pair
    path (PAIR constexpr; the pruning keeps them only for sparse launches with a block of exactly two tiles).
    Opt-in with SINKFREE_SPARSE_PAIR=1 (read at import): on an H200 the autotuner picked the per-tile 64x64
    configs over every PAIR config for all three kernels (kernels/NOTES.md), so by default, and on the
    interpreter (tests force them), the list is empty. force=True builds them regardless (GPU tests)."""
    flag = os.environ.get("SINKFREE_SPARSE_PAIR", "0").strip()
    if flag not in ("0", "1"):
        raise ValueError(f"SINKFREE_SPARSE_PAIR={flag!r}: allowed values are 0 (default: per-tile configs only) "
                         "and 1 (the autotuner also tries gathered tile-pair configs for 64-token tiles)")
    if not force and (INTERPRET or flag == "0"):
        return []
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "PAIR": True}, num_warps=w, num_stages=s)
            for bm, bn, w, s in specs]


def tma_block_shapes(nargs):
    """Config pre_hook of the descriptor configs: the TMA box of each descriptor is one block of one head,
    (1, 1, BLOCK_M, HEAD_DIM) for the query-side tensors (DescQ, and DescDO in the backward), (1, 1, BLOCK_N,
    HEAD_DIM) for the key-side ones (DescK, DescV)."""
    d = nargs["HEAD_DIM"]
    for name, block in (("DescQ", "BLOCK_M"), ("DescDO", "BLOCK_M"), ("DescK", "BLOCK_N"), ("DescV", "BLOCK_N")):
        if name in nargs:
            nargs[name].block_shape = [1, 1, nargs[block], d]


def make_tma_configs(specs, pre_hook=tma_block_shapes):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages, warp_specialize) tuples as configs of the tensor-descriptor
    path (USE_TMA, WARP_SPEC constexprs; pre_hook sets the descriptors' block shapes); interpreter: one 64x64."""
    if INTERPRET:
        specs = [(64, 64, 4, 2, False)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "USE_TMA": True, "WARP_SPEC": ws}, num_warps=w,
                          num_stages=s, pre_hook=pre_hook) for bm, bn, w, s, ws in specs]


def with_tma_configs(configs, tma_configs):
    """The autotune list of a kernel with a descriptor variant: pointer configs first (the untuned default
    stays the first pointer config), the TMA ones added only under SINKFREE_ATTN_TMA=1/only. Never on the
    interpreter: its one config is not pruned (a lone config skips the autotuner), so tests force the TMA
    config where they want it."""
    if tma_mode() == "0" or INTERPRET:
        return list(configs)
    return list(configs) + list(tma_configs)


@functools.lru_cache(maxsize=None)
def max_shared_memory(device_index: int | None = None) -> int:
    """Opt-in shared memory per block of a CUDA device in bytes (H100/H200: 232448 = 227 KB); SAFE_SMEM_BYTES
    when neither torch nor the Triton driver can tell."""
    try:
        import torch

        idx = torch.cuda.current_device() if device_index is None else device_index
        n = int(getattr(torch.cuda.get_device_properties(idx), "shared_memory_per_block_optin", 0) or 0)
        if n > 0:
            return n
    except Exception:  # no CUDA, old torch
        pass
    try:
        idx = 0 if device_index is None else device_index
        n = int(triton.runtime.driver.active.utils.get_device_properties(idx)["max_shared_mem"])
        if n > 0:
            return n
    except Exception:
        pass
    return SAFE_SMEM_BYTES


def smem_estimate(kernel: str, block_m: int, block_n: int, head_dim: int, num_stages: int, elem_bytes: int = 2,
                  sparse: bool = False, tile_m: int = 64, tile_n: int = 64, atomic_dq: bool = False,
                  warp_spec: bool = False) -> int:
    """Shared memory (bytes) a config needs, an upper bound of what Triton 3.6 allocates on sm_90.

    Each kernel keeps its own block's operands resident and software-pipelines the loads of the blocks it
    walks with num_stages buffers each. In the sparse kernels the walk over a tile is a static_range of
    TILE // BLOCK sub-blocks, unrolled inside the pipelined loop, so every sub-block's loads get their own
    num_stages buffers: a 128-tile walked in 64-blocks needs twice the pipelined memory. Checked against
    compiles for sm_90 (tests/test_kernels_tuning.py has the measured table):
      fwd   resident Q (BM x D), pipelined K, V (2 x BN x D) per key sub-block;
      dK/dV resident K, V (2 x BN x D), pipelined Q, dO (2 x BM x D) per query sub-block, plus the fp32
            row vectors (LSE, delta); atomic dQ adds a BM x D fp32 layout-conversion buffer (and, for
            BM < 64, one of BN x D);
      dQ    resident Q, dO (2 x BM x D), pipelined K, V (2 x BN x D) per key sub-block.
    TMA descriptor loads add only their barriers (< 1.1 KB, inside the slack); warp specialization (WARP_SPEC)
    adds a near-constant 15.5-16.7 KB (measured: forward BLOCK_M 128 16544-16672 B, dK/dV BLOCK_M 64 15552-15584
    B, dQ BLOCK_M 64 16576 B, at D 64 and 128): 17 KB.
    """
    e, d = elem_bytes, head_dim
    stages = max(int(num_stages), 1)
    if kernel == "fwd":
        subs = max(tile_n // block_n, 1) if sparse else 1
        resident, piped = block_m * d * e, 2 * block_n * d * e * subs
        rows = 0
    elif kernel == "dkdv":
        subs = max(tile_m // block_m, 1) if sparse else 1
        resident, piped = 2 * block_n * d * e, 2 * block_m * d * e * subs
        rows = 2 * block_m * 4 * subs * stages
        if atomic_dq:  # dQ (BM x D fp32) re-laid out for the atomics; below 64 rows also a K-sized buffer
            resident += block_m * d * 4 + (block_n * d * e if block_m < 64 else 0)
    elif kernel == "dq":
        subs = max(tile_n // block_n, 1) if sparse else 1
        resident, piped = 2 * block_m * d * e, 2 * block_n * d * e * subs
        rows = 0
    else:
        raise ValueError(f"unknown kernel {kernel!r}")
    ws = 17 * 1024 if warp_spec else 0
    return resident + stages * piped + rows + ws + SMEM_SLACK_BYTES


def _arg(named_args, kwargs, name, default):
    return named_args.get(name, kwargs.get(name, default))


def prune_configs(configs, kernel: str, head_dim: int, sparse: bool, tile_m: int, tile_n: int, elem_bytes: int,
                  smem_limit: int, atomic_dq: bool = False, autotune: bool = True, has_desc: bool = False,
                  tma_only: bool = False):
    """Pure config filter (unit-tested on CPU): keep configs whose blocks divide the sparse tiles (dense: any),
    that fit the registers at D >= 128 (BLOCK_M x BLOCK_N <= 128 x 128) and whose estimated shared memory fits
    smem_limit. Descriptor (USE_TMA) configs only where the launch passes tensor descriptors (has_desc) and is
    dense; tma_only (SINKFREE_ATTN_TMA=only) then drops the pointer configs. When nothing is left, the first
    fallback (a pointer config: 64-blocks, or the tile if smaller; 2 stages, then 1) that fits, else the
    smallest. autotune=False keeps only the first survivor (the untuned default)."""
    def fits(bm, bn, stages, ws=False):
        return smem_estimate(kernel, bm, bn, head_dim, stages, elem_bytes, sparse, tile_m, tile_n,
                             atomic_dq, ws) <= smem_limit

    kept = []
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        if c.kwargs.get("PAIR", False):  # gathered tile pairs: sparse only, a block of exactly two tiles (query
            # tiles in the key-major dK/dV, key tiles in the query-major forward and dQ)
            pair_ok = (bm == 2 * tile_m and tile_n % bn == 0) if kernel == "dkdv" else \
                (bn == 2 * tile_n and tile_m % bm == 0)
            if not sparse or not pair_ok:
                continue
        elif sparse and (tile_m % bm or tile_n % bn):
            continue
        tma = bool(c.kwargs.get("USE_TMA", False))
        if tma and (sparse or not has_desc):
            continue
        if tma_only and has_desc and not sparse and not tma:
            continue
        if head_dim >= 128 and bm * bn > 128 * 128:
            continue
        if not fits(bm, bn, c.num_stages, bool(c.kwargs.get("WARP_SPEC", False))):
            continue
        kept.append(c)
    if not kept:
        bm, bn = min(tile_m, 64) if sparse else 64, min(tile_n, 64) if sparse else 64
        options = [(bm, bn, 2), (bm, bn, 1), (min(bm, 32), min(bn, 32), 1)]
        pick = next((o for o in options if fits(*o)), options[-1])
        kept = [triton.Config({"BLOCK_M": pick[0], "BLOCK_N": pick[1]}, num_warps=4, num_stages=pick[2])]
    return kept if autotune else kept[:1]


def make_pruner(kernel: str):
    """early_config_prune for one kernel ('fwd', 'dkdv', 'dq'): reads the launch's shapes, dtype and device."""
    def prune(configs, named_args, **kwargs):
        q = _arg(named_args, kwargs, "Q", None)
        elem = q.element_size() if hasattr(q, "element_size") else 2
        dev = getattr(getattr(q, "device", None), "index", None)
        return prune_configs(
            configs, kernel, head_dim=_arg(named_args, kwargs, "HEAD_DIM", 64),
            sparse=bool(_arg(named_args, kwargs, "SPARSE", False)), tile_m=_arg(named_args, kwargs, "TILE_M", 64),
            tile_n=_arg(named_args, kwargs, "TILE_N", 64), elem_bytes=elem, smem_limit=max_shared_memory(dev),
            atomic_dq=bool(_arg(named_args, kwargs, "ATOMIC_DQ", False)), autotune=autotune_enabled(),
            has_desc=bool(_arg(named_args, kwargs, "HAS_DESC", False)), tma_only=tma_mode() == "only")

    prune.__name__ = f"prune_{kernel}"
    return prune
