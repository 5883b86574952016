"""GatedNorm's gate op (sinkfree_kernels.gate_up: y · s · σ(h W_upᵀ) in one Triton kernel each way) against the
fp32 PyTorch math, and `GatedNorm(kernel="triton_gate")` against the torch path; runs under the Triton
interpreter on CPU (fp32/fp16). Row counts leave partial row blocks (32 forward, 16-128 backward), widths leave
partial column chunks, ranks are padded (8, 20 -> 16/32) or exact (16, 64)."""
import pytest
import torch

from sinkfree.nn import norms
from sinkfree.nn.norms import GatedNorm
from sinkfree_kernels import gate_up as gate_up_mod
from sinkfree_kernels.gate_up import gate_up, gate_up_reference

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array:DeprecationWarning")
OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _inputs(n, c, r, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(n, c, generator=g)
    y[:, 3] *= 40.0  # a residual-sink-like channel
    y[::7, 5] = 100.0  # and outlier tokens
    h = torch.randn(n, r, generator=g)
    w = torch.randn(c, r, generator=g) * 2.0 / r ** 0.5  # σ spans its saturated ends too
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in (y, h, w)]


@pytest.mark.parametrize("n,c,r,dtype,scale", [
    (37, 64, 16, torch.float32, 1.0),
    (130, 96, 8, torch.float16, 2.0),
    (300, 200, 16, torch.float32, 1.0),  # > 2 backward row blocks, C not a multiple of the chunk
    (5, 1100, 20, torch.float32, 2.0),
    (129, 48, 64, torch.float16, 1.0),
])
def test_matches_fp32_reference(n, c, r, dtype, scale):
    y, h, w = _inputs(n, c, r, dtype)
    out = gate_up(y, h, w, scale)
    yr, hr, wr = (t.detach().float().requires_grad_() for t in (y, h, w))
    ref = gate_up_reference(yr, hr, wr, scale)
    assert out.dtype == dtype and out.shape == y.shape
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    err = ((out.float() - ref).abs() / (ref.abs() + 1.0)).max()
    assert err < tol, f"out: err {err:.2e}"
    dout = torch.randn(n, c, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad(out, (y, h, w), dout.to(dtype))
    refs = torch.autograd.grad(ref, (yr, hr, wr), dout)
    for name, got, want in zip(("y", "h", "w_up"), grads, refs):
        assert got.dtype == dtype and got.shape == want.shape, name
        rel = (got.float() - want).abs().max() / want.abs().max()
        assert rel < (1e-5 if dtype == torch.float32 else 5e-3), f"d{name}: rel err {rel:.2e}"


def test_leading_dims_and_strided_inputs():
    """(B, S, C) inputs; h a column slice of a wider tensor (row stride > r); dout not contiguous."""
    y, _, w = _inputs(2 * 45, 96, 16, torch.float32)
    y3 = y.detach().view(2, 45, 96).requires_grad_()
    wide = torch.randn(2, 45, 40, requires_grad=True)
    h = wide[..., 8:24]
    out = gate_up(y3, h, w, 1.0)
    ref = gate_up_reference(y3, h, w, 1.0)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    dout = torch.randn(2, 96, 45).transpose(1, 2)
    got = torch.autograd.grad(out, (y3, wide, w), dout)
    want = torch.autograd.grad(ref, (y3, wide, w), dout)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("block_m", [16, 32, 128])
def test_backward_row_blocks(monkeypatch, block_m):
    """Rows per backward program (the dW_up partials' count): several full blocks and a partial last one."""
    monkeypatch.setattr(gate_up_mod, "BLOCK_M_BWD", block_m)
    y, h, w = _inputs(70, 200, 16, torch.float32)
    out = gate_up(y, h, w, 2.0)
    dout = torch.randn(70, 200)
    got = torch.autograd.grad(out, (y, h, w), dout)
    yr, hr, wr = (t.detach().requires_grad_() for t in (y, h, w))
    want = torch.autograd.grad(gate_up_reference(yr, hr, wr, 2.0), (yr, hr, wr), dout)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


def test_gatednorm_rejects_ranks_the_op_cannot_take():
    assert gate_up_mod.MAX_RANK == norms.GATE_OP_MAX_RANK
    with pytest.raises(ValueError, match="gatednorm_kernel='triton_gate' supports gatednorm_rank <= 64, got 65"):
        GatedNorm(96, rank=65, kernel="triton_gate")
    GatedNorm(96, rank=65)  # the torch path takes any rank


def test_opcheck():
    y, h, w = _inputs(20, 64, 16, torch.float32)
    torch.library.opcheck(torch.ops.sinkfree.gate_up_fwd.default, (y, h, w, 2.0), test_utils=OPCHECK_TESTS)


def test_rejects_bad_input():
    y, h, w = _inputs(4, 64, 16, torch.float32)
    with pytest.raises(ValueError, match="w_up"):
        gate_up(y, h, w.t())
    with pytest.raises(ValueError, match="r <= 64"):
        gate_up(y, torch.randn(4, 65), torch.randn(64, 65))
    with pytest.raises(ValueError, match="h's dtype"):
        gate_up(y, h, w.double())


@pytest.mark.parametrize("identity", [False, True])
def test_gatednorm_triton_gate_matches_torch(monkeypatch, identity):
    calls = []
    real = gate_up_mod.gate_up
    monkeypatch.setattr(gate_up_mod, "gate_up", lambda *a: calls.append(a) or real(*a))
    torch.manual_seed(0)
    ref = GatedNorm(96, rank=16, identity_init=identity)
    with torch.no_grad():
        ref.weight.normal_(1.0, 0.2)
        ref.gate_up.weight.normal_(0.0, 0.5)
    tg = GatedNorm(96, rank=16, identity_init=identity, kernel="triton_gate")
    tg.load_state_dict(ref.state_dict())
    x = torch.randn(2, 33, 96) * 3.0
    x[..., 7] += 60.0
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ref, out = ref(xa), tg(xb)
    assert len(calls) == 1  # the triton_gate module went through the op (the torch one did not)
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    dout = torch.randn_like(out)
    (out_ref * dout).sum().backward()
    (out * dout).sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad, atol=1e-5, rtol=1e-4)
    for (name, p), q in zip(tg.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_gatednorm_triton_gate_traces_fullgraph():
    """The op is a graph node for Dynamo/AOTAutograd (no graph break; the same forward and gradients)."""
    torch._dynamo.reset()
    torch.manual_seed(1)
    norm = GatedNorm(64, rank=16, kernel="triton_gate")
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, inputs)

    compiled = torch.compile(norm, backend=backend, fullgraph=True)
    x = torch.randn(3, 17, 64, requires_grad=True)
    out = compiled(x)
    assert len(graphs) == 1 and any("gate_up_fwd" in str(n.target) for n in graphs[0].graph.nodes)
    want = GatedNorm(64, rank=16)
    want.load_state_dict(norm.state_dict())
    xr = x.detach().clone().requires_grad_()
    ref = want(xr)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    out.square().sum().backward()
    ref.square().sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(norm.gate_up.weight.grad, want.gate_up.weight.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_bf16_c768():
    """bf16 at the 125m recipe's shape, against fp32 math on the same rounded inputs; the module under autocast
    and torch.compile against its torch path."""
    y, h, w = _inputs(4 * 2048, 768, 16, torch.bfloat16, "cuda")
    out = gate_up(y, h, w, 1.0)
    yr, hr, wr = (t.detach().float().requires_grad_() for t in (y, h, w))
    ref = gate_up_reference(yr, hr, wr, 1.0)
    assert ((out.float() - ref).abs() / (ref.abs() + 1.0)).max() < 1e-2
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (y, h, w), dout)
    refs = torch.autograd.grad(ref, (yr, hr, wr), dout.float())
    for name, got, want in zip(("y", "h", "w_up"), grads, refs):
        cos = torch.nn.functional.cosine_similarity(got.float().flatten(), want.flatten(), dim=0)
        assert cos > 0.9999, f"d{name}: cos {cos:.6f}"
    torch._dynamo.reset()
    tg = GatedNorm(768, rank=16, kernel="triton_gate").cuda()
    plain = GatedNorm(768, rank=16).cuda()
    plain.load_state_dict(tg.state_dict())
    x = torch.randn(2, 512, 768, device="cuda") * 2
    compiled = torch.compile(tg, fullgraph=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a, b = compiled(x), plain(x)
    assert a.dtype == torch.bfloat16
    torch.testing.assert_close(a.float(), b.float(), atol=3e-2, rtol=2e-2)
    a.float().square().sum().backward()
    b.float().square().sum().backward()
    for (name, p), q in zip(tg.named_parameters(), plain.parameters()):
        cos = torch.nn.functional.cosine_similarity(p.grad.flatten(), q.grad.flatten(), dim=0)
        assert cos > 0.999, f"{name}: cos {cos:.5f}"
