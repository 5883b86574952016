"""The Triton kernels on a GPU at real sizes in bf16, against the fp32 reference (skipped without CUDA).

Autotuning is off here (SINKFREE_AUTOTUNE=0: the first config that the pruning keeps), so each new key compiles
one config per kernel instead of ~15 (the autotuned run timed out at 150 s). The configs the autotuner can pick
are checked one by one in test_every_config_sparse_bf16 instead. Failure messages name the tensor (out, lse,
grad of q/k/v/sink), its relative error, the largest absolute error and where.
"""
import zlib

import pytest
import torch

from kernel_checks import autotune_off, autotuned_kernels, compare, forced_configs, make_qkv
from sinkfree_kernels import (attention_reference, block_sparse_attention, block_sparse_attention_reference,
                              flash_attention, random_lists)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
BF16_TOL = 2e-2
NAMES = ("q", "k", "v", "sink")


@pytest.fixture(autouse=True, scope="module")
def _untuned():
    with autotune_off():
        yield


def _seed(*key):
    return zlib.crc32(repr(key).encode())  # fixed inputs per case, stable across processes


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("b,hq,hkv,sq,sk,d", [
    (2, 8, 2, 1500, 1500, 128),
    (1, 8, 8, 1000, 2100, 64),
    (1, 4, 4, 2048, 2048, 128),
])
def test_dense_bf16(causal, b, hq, hkv, sq, sk, d):
    q, k, v = make_qkv(b, hq, hkv, sq, sk, d, torch.bfloat16, device="cuda", seed=_seed(b, hq, sq, sk, d, causal))
    sink = torch.randn(hq, device="cuda").requires_grad_()

    def fn(q, k, v, s):
        return flash_attention(q, k, v, s, causal)

    def ref(q, k, v, s):
        return attention_reference(q, k, v, s, causal)

    compare(fn, ref, [q, k, v, sink], BF16_TOL, names=NAMES)


@pytest.mark.parametrize("causal", [False, True])
def test_dense_bf16_atomic_dq(causal):
    q, k, v = make_qkv(2, 8, 2, 1500, 1500, 128, torch.bfloat16, device="cuda", seed=_seed("atomic", causal))
    sink = torch.randn(8, device="cuda").requires_grad_()

    def fn(q, k, v, s):
        return flash_attention(q, k, v, s, causal, deterministic=False)

    def ref(q, k, v, s):
        return attention_reference(q, k, v, s, causal)

    compare(fn, ref, [q, k, v, sink], BF16_TOL, names=NAMES)


def _sparse_case(s, tile, causal, deterministic, seed, hq=8, hkv=4):
    q, k, v = make_qkv(1, hq, hkv, s, s, 128, torch.bfloat16, device="cuda", seed=seed)
    idx, cnt = random_lists(1, hq, s, s, tile, tile, 0.25, device="cuda", causal=causal,
                            generator=torch.Generator().manual_seed(seed))
    sink = torch.randn(hq, device="cuda").requires_grad_()

    def fn(q, k, v, sk):
        return block_sparse_attention(q, k, v, idx, cnt, sk, causal, tile_q=tile, tile_k=tile,
                                      deterministic=deterministic)

    def ref(q, k, v, sk):
        return block_sparse_attention_reference(q, k, v, idx, cnt, sk, causal, tile_q=tile, tile_k=tile)

    return fn, ref, [q, k, v, sink]


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("tile", [64, 128])
def test_block_sparse_bf16(causal, tile, deterministic):
    # S = 4000: a multiple of 32 but not of 64 or 128 (the last tile is partial, and 32-blocks used to read
    # past its end unmasked)
    fn, ref, inputs = _sparse_case(4000, tile, causal, deterministic, _seed("sparse", tile, causal))
    compare(fn, ref, inputs, BF16_TOL, names=NAMES)


def _each_sparse_config(which, configs, s, tile, tag):
    """Run the sparse case (S = s, tile-token tiles, causal, GQA, sink) once per config of `configs` that the
    pruning keeps for kernel `which` ('fwd', 'dkdv', 'dkdv-atomic', 'dq'), forced; the other two kernels keep
    their default config. Returns (kept configs, failure messages): every config is tried before failing."""
    from sinkfree_kernels._tuning import max_shared_memory, prune_configs

    name = which.split("-")[0]
    atomic = which.endswith("atomic")
    kernel = autotuned_kernels()[name]
    kept = prune_configs(configs(kernel), name, head_dim=128, sparse=True, tile_m=tile, tile_n=tile, elem_bytes=2,
                         smem_limit=max_shared_memory(torch.cuda.current_device()), atomic_dq=atomic)
    failures = []
    for config in kept:
        fn, ref, inputs = _sparse_case(s, tile, True, not atomic, _seed(tag, which), hq=4, hkv=2)
        with forced_configs([(kernel, config)]):
            try:
                compare(fn, ref, inputs, BF16_TOL, names=NAMES)
            except Exception as e:  # collect every failing config, then fail once
                failures.append(f"{config}: {type(e).__name__}: {e}")
    return kept, failures


@pytest.mark.parametrize("which", ["fwd", "dkdv", "dkdv-atomic", "dq"])
def test_every_config_sparse_bf16(which):
    """Every config of one kernel that the pruning keeps (the autotuner may pick any of them), on 128-tiles
    walked in smaller blocks, S = 2112 = 33 x 64 (multiple of 32 and 64, not of 128: the last tile's later
    sub-blocks lie past S), causal; the other two kernels keep their default config."""
    kept, failures = _each_sparse_config(which, lambda k: k.configs, 2112, 128, "every")
    assert kept, "pruning left nothing"
    assert not failures, f"{len(failures)}/{len(kept)} configs of {which} failed:\n" + "\n".join(failures)


