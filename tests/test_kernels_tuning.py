"""Config pruning of the Triton kernels (pure Python, no GPU): tile divisibility, the shared-memory estimate
against what Triton 3.6 allocates for sm_90, the device-limit fallback, and the sparse even-span heuristic."""
import pytest
import torch
import triton

from sinkfree_kernels._tuning import (SAFE_SMEM_BYTES, even_span, make_pruner, max_shared_memory, prune_configs,
                                      smem_estimate)

H100_SMEM = 232448  # opt-in shared memory per block of H100/H200 (227 KB)

# metadata.shared of each config compiled for sm_90 on CPU (triton 3.6, triton.compile with a GPUTarget,
# pointers and strides 16-divisible as on a real launch), D=128 bf16, the larger of causal / non-causal,
# S not a multiple of the block: (kernel, tile (0 = dense), atomic dQ, BLOCK_M, BLOCK_N, stages, bytes)
MEASURED_SM90 = [
    ("dkdv", 0, False, 32, 64, 3, 82944),
    ("dkdv", 0, False, 32, 128, 3, 115200),
    ("dkdv", 0, False, 64, 64, 2, 99328),
    ("dkdv", 0, False, 64, 64, 3, 132096),
    ("dkdv", 0, False, 64, 128, 2, 131584),
    ("dkdv", 0, False, 64, 128, 3, 164864),
    ("dkdv", 0, False, 128, 128, 2, 197632),
    ("dkdv", 0, True, 32, 64, 3, 107520),
    ("dkdv", 0, True, 32, 128, 3, 156160),
    ("dkdv", 0, True, 64, 64, 2, 132096),
    ("dkdv", 0, True, 64, 64, 3, 164864),
    ("dkdv", 0, True, 64, 128, 2, 164352),
    ("dkdv", 0, True, 64, 128, 3, 197632),
    ("dkdv", 0, True, 128, 128, 2, 263168),
    ("dkdv", 64, False, 32, 64, 3, 132096),
    ("dkdv", 64, False, 64, 64, 2, 98816),
    ("dkdv", 64, False, 64, 64, 3, 132096),
    ("dkdv", 64, True, 32, 64, 3, 156672),
    ("dkdv", 64, True, 64, 64, 2, 131584),
    ("dkdv", 64, True, 64, 64, 3, 164864),
    ("dkdv", 128, False, 32, 64, 3, 231424),
    ("dkdv", 128, False, 32, 128, 3, 264192),
    ("dkdv", 128, False, 64, 64, 2, 164864),
    ("dkdv", 128, False, 64, 64, 3, 231424),
    ("dkdv", 128, False, 64, 128, 2, 197632),
    ("dkdv", 128, False, 64, 128, 3, 264192),
    ("dkdv", 128, False, 128, 128, 2, 197632),
    ("dkdv", 128, True, 32, 64, 3, 256000),
    ("dkdv", 128, True, 32, 128, 3, 305152),
    ("dkdv", 128, True, 64, 64, 2, 197632),
    ("dkdv", 128, True, 64, 64, 3, 264192),
    ("dkdv", 128, True, 64, 128, 2, 230400),
    ("dkdv", 128, True, 64, 128, 3, 296960),
    ("dkdv", 128, True, 128, 128, 2, 263168),
    ("dq", 0, False, 64, 32, 3, 81920),
    ("dq", 0, False, 64, 64, 2, 98304),
    ("dq", 0, False, 64, 64, 3, 131072),
    ("dq", 0, False, 128, 32, 3, 114688),
    ("dq", 0, False, 128, 64, 2, 131072),
    ("dq", 0, False, 128, 64, 3, 163840),
    ("dq", 64, False, 64, 32, 3, 131072),
    ("dq", 64, False, 64, 64, 2, 98304),
    ("dq", 64, False, 64, 64, 3, 131072),
    ("dq", 128, False, 64, 32, 3, 229376),
    ("dq", 128, False, 64, 64, 2, 163840),
    ("dq", 128, False, 64, 64, 3, 229376),
    ("dq", 128, False, 128, 32, 3, 262144),
    ("dq", 128, False, 128, 64, 2, 196608),
    ("dq", 128, False, 128, 64, 3, 262144),
    ("fwd", 0, False, 64, 64, 2, 81920),
    ("fwd", 0, False, 64, 64, 3, 114688),
    ("fwd", 0, False, 128, 64, 3, 131072),
    ("fwd", 0, False, 128, 128, 2, 163840),
    ("fwd", 64, False, 64, 64, 2, 81920),
    ("fwd", 64, False, 64, 64, 3, 114688),
    ("fwd", 128, False, 64, 64, 2, 147456),
    ("fwd", 128, False, 64, 64, 3, 212992),
    ("fwd", 128, False, 128, 64, 3, 229376),
    ("fwd", 128, False, 128, 128, 2, 163840),
]


