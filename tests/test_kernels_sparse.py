"""Block-sparse Triton flash attention vs the fp32 reference with the same token mask (CPU: interpreter)."""
import pytest
import torch

from kernel_checks import autotuned_kernels, compare, forced_configs, make_qkv, rel_err
from sinkfree_kernels import (block_sparse_attention, block_sparse_attention_reference, flash_attention,
                              lists_from_map, map_from_lists, random_lists, transpose_lists)

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array:DeprecationWarning")
TOL = {torch.float32: 1e-4, torch.float16: 1e-2}  # fp32: summation order over outlier keys gives ~3e-5


def _sparse(idx, cnt, causal, tq, tk, klen=None):
    def fn(q, k, v, sink=None):
        return block_sparse_attention(q, k, v, idx, cnt, sink, causal, tile_q=tq, tile_k=tk, kv_tile_len=klen)

    def ref(q, k, v, sink=None):
        return block_sparse_attention_reference(q, k, v, idx, cnt, sink, causal, tile_q=tq, tile_k=tk,
                                                kv_tile_len=klen)

    return fn, ref


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("b,hq,hkv,sq,sk,tq,tk,dtype", [
    (2, 4, 2, 150, 150, 64, 64, torch.float32),
    (1, 2, 1, 100, 260, 64, 128, torch.float32),
    (2, 2, 2, 200, 130, 128, 64, torch.float16),
])
def test_random_lists_with_sink(causal, b, hq, hkv, sq, sk, tq, tk, dtype):
    q, k, v = make_qkv(b, hq, hkv, sq, sk, 64, dtype)
    idx, cnt = random_lists(b, hq, sq, sk, tq, tk, 0.5)
    cnt[0, 0, 0] = 0  # one empty list
    sink = torch.randn(hq).requires_grad_()
    fn, ref = _sparse(idx, cnt, causal, tq, tk)
    compare(fn, ref, [q, k, v, sink], TOL[dtype])


@pytest.mark.parametrize("causal", [False, True])
def test_atomic_dq_mode(causal):
    q, k, v = make_qkv(1, 4, 2, 150, 150, 64, torch.float32)
    idx, cnt = random_lists(1, 4, 150, 150, 64, 64, 0.6)
    ref = _sparse(idx, cnt, causal, 64, 64)[1]

    def fn(q, k, v, sink):
        return block_sparse_attention(q, k, v, idx, cnt, sink, causal, deterministic=False)

    compare(fn, ref, [q, k, v, torch.randn(4).requires_grad_()], TOL[torch.float32])


def test_empty_lists_give_zero_and_minus_inf():
    q, k, v = make_qkv(1, 2, 2, 128, 128, 64, torch.float32)
    idx = torch.zeros(1, 2, 2, 2, dtype=torch.int32)
    cnt = torch.tensor([[[0, 1], [0, 0]]], dtype=torch.int32)
    out, lse = block_sparse_attention(q, k, v, idx, cnt)
    assert torch.all(out[0, 0, :64] == 0) and torch.all(torch.isneginf(lse[0, 0, :64]))
    assert torch.all(out[0, 1] == 0) and torch.isfinite(lse[0, 0, 64:]).all()
    sink = torch.tensor([0.5, -1.0], requires_grad=True)
    out, lse = block_sparse_attention(q, k, v, idx, cnt, sink)  # with a sink: out 0, LSE = s_h
    assert torch.all(out[0, 1] == 0) and torch.allclose(lse[0, 1], torch.full((128,), -1.0))
    fn, ref = _sparse(idx, cnt, False, 64, 64)
    compare(fn, ref, [q, k, v, sink], TOL[torch.float32])


def test_padded_key_tiles():
    # VSA layout: 3 key tiles of 64 slots holding 64, 40 and 17 real tokens
    q, k, v = make_qkv(2, 2, 2, 192, 192, 64, torch.float32)
    klen = torch.tensor([64, 40, 17], dtype=torch.int32)
    idx, cnt = random_lists(2, 2, 192, 192, 64, 64, 0.7)
    fn, ref = _sparse(idx, cnt, False, 64, 64, klen)
    compare(fn, ref, [q, k, v, torch.randn(2).requires_grad_()], TOL[torch.float32])


@pytest.mark.parametrize("causal", [False, True])
def test_all_tiles_equal_dense(causal):
    q, k, v = make_qkv(1, 4, 2, 140, 140, 64, torch.float32)
    n = 3
    idx = torch.arange(n, dtype=torch.int32).expand(1, 1, n, n)  # broadcast over batch and heads
    cnt = torch.full((1, 1, n), n, dtype=torch.int32)
    sink = torch.randn(4)
    out, lse = block_sparse_attention(q, k, v, idx, cnt, sink, causal)
    dense, dense_lse = flash_attention(q, k, v, sink, causal)
    assert rel_err(out, dense) < 1e-6 and torch.allclose(lse, dense_lse, atol=1e-5)


