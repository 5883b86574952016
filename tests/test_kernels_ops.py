"""The kernel ops as torch.library ops (opcheck, torch.compile without graph breaks) and the attention
registry backends built on them (flash, block_sparse, topk)."""
import pytest
import torch

import sinkfree_kernels.ops  # noqa: F401  (registers the sinkfree:: ops)
from kernel_checks import make_qkv, rel_err
from sinkfree.attention import AttentionSpec, attend, get_backend
from sinkfree.attention.block_sparse import block_sparse_attend
from sinkfree.attention.topk import topk_tile_lists
from sinkfree_kernels import block_sparse_attention, flash_attention, map_from_lists, random_lists

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array:DeprecationWarning")
OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def test_opcheck_flash():
    q, k, v = make_qkv(1, 2, 1, 40, 40, 64, torch.float32)
    sink = torch.randn(2, requires_grad=True)
    torch.library.opcheck(torch.ops.sinkfree.flash_attn_fwd.default, (q, k, v, sink, True, 0.125, True),
                          test_utils=OPCHECK_TESTS)
    torch.library.opcheck(torch.ops.sinkfree.flash_attn_fwd.default, (q, k, v, None, False, 0.125, False),
                          test_utils=OPCHECK_TESTS)


def test_opcheck_block_sparse():
    q, k, v = make_qkv(1, 2, 2, 70, 70, 64, torch.float16)
    idx, cnt = random_lists(1, 2, 70, 70, 64, 64, 0.5)
    sink = torch.randn(2, requires_grad=True)
    args = (q, k, v, idx, cnt, None, sink, False, 0.125, 64, 64, True)
    torch.library.opcheck(torch.ops.sinkfree.block_sparse_attn_fwd.default, args, test_utils=OPCHECK_TESTS)


@pytest.mark.parametrize("sparse", [False, True])
def test_outputs_and_grads_are_stored_bshd(sparse):
    """out, dq, dk, dv come back as (B, H, S, D) views of (B, S, H, D) storage: out.transpose(1, 2) reshapes to
    (B, S, H·D) without a copy, and the fused q/k/v projection's gradient needs no transposing copy (values: the
    reference tests in test_kernels_dense/sparse run on these same outputs)."""
    q, k, v = make_qkv(2, 4, 2, 70, 70, 64, torch.float16)
    if sparse:
        idx, cnt = random_lists(2, 4, 70, 70, 64, 64, 0.5)
        out, _ = block_sparse_attention(q, k, v, idx, cnt, causal=False)
    else:
        out, _ = flash_attention(q, k, v, None, causal=True)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    for t in (out, *grads):
        assert t.transpose(1, 2).is_contiguous() and not t.is_contiguous()
    assert out.transpose(1, 2).reshape(2, 70, 4 * 64).data_ptr() == out.data_ptr()  # a view


def test_compiles_without_graph_breaks():
    q, k, v = make_qkv(1, 2, 1, 48, 48, 64, torch.float32)
    sink = torch.randn(2, requires_grad=True)
    idx, cnt = random_lists(1, 2, 48, 48, 64, 64, 1.0)

    def f(q, k, v, sink):
        out, lse = flash_attention(q, k, v, sink, causal=True)
        out2, _ = block_sparse_attention(q, k, v, idx, cnt, sink)
        return (out * 2 + out2).sum() + lse.sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    loss = compiled(q, k, v, sink)
    grads = torch.autograd.grad(loss, (q, k, v, sink))
    ref_grads = torch.autograd.grad(f(q, k, v, sink), (q, k, v, sink))
    assert all(rel_err(a, b) < 1e-6 for a, b in zip(grads, ref_grads))


@pytest.mark.parametrize("backend", ["flash", "topk"])
@pytest.mark.parametrize("causal", [False, True])
def test_backends_match_sdpa_when_dense(backend, causal):
    q, k, v = make_qkv(2, 4, 2, 96, 96, 64, torch.float32)
    sink = torch.randn(4)
    spec = AttentionSpec(backend=backend, causal=causal, topk_keep=1.0)
    ref = attend(q, k, v, AttentionSpec(backend="sdpa", causal=causal), sink)
    assert rel_err(attend(q, k, v, spec, sink), ref) < 1e-5


def test_backends_fall_back_to_reference_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors, no interpreter: the PyTorch reference
    q, k, v = make_qkv(1, 2, 2, 64, 64, 80, torch.float32)  # D=80 would be rejected by the kernels
    ref = attend(q, k, v, AttentionSpec(backend="sdpa"))
    assert rel_err(attend(q, k, v, AttentionSpec(backend="flash")), ref) < 1e-5
    assert rel_err(attend(q, k, v, AttentionSpec(backend="topk", topk_keep=1.0)), ref) < 1e-5


def test_block_sparse_backend_needs_lists():
    q = torch.randn(1, 2, 64, 64)
    with pytest.raises(ValueError, match="needs key-tile lists"):
        attend(q, q, q, AttentionSpec(backend="block_sparse"))
    idx, cnt = random_lists(1, 2, 64, 64, 64, 64, 1.0)
    out = get_backend("block_sparse").fn(q, q, q, AttentionSpec(backend="block_sparse"), None, tiles=(idx, cnt))
    assert rel_err(out, block_sparse_attend(q, q, q, idx, cnt, AttentionSpec())) == 0


def test_topk_selection_rules():
    b, hq, hkv, s, t = 1, 4, 2, 1000, 64
    q, k, _ = make_qkv(b, hq, hkv, s, s, 64, torch.float32)
    idx, cnt = topk_tile_lists(q, k, t, keep=0.25, causal=True)
    nq = nk = 16
    tmap = map_from_lists(idx, cnt, nk)
    assert torch.all(tmap.diagonal(dim1=-2, dim2=-1)), "diagonal tile always kept"
    assert not torch.any(tmap & torch.ones(nq, nk, dtype=torch.bool).triu(1)), "no future tile"
    assert torch.equal(tmap[:, 0], tmap[:, 1]) and torch.equal(tmap[:, 2], tmap[:, 3]), "shared per GQA group"
    assert torch.all(cnt <= 4) and torch.all(cnt == torch.clamp(torch.arange(1, nq + 1), max=4))