def cfg(bm, bn, w=4, s=3):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)


def blocks(configs):
    return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages) for c in configs]


@pytest.mark.parametrize("kernel,tile,atomic,bm,bn,stages,measured", MEASURED_SM90)
def test_estimate_bounds_the_compiled_shared_memory(kernel, tile, atomic, bm, bn, stages, measured):
    est = smem_estimate(kernel, bm, bn, 128, stages, 2, sparse=tile > 0, tile_m=tile or 64, tile_n=tile or 64,
                        atomic_dq=atomic)
    assert measured <= est <= measured + 16 * 1024, (est, measured)
    if measured > H100_SMEM:  # what the GPU rejects, the pruning drops
        assert est > H100_SMEM


def test_sparse_128_tiles_drop_the_configs_that_ran_out_of_shared_memory():
    # GPU run 1: the 3-stage dQ config on causal 128-tiles needs 256 KB (the 2 sub-blocks each pipelined)
    dq = [cfg(128, 64, 8, 2), cfg(128, 64, 8, 3), cfg(128, 32, 4, 3), cfg(64, 64, 4, 3), cfg(64, 32, 4, 3)]
    kept = prune_configs(dq, "dq", 128, True, 128, 128, 2, H100_SMEM)
    assert blocks(kept) == [(128, 64, 2), (64, 64, 3), (64, 32, 3)]
    dkdv = [cfg(64, 128, 8, 2), cfg(64, 128, 8, 3), cfg(32, 128, 4, 3), cfg(64, 64, 4, 3), cfg(32, 64, 4, 3),
            cfg(128, 128, 8, 2)]
    assert blocks(prune_configs(dkdv, "dkdv", 128, True, 128, 128, 2, H100_SMEM)) == [(64, 128, 2), (128, 128, 2)]
    # atomic dQ needs an extra fp32 buffer: nothing of the list fits, the 64x64 2-stage fallback does
    atomic = prune_configs(dkdv, "dkdv", 128, True, 128, 128, 2, H100_SMEM, atomic_dq=True)
    assert blocks(atomic) == [(64, 64, 2)]
    assert smem_estimate("dkdv", 64, 64, 128, 2, 2, True, 128, 128, True) <= H100_SMEM
    # 64-tiles: everything that divides the tile fits
    assert blocks(prune_configs(dq, "dq", 128, True, 64, 64, 2, H100_SMEM)) == [(64, 64, 3), (64, 32, 3)]


def test_prune_tiles_registers_untuned_and_fallback():
    configs = [cfg(128, 128, 8, 2), cfg(128, 64), cfg(64, 128), cfg(64, 64)]
    # dense D=64: all fit; D=128: 128x128 still allowed (bm*bn <= 128*128), 256-wide would not be
    assert len(prune_configs(configs, "fwd", 64, False, 64, 64, 2, H100_SMEM)) == 4
    assert blocks(prune_configs([cfg(256, 128)], "fwd", 128, False, 64, 64, 2, H100_SMEM)) == [(64, 64, 2)]
    # sparse 64-tiles: only blocks dividing the tile
    assert blocks(prune_configs(configs, "fwd", 128, True, 64, 64, 2, H100_SMEM)) == [(64, 64, 3)]
    # SINKFREE_AUTOTUNE=0: the first survivor only
    assert blocks(prune_configs(configs, "fwd", 128, False, 64, 64, 2, H100_SMEM, autotune=False)) == [(128, 128, 2)]
    # a small device: the fallback drops to 1 stage, then to 32-blocks; fp32 doubles the bytes
    small = smem_estimate("dkdv", 64, 64, 128, 1, 4, True, 128, 128) + 1
    assert blocks(prune_configs(configs, "dkdv", 128, True, 128, 128, 4, small)) == [(64, 64, 1)]
    assert blocks(prune_configs(configs, "dkdv", 128, True, 128, 128, 4, 1024)) == [(32, 32, 1)]
    # what comes out is always a list of configs (never empty), whatever the limit
    for limit in (0, 50_000, H100_SMEM, 10**7):
        for kernel in ("fwd", "dkdv", "dq"):
            assert prune_configs(configs, kernel, 128, True, 128, 64, 2, limit)