def test_list_helpers_roundtrip():
    g = torch.Generator().manual_seed(0)
    tmap = torch.rand(2, 3, 5, 7, generator=g) < 0.4
    idx, cnt = lists_from_map(tmap)
    assert torch.equal(map_from_lists(idx, cnt, 7), tmap)
    kidx, kcnt = transpose_lists(idx, cnt, 7)
    assert torch.equal(map_from_lists(kidx, kcnt, 5), tmap.transpose(-1, -2))
    valid = torch.arange(kidx.shape[-1]) < kcnt[..., None]
    ordered = torch.where(valid, kidx, 10**6)
    assert torch.all(ordered[..., 1:] >= ordered[..., :-1])  # ascending, deterministic


@pytest.mark.parametrize("shape,p", [((2, 3, 5, 7), 0.4), ((1, 4, 33, 64), 0.1), ((1, 1, 3, 9), 0.0),
                                     ((1, 2, 4, 6), 1.0)])
def test_lists_from_map_equals_the_sorted_construction(shape, p):
    """The compaction gives exactly what sorting (kept tiles first, each group ascending) gives, also past cnt."""
    g = torch.Generator().manual_seed(1)
    tmap = torch.rand(*shape, generator=g) < p
    nk = shape[-1]
    ar = torch.arange(nk)
    expected = torch.sort(torch.where(tmap, ar, ar + nk), dim=-1).values.remainder(nk).to(torch.int32)
    for width in (None, 3):
        idx, cnt = lists_from_map(tmap, max_kept=width)
        assert idx.dtype == torch.int32 and cnt.dtype == torch.int32 and idx.is_contiguous()
        assert torch.equal(idx, expected[..., :width] if width else expected)
        assert torch.equal(cnt, tmap.sum(-1).to(torch.int32))
    kidx, kcnt = lists_from_map(tmap.transpose(-1, -2))  # non-contiguous input, as transpose_lists passes
    assert torch.equal(map_from_lists(kidx, kcnt, shape[-2]), tmap.transpose(-1, -2))


def test_random_lists_keep_diagonal():
    idx, cnt = random_lists(1, 2, 512, 512, 64, 64, 0.25, generator=torch.Generator().manual_seed(3))
    tmap = map_from_lists(idx, cnt, 8)
    assert torch.all(cnt == 2) and torch.all(tmap.diagonal(dim1=-2, dim2=-1))


def test_bad_tile_lists():
    q = torch.randn(1, 2, 100, 64)
    idx = torch.zeros(1, 2, 3, 1, dtype=torch.int32)
    cnt = torch.ones(1, 2, 3, dtype=torch.int32)
    with pytest.raises(ValueError, match="tile lists must be"):
        block_sparse_attention(q, q, q, idx, cnt)  # 100 tokens are 2 tiles of 64, not 3
    with pytest.raises(ValueError, match="64 or 128"):
        block_sparse_attention(q, q, q, idx[:, :, :1], cnt[:, :, :1], tile_q=100, tile_k=100)
    with pytest.raises(ValueError, match="int32"):
        block_sparse_attention(q, q, q, idx[:, :, :2].long(), cnt[:, :, :2])


def _poisoned(x, pad, value):
    """x as a (B, H, S, D) view into a buffer whose rows S..S+pad of every head hold `value`: an unmasked
    read past the sequence end lands in the poison (the interpreter would otherwise read neighbouring data)."""
    b, h, s, d = x.shape
    buf = torch.full((b, h, s + pad, d), value, dtype=x.dtype)
    buf[:, :, :s] = x.detach()
    return buf[:, :, :s].requires_grad_()


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("causal", [False, True])
def test_blocks_smaller_than_tiles_never_read_past_the_end(causal, deterministic):
    # GPU run 3: S a multiple of the block (64) but not of the tile (128) made EVEN_M/EVEN_N true, so the last
    # tile's second block was loaded unmasked past S (garbage keys in dQ, garbage query rows in dK/dV).
    # On the interpreter blocks are 64x64, so 128-tiles with S = 192 hit that path.
    s, pad = 192, 128
    q, k, v = make_qkv(1, 2, 1, s, s, 64, torch.float32, seed=5)
    q, k, v = (_poisoned(t, pad, float("nan")) for t in (q, k, v))
    idx, cnt = random_lists(1, 2, s, s, 128, 128, 1.0, generator=torch.Generator().manual_seed(1),
                            causal=causal)
    ref = _sparse(idx, cnt, causal, 128, 128)[1]

    def fn(q, k, v, sink):
        return block_sparse_attention(q, k, v, idx, cnt, sink, causal, tile_q=128, tile_k=128,
                                      deterministic=deterministic)

    compare(fn, ref, [q, k, v, torch.randn(2).requires_grad_()], TOL[torch.float32])


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("causal", [False, True])
def test_32_blocks_on_64_tiles(causal, deterministic):
    # the configs the GPU autotuner picked in run 3 (dK/dV 32x64, dQ 64x32) on 64-tiles, S = 160: a multiple
    # of 32 but not of 64, like the GPU test's S = 4000 (the interpreter otherwise runs only 64x64)
    import triton

    s = 160
    q, k, v = make_qkv(1, 2, 1, s, s, 64, torch.float32, seed=9)
    q, k, v = (_poisoned(t, 64, float("nan")) for t in (q, k, v))
    idx, cnt = random_lists(1, 2, s, s, 64, 64, 0.7, generator=torch.Generator().manual_seed(2), causal=causal)
    ref = _sparse(idx, cnt, causal, 64, 64)[1]

    def fn(q, k, v, sink):
        return block_sparse_attention(q, k, v, idx, cnt, sink, causal, deterministic=deterministic)

    kernels = autotuned_kernels()
    forced = [(kernels["fwd"], triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2)),
              (kernels["dkdv"], triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=4, num_stages=2)),
              (kernels["dq"], triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2))]
    with forced_configs(forced):
        compare(fn, ref, [q, k, v, torch.randn(2).requires_grad_()], TOL[torch.float32],
                names=("q", "k", "v", "sink"))