@pytest.mark.parametrize("which", ["fwd", "dkdv", "dq"])
def test_pair_configs_sparse_bf16(which):
    """Every gathered tile-pair (PAIR) config of one kernel on 64-tiles, D 128, S = 4000 (a partial last tile),
    causal, GQA, sink; the other two kernels keep their default config. (With the atomic dQ the dK/dV PAIR configs
    exceed the shared memory at D 128 and are pruned; the interpreter test covers that mode at D 64.)"""
    from sinkfree_kernels import attention_bwd, attention_fwd
    from sinkfree_kernels._tuning import make_pair_configs

    specs = {"fwd": attention_fwd.FWD_PAIR_SPECS, "dkdv": attention_bwd.DKDV_PAIR_SPECS,
             "dq": attention_bwd.DQ_PAIR_SPECS}[which]  # opt-in configs (SINKFREE_SPARSE_PAIR=1), built here
    kept, failures = _each_sparse_config(which, lambda k: make_pair_configs(specs, force=True), 4000, 64, "pair")
    assert kept and all(c.kwargs.get("PAIR", False) for c in kept), "no PAIR config listed or kept"
    assert not failures, f"{len(failures)}/{len(kept)} PAIR configs of {which} failed:\n" + "\n".join(failures)


def _check_tma_configs(forced, causal, tag):
    """Each entry of `forced` (a list of (kernel, config) pairs) in turn, bf16 vs the fp32 reference with
    gradients: odd S (rows past S zero-filled by TMA, then masked), GQA, sink, D 128 and 64, Sq != Sk."""
    from sinkfree_kernels import ops

    failures = []
    for b, hq, hkv, sq, sk, d in ((2, 8, 2, 1500, 1500, 128), (1, 4, 4, 1000, 2100, 64)):
        q, k, v = make_qkv(b, hq, hkv, sq, sk, d, torch.bfloat16, device="cuda", seed=_seed(tag, sq, d, causal))
        assert ops._tma_descs(q, k, v, torch.empty_like(q)) is not None
        sink = torch.randn(hq, device="cuda").requires_grad_()
        for pairs in forced:
            with forced_configs(pairs):
                try:
                    compare(lambda q, k, v, s: flash_attention(q, k, v, s, causal),
                            lambda q, k, v, s: attention_reference(q, k, v, s, causal), [q, k, v, sink], BF16_TOL,
                            names=NAMES)
                except Exception as e:
                    failures.append(f"D{d} {[str(c) for _, c in pairs]}: {type(e).__name__}: {e}")
    assert not failures, f"{len(failures)} TMA configs failed:\n" + "\n".join(failures)


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability()[0] < 9, reason="TMA: sm_90+")
@pytest.mark.parametrize("causal", [False, True])
def test_every_tma_config_dense_bf16(causal, monkeypatch):
    """The opt-in tensor-descriptor forward (SINKFREE_ATTN_TMA=1): each of its configs forced in turn;
    gradients through the usual backward."""
    from sinkfree_kernels import attention_fwd

    monkeypatch.setenv("SINKFREE_ATTN_TMA", "1")
    _check_tma_configs([[(attention_fwd._attn_fwd, c)] for c in attention_fwd.FWD_TMA_CONFIGS], causal, "tma")


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability()[0] < 9, reason="TMA: sm_90+")
@pytest.mark.parametrize("causal", [False, True])
def test_every_tma_backward_config_dense_bf16(causal, monkeypatch):
    """The opt-in tensor-descriptor backward: each dK/dV and each dQ TMA config forced in turn (the two lists
    walked side by side, the shorter one cycling), pointer forward."""
    from sinkfree_kernels import attention_bwd

    monkeypatch.setenv("SINKFREE_ATTN_TMA", "1")
    dkdv, dq = attention_bwd.DKDV_TMA_CONFIGS, attention_bwd.DQ_TMA_CONFIGS
    n = max(len(dkdv), len(dq))
    forced = [[(attention_bwd._attn_bwd_dkdv, dkdv[i % len(dkdv)]), (attention_bwd._attn_bwd_dq, dq[i % len(dq)])]
              for i in range(n)]
    _check_tma_configs(forced, causal, "tma-bwd")


def test_backward_is_deterministic_on_gpu():
    q, k, v = make_qkv(1, 8, 2, 2048, 2048, 128, torch.bfloat16, device="cuda", seed=7)
    sink = torch.randn(8, device="cuda").requires_grad_()
    idx, cnt = random_lists(1, 8, 2048, 2048, 64, 64, 0.3, device="cuda", generator=torch.Generator().manual_seed(7))
    dout = torch.randn(1, 8, 2048, 128, device="cuda", dtype=torch.bfloat16)
    for name, fn in (("dense", lambda: flash_attention(q, k, v, sink, True)[0]),
                     ("sparse", lambda: block_sparse_attention(q, k, v, idx, cnt, sink)[0])):
        runs = [torch.autograd.grad((fn() * dout).sum(), (q, k, v, sink)) for _ in range(2)]
        differ = [n for n, a, b in zip(NAMES, *runs) if not torch.equal(a, b)]
        assert not differ, f"{name}: grads of {differ} differ between two identical backward passes"


def test_inductor_compiles_without_graph_breaks():
    q, k, v = make_qkv(2, 4, 2, 512, 512, 64, torch.bfloat16, device="cuda", seed=3)
    sink = torch.randn(4, device="cuda").requires_grad_()

    @torch.compile(fullgraph=True)
    def f(q, k, v, sink):
        out, _ = flash_attention(q, k, v, sink, causal=True)
        return (out.float() ** 2).mean()

    f(q, k, v, sink).backward()
    assert sink.grad is not None and torch.isfinite(q.grad).all()