def test_pruner_reads_the_launch_arguments():
    prune = make_pruner("dq")
    q = torch.empty(1, 1, 8, 128, dtype=torch.bfloat16)
    dq = [cfg(128, 64, 8, 3), cfg(64, 64, 4, 2)]
    kept = prune(dq, {"Q": q, "Sq": 8}, HEAD_DIM=128, SPARSE=True, TILE_M=128, TILE_N=128, CAUSAL=True)
    limit = max_shared_memory(None)
    assert all(smem_estimate("dq", *b[:2], 128, b[2], 2, True, 128, 128) <= limit for b in blocks(kept))
    if not torch.cuda.is_available():
        assert limit == SAFE_SMEM_BYTES  # no device to ask: the sm_80 limit, which every card has
        assert blocks(kept) == [(64, 64, 1)]  # 99 KB: 128-tiles walked in 64-blocks fit at 1 stage only


def test_even_span_counts_whole_tiles_when_sparse():
    def args(s, block, tile, sparse):
        return {"Sq": s, "BLOCK_M": block, "TILE_M": tile, "SPARSE": sparse}

    assert even_span(args(192, 64, 128, False), "Sq", "BLOCK_M", "TILE_M")
    assert not even_span(args(192, 64, 128, True), "Sq", "BLOCK_M", "TILE_M")  # tile 1 covers 128..255
    assert not even_span(args(4000, 32, 64, True), "Sq", "BLOCK_M", "TILE_M")  # GPU run 3: 32-blocks, S = 4000
    assert even_span(args(4096, 32, 64, True), "Sq", "BLOCK_M", "TILE_M")
    assert even_span(args(4000, 32, 64, False), "Sq", "BLOCK_M", "TILE_M")


# the dense forward's tensor-descriptor configs (SINKFREE_ATTN_TMA=1), compiled for sm_90 on CPU like the table
# above (kernels/tools/inspect_sm90.py --tma), D=128 bf16, the larger of causal / non-causal:
# (warp-specialized, BLOCK_M, BLOCK_N, stages, bytes)
MEASURED_SM90_TMA = [
    (False, 128, 64, 3, 132096),
    (False, 128, 128, 2, 164864),
    (True, 128, 64, 3, 147744),
    (True, 128, 64, 2, 114848),
    (True, 128, 128, 2, 180384),
]


# the backward's descriptor configs, same tool and shapes: (kernel, warp-specialized, BLOCK_M, BLOCK_N, stages,
# bytes at D 128, the larger of causal / non-causal)
MEASURED_SM90_TMA_BWD = [
    ("dkdv", False, 64, 128, 2, 131600),
    ("dkdv", False, 64, 128, 3, 165888),
    ("dkdv", False, 64, 64, 3, 133120),
    ("dkdv", False, 32, 64, 3, 82944),
    ("dkdv", True, 64, 64, 2, 114880),
    ("dkdv", True, 64, 128, 2, 147680),
    ("dq", False, 128, 64, 2, 131104),
    ("dq", False, 128, 64, 3, 164864),
    ("dq", False, 64, 64, 3, 132096),
    ("dq", True, 64, 64, 2, 114880),
]


@pytest.mark.parametrize("kernel,ws,bm,bn,stages,measured",
                         [("fwd", *row) for row in MEASURED_SM90_TMA] + MEASURED_SM90_TMA_BWD)
def test_estimate_bounds_the_tma_configs(kernel, ws, bm, bn, stages, measured):
    est = smem_estimate(kernel, bm, bn, 128, stages, 2, warp_spec=ws)
    assert measured <= est <= measured + 16 * 1024, (est, measured)