@pytest.mark.parametrize("klen,dtype", [(False, torch.float32), (True, torch.float32), (True, torch.float16)])
@pytest.mark.parametrize("causal", [False, True])
def test_gathered_tile_pairs(causal, klen, dtype):
    """PAIR configs: two 64-token list entries per 128-wide block, gathered (key tiles in the forward and dQ,
    query tiles in dK/dV); odd counts (a half-empty last block), an empty list, padded tiles, GQA, a sink, S not
    a multiple of 64 or 128, and NaN past the sequence end."""
    import triton

    s = 300  # 5 tiles, the last with 44 tokens
    q, k, v = make_qkv(1, 4, 2, s, s, 64, dtype, seed=11)
    q, k, v = (_poisoned(t, 128, float("nan")) for t in (q, k, v))
    idx, cnt = random_lists(1, 4, s, s, 64, 64, 0.6, generator=torch.Generator().manual_seed(4), causal=causal)
    cnt[0, 1, 2] = 0
    cnt[0, 2, 3] = min(int(cnt[0, 2, 3]), 1)  # a single entry: only the first half of the block
    assert bool((cnt % 2 == 1).any())
    kl = torch.tensor([64, 40, 64, 17, 44], dtype=torch.int32) if klen else None
    fn, ref = _sparse(idx, cnt, causal, 64, 64, kl)
    kernels = autotuned_kernels()
    forced = [(kernels["fwd"], triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "PAIR": True}, num_warps=4,
                                             num_stages=2)),
              (kernels["dkdv"], triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "PAIR": True}, num_warps=4,
                                              num_stages=2)),
              (kernels["dq"], triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "PAIR": True}, num_warps=4,
                                            num_stages=2))]
    with forced_configs(forced):
        compare(fn, ref, [q, k, v, torch.randn(4).requires_grad_()], TOL[dtype], names=("q", "k", "v", "sink"))


@pytest.mark.parametrize("causal", [False, True])
def test_gathered_query_tile_pairs_with_atomic_dq(causal):
    """dK/dV PAIR with the opt-in atomic dQ (dQ added from the gathered rows), GQA, S = 200."""
    import triton

    s = 200
    q, k, v = make_qkv(1, 4, 2, s, s, 64, torch.float32, seed=12)
    idx, cnt = random_lists(1, 4, s, s, 64, 64, 0.75, generator=torch.Generator().manual_seed(6), causal=causal)
    ref = _sparse(idx, cnt, causal, 64, 64)[1]

    def fn(q, k, v, sink):
        return block_sparse_attention(q, k, v, idx, cnt, sink, causal, deterministic=False)

    kernels = autotuned_kernels()
    forced = [(kernels["dkdv"], triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "PAIR": True}, num_warps=4,
                                              num_stages=2))]
    with forced_configs(forced):
        compare(fn, ref, [q, k, v, torch.randn(4).requires_grad_()], TOL[torch.float32],
                names=("q", "k", "v", "sink"))


def test_pair_configs_are_pruned_to_sparse_two_tile_blocks():
    import triton

    from sinkfree_kernels._tuning import prune_configs

    pair = triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "PAIR": True}, num_warps=4, num_stages=2)
    plain = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2)
    kw = dict(kernel="fwd", head_dim=128, elem_bytes=2, smem_limit=232448)
    assert prune_configs([pair, plain], sparse=True, tile_m=64, tile_n=64, **kw) == [pair, plain]
    assert prune_configs([pair, plain], sparse=True, tile_m=128, tile_n=128, **kw) == [plain]
    assert prune_configs([pair, plain], sparse=False, tile_m=64, tile_n=64, **kw) == [plain]
    rows_pair = triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "PAIR": True}, num_warps=8, num_stages=2)
    kw["kernel"] = "dkdv"  # key-major: the pair is two query tiles
    assert prune_configs([pair, rows_pair, plain], sparse=True, tile_m=64, tile_n=64, **kw) == [rows_pair, plain]
