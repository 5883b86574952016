"""The Triton kernels on a GPU at real sizes in bf16, against the fp32 reference (skipped without CUDA)."""
import pytest
import torch

from kernel_checks import compare, make_qkv
from sinkfree_kernels import (attention_reference, block_sparse_attention, block_sparse_attention_reference,
                              flash_attention, random_lists)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
BF16_TOL = 2e-2


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("b,hq,hkv,sq,sk,d", [
    (2, 8, 2, 1500, 1500, 128),
    (1, 8, 8, 1000, 2100, 64),
    (1, 4, 4, 2048, 2048, 128),
])
def test_dense_bf16(causal, b, hq, hkv, sq, sk, d):
    q, k, v = make_qkv(b, hq, hkv, sq, sk, d, torch.bfloat16, device="cuda")
    sink = torch.randn(hq, device="cuda").requires_grad_()

    def fn(q, k, v, s):
        return flash_attention(q, k, v, s, causal)

    def ref(q, k, v, s):
        return attention_reference(q, k, v, s, causal)

    compare(fn, ref, [q, k, v, sink], BF16_TOL)


@pytest.mark.parametrize("causal", [False, True])
def test_dense_bf16_atomic_dq(causal):
    q, k, v = make_qkv(2, 8, 2, 1500, 1500, 128, torch.bfloat16, device="cuda")
    sink = torch.randn(8, device="cuda").requires_grad_()

    def fn(q, k, v, s):
        return flash_attention(q, k, v, s, causal, deterministic=False)

    def ref(q, k, v, s):
        return attention_reference(q, k, v, s, causal)

    compare(fn, ref, [q, k, v, sink], BF16_TOL)


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("tile", [64, 128])
def test_block_sparse_bf16(causal, tile, deterministic):
    b, hq, hkv, s = 1, 8, 4, 4000
    q, k, v = make_qkv(b, hq, hkv, s, s, 128, torch.bfloat16, device="cuda")
    idx, cnt = random_lists(b, hq, s, s, tile, tile, 0.25, device="cuda", causal=causal)
    sink = torch.randn(hq, device="cuda").requires_grad_()

    def fn(q, k, v, sk):
        return block_sparse_attention(q, k, v, idx, cnt, sk, causal, tile_q=tile, tile_k=tile,
                                      deterministic=deterministic)

    def ref(q, k, v, sk):
        return block_sparse_attention_reference(q, k, v, idx, cnt, sk, causal, tile_q=tile, tile_k=tile)

    compare(fn, ref, [q, k, v, sink], BF16_TOL)


def test_backward_is_deterministic_on_gpu():
    q, k, v = make_qkv(1, 8, 2, 2048, 2048, 128, torch.bfloat16, device="cuda")
    sink = torch.randn(8, device="cuda").requires_grad_()
    idx, cnt = random_lists(1, 8, 2048, 2048, 64, 64, 0.3, device="cuda")
    dout = torch.randn(1, 8, 2048, 128, device="cuda", dtype=torch.bfloat16)
    for fn in (lambda: flash_attention(q, k, v, sink, True)[0],
               lambda: block_sparse_attention(q, k, v, idx, cnt, sink)[0]):
        runs = [torch.autograd.grad((fn() * dout).sum(), (q, k, v, sink)) for _ in range(2)]
        assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_inductor_compiles_without_graph_breaks():
    q, k, v = make_qkv(2, 4, 2, 512, 512, 64, torch.bfloat16, device="cuda")
    sink = torch.randn(4, device="cuda").requires_grad_()

    @torch.compile(fullgraph=True)
    def f(q, k, v, sink):
        out, _ = flash_attention(q, k, v, sink, causal=True)
        return (out.float() ** 2).mean()

    f(q, k, v, sink).backward()
    assert sink.grad is not None and torch.isfinite(q.grad).all()