def test_tma_configs_only_with_descriptors_and_only_listed_on_request(monkeypatch):
    from sinkfree_kernels._tuning import tma_mode, with_tma_configs

    tma = triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "USE_TMA": True, "WARP_SPEC": True}, num_warps=4,
                        num_stages=3)
    ptr = [cfg(128, 64, 8, 3), cfg(64, 64, 4, 3)]
    monkeypatch.delenv("SINKFREE_ATTN_TMA", raising=False)
    assert tma_mode() == "0" and with_tma_configs(ptr, [tma]) == ptr
    monkeypatch.setenv("SINKFREE_ATTN_TMA", "1")
    assert tma_mode() == "1"
    # pointer configs first: the untuned default (SINKFREE_AUTOTUNE=0) is the same with or without TMA
    kept = prune_configs(ptr + [tma], "fwd", 128, False, 64, 64, 2, H100_SMEM, has_desc=True, autotune=False)
    assert blocks(kept) == [(128, 64, 3)] and "USE_TMA" not in kept[0].kwargs
    assert len(prune_configs(ptr + [tma], "fwd", 128, False, 64, 64, 2, H100_SMEM, has_desc=True)) == 3
    assert len(prune_configs(ptr + [tma], "fwd", 128, False, 64, 64, 2, H100_SMEM)) == 2  # no descriptors
    # a device too small for the warp-specialized buffers drops it like any other config
    small = smem_estimate("fwd", 128, 64, 128, 3) + 1
    kept = prune_configs(ptr + [tma], "fwd", 128, False, 64, 64, 2, small, has_desc=True)
    assert all(not c.kwargs.get("WARP_SPEC") for c in kept)


def test_tma_mode_rejects_unknown_values(monkeypatch):
    from sinkfree_kernels._tuning import tma_mode

    for value, mode in (("", "0"), ("0", "0"), ("1", "1"), (" Only ", "only")):
        monkeypatch.setenv("SINKFREE_ATTN_TMA", value)
        assert tma_mode() == mode
    monkeypatch.setenv("SINKFREE_ATTN_TMA", "yes")
    with pytest.raises(ValueError, match="SINKFREE_ATTN_TMA='yes'.*0.*1.*only"):
        tma_mode()


def test_removed_ws_mode_is_an_error_naming_the_allowed_values(monkeypatch):
    # SINKFREE_ATTN_TMA=ws (warp-specialized forward with in-kernel descriptors) crashed on an H200 and was
    # removed: it must fail loudly, not fall back silently to another mode
    from sinkfree_kernels import _tuning

    monkeypatch.setenv("SINKFREE_ATTN_TMA", "ws")
    with pytest.raises(ValueError, match=r"SINKFREE_ATTN_TMA='ws': allowed values are 0 .*, 1 .* and only .*"
                                         r"ws was removed"):
        _tuning.tma_mode()
    monkeypatch.setattr(_tuning, "INTERPRET", False)  # the interpreter never lists descriptor configs
    with pytest.raises(ValueError, match="allowed values"):
        _tuning.with_tma_configs(["p"], ["t"])


def test_tma_listing_and_no_in_kernel_descriptor_configs(monkeypatch):
    from sinkfree_kernels import _tuning, attention_fwd

    monkeypatch.setattr(_tuning, "INTERPRET", False)  # the interpreter never lists descriptor configs
    ptr, tma = ["p1", "p2"], ["t"]
    for mode, listed in (("0", ptr), ("1", ptr + tma), ("only", ptr + tma)):
        monkeypatch.setenv("SINKFREE_ATTN_TMA", mode)
        assert _tuning.with_tma_configs(ptr, tma) == listed
    # the forward kernel has no DEVICE_DESC constexpr any more, and no config of its lists sets it
    fn = attention_fwd._attn_fwd
    while not hasattr(fn, "arg_names"):
        fn = fn.fn
    assert "DEVICE_DESC" not in fn.arg_names
    for c in (attention_fwd.FWD_CONFIGS + attention_fwd.FWD_TMA_CONFIGS + attention_fwd.FWD_WS_CONFIGS):
        assert "DEVICE_DESC" not in c.kwargs


def test_sparse_pair_switch(monkeypatch):
    from sinkfree_kernels import _tuning

    monkeypatch.setattr(_tuning, "INTERPRET", False)  # the lists as a GPU import builds them
    spec = [(64, 128, 4, 2)]
    monkeypatch.setenv("SINKFREE_SPARSE_PAIR", "1")
    assert [c.kwargs for c in _tuning.make_pair_configs(spec)] == [{"BLOCK_M": 64, "BLOCK_N": 128, "PAIR": True}]
    monkeypatch.setenv("SINKFREE_SPARSE_PAIR", "0")
    assert _tuning.make_pair_configs(spec) == []
    assert len(_tuning.make_pair_configs(spec, force=True)) == 1
    monkeypatch.delenv("SINKFREE_SPARSE_PAIR")
    assert _tuning.make_pair_configs(spec) == []  # opt-in
    monkeypatch.setenv("SINKFREE_SPARSE_PAIR", "yes")
    with pytest.raises(ValueError, match="SINKFREE_SPARSE_PAIR='yes'.*0"):
        _tuning.make_pair_configs(spec)
