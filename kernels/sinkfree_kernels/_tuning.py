"""Autotuning helpers shared by the attention kernels: config lists, pruning, the interpreter switch."""

import os

import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# SINKFREE_AUTOTUNE=0 keeps only the first valid config of each kernel: quick compiles for tests
AUTOTUNE = os.environ.get("SINKFREE_AUTOTUNE", "1") != "0"


def seq_bucket(n: int) -> int:
    """Autotune key for a sequence length: the next power of two (tuning once per size class)."""
    return 1 << max(int(n) - 1, 1).bit_length()


def make_configs(specs):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) tuples as triton.Configs; on the interpreter one 64x64
    config, since the autotuner cannot time there."""
    if INTERPRET:
        specs = [(64, 64, 4, 2)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in specs]


def prune_for_tiles(configs, named_args, **kwargs):
    """Keep configs whose blocks divide the sparse tiles (dense: any) and fit the registers at D=128."""
    sparse = named_args.get("SPARSE", kwargs.get("SPARSE", False))
    tm = named_args.get("TILE_M", kwargs.get("TILE_M", 64))
    tn = named_args.get("TILE_N", kwargs.get("TILE_N", 64))
    d = named_args.get("HEAD_DIM", kwargs.get("HEAD_DIM", 64))
    kept = []
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        if sparse and (tm % bm or tn % bn):
            continue
        if d >= 128 and bm * bn > 128 * 128:
            continue
        kept.append(c)
    if not kept:  # fall back to the tile itself
        kept = [triton.Config({"BLOCK_M": min(tm, 64), "BLOCK_N": min(tn, 64)}, num_warps=4, num_stages=2)]
    return kept if AUTOTUNE else kept[:1]
