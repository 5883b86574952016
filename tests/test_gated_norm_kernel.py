"""Fused GatedNorm op (sinkfree_kernels.gated_norm) against the PyTorch reference: forward and the gradients
in x, weight, w_down and w_up; runs under the Triton interpreter on CPU (fp32/fp16 only). Widths cover one
masked chunk (64, 96), chunks not dividing C (200) and C > 1024 (1100); odd row counts leave partial 64-row
blocks."""
import pytest
import torch

from sinkfree.nn.norms import GatedNorm
from sinkfree_kernels.gated_norm import gated_norm, gated_norm_reference

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array:DeprecationWarning")
OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _params(c, r, identity, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    w = 1.0 + 0.2 * torch.randn(c, generator=g)
    wd = torch.randn(r, c, generator=g) / c ** 0.5
    wu = torch.zeros(c, r) if identity else torch.randn(c, r, generator=g) / r ** 0.5
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in (w, wd, wu)]


def _input(shape, dtype, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x[..., 3] *= 40.0  # a residual-sink-like outlier channel
    x.view(-1, shape[-1])[::7, 5] = 100.0  # and outlier tokens
    return x.to(device=device, dtype=dtype).requires_grad_()


def _check(shape, r, identity, dtype, gate_scale, device="cpu"):
    c = shape[-1]
    x = _input(shape, dtype, device)
    w, wd, wu = _params(c, r, identity, dtype, device)
    out = gated_norm(x, w, wd, wu, 1e-5, gate_scale)
    # the oracle in fp32 from the same (rounded) inputs
    xr, wr, wdr, wur = (t.detach().float().requires_grad_() for t in (x, w, wd, wu))
    ref = gated_norm_reference(xr, wr, wdr, wur, 1e-5, gate_scale)
    assert out.dtype == dtype and out.shape == x.shape
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.float(), ref, **tol)
    dout = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(device=device, dtype=dtype)
    grads = torch.autograd.grad(out, (x, w, wd, wu), dout)
    refs = torch.autograd.grad(ref, (xr, wr, wdr, wur), dout.float())
    for name, got, want in zip(("x", "weight", "w_down", "w_up"), grads, refs):
        assert got.dtype == dtype, name
        scale = want.abs().max().clamp_min(1e-6)
        err = (got.float() - want).abs().max() / scale
        assert err < (1e-4 if dtype == torch.float32 else 2e-2), f"d{name}: rel err {err:.2e}"
    return out, ref


@pytest.mark.parametrize("shape,identity,dtype", [
    ((37, 64), True, torch.float32),
    ((2, 65, 96), False, torch.float32),
    ((130, 96), False, torch.float16),
    ((37, 64), False, torch.float16),
    ((2, 64, 128), False, torch.float16),  # whole 64-row blocks and chunks: the unmasked (EVEN) loads
    ((70, 200), False, torch.float32),  # C not a multiple of either chunk (fwd 64, bwd 32)
    ((5, 1100), False, torch.float32),  # C > 1024 (the v1 limit), several chunks, one partial row block
])
def test_fused_matches_reference(shape, identity, dtype):
    gate_scale = 2.0 if identity else 1.0
    out, _ = _check(shape, 16, identity, dtype, gate_scale)
    if identity:  # W_up = 0, gate_scale 2: exactly RMSNorm
        x = _input(shape, dtype)
        w = _params(shape[-1], 16, True)[0]
        xf = x.detach().float()
        rms = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5) * w.detach()
        torch.testing.assert_close(out.detach().float(), rms, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config", ["64,32,16,4,4,1,1", "64,16,32,4,4,2,2", "64,128,64,4,4,2,2,0,0"])
@pytest.mark.parametrize("shape,r,dtype", [((66, 200), 16, torch.float32), ((40, 96), 24, torch.float16)])
def test_small_chunks_and_rank(monkeypatch, config, shape, r, dtype):
    """Many masked column chunks (SINKFREE_GN_CONFIG) and a rank padded to 32."""
    monkeypatch.setenv("SINKFREE_GN_CONFIG", config)
    _check(shape, r, False, dtype, 1.0)


def test_zero_centered_weight_grad_flows_through_one_plus_w():
    x = _input((37, 64), torch.float32)
    w0, wd, wu = _params(64, 16, False)
    w0 = (w0.detach() - 1.0).requires_grad_()
    out = gated_norm(x, 1.0 + w0, wd, wu, 1e-5, 1.0)
    ref = gated_norm_reference(x, 1.0 + w0, wd, wu, 1e-5, 1.0)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g1 = torch.autograd.grad(out.square().sum(), w0)[0]
    g2 = torch.autograd.grad(ref.square().sum(), w0)[0]
    torch.testing.assert_close(g1, g2, atol=1e-4, rtol=1e-4)


def test_reference_matches_module():
    norm = GatedNorm(64, rank=16, zero_centered=True)
    with torch.no_grad():
        norm.weight.normal_(0, 0.1)
    x = torch.randn(3, 5, 64)
    ref = gated_norm_reference(x, norm.effective_weight(), norm.gate_down.weight, norm.gate_up.weight, norm.eps,
                               norm.gate_scale)
    torch.testing.assert_close(norm(x), ref)


def test_opcheck():
    x = _input((20, 64), torch.float32)
    w, wd, wu = _params(64, 16, False)
    torch.library.opcheck(torch.ops.sinkfree.gated_norm_fwd.default, (x, w, wd, wu, 1e-5, 1.0, torch.float32),
                          test_utils=OPCHECK_TESTS)


def test_rejects_bad_shapes():
    x = torch.randn(4, 64)
    w, wd, wu = _params(64, 16, False)
    with pytest.raises(ValueError, match="w_down"):
        gated_norm(x, w, wu, wu)
    with pytest.raises(ValueError, match="r <= 64"):
        gated_norm(x, w, torch.randn(65, 64), torch.randn(64, 65))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_bf16_c768():
    x = _input((4, 2048, 768), torch.bfloat16, "cuda")
    w, wd, wu = _params(768, 16, False, torch.bfloat16, "cuda")
    out = gated_norm(x, w, wd, wu, 1e-5, 1.0)
    xr, wr, wdr, wur = (t.detach().float().requires_grad_() for t in (x, w, wd, wu))
    ref = gated_norm_reference(xr, wr, wdr, wur, 1e-5, 1.0)
    err = (out.float() - ref).abs().max() / ref.abs().max()
    assert err < 2e-2
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, w, wd, wu), dout)
    refs = torch.autograd.grad(ref, (xr, wr, wdr, wur), dout.float())
    for name, got, want in zip(("x", "weight", "w_down", "w_up"), grads, refs):
        cos = torch.nn.functional.cosine_similarity(got.float().flatten(), want.flatten(), dim=0)
        assert cos > 0.999, f"d{name}: cos {cos:.5f}"
    # the module's CUDA path is the fused op (and matches its PyTorch path)
    norm = GatedNorm(768, rank=16).cuda()
    xm = torch.randn(2, 256, 768, device="cuda")
    was = GatedNorm.fused
    GatedNorm.fused = True
    try:
        fused = norm(xm)
        GatedNorm.fused = False
        plain = norm(xm)
    finally:
        GatedNorm.fused = was
    torch.testing.assert_close(fused, plain, atol=1e-4, rtol=1e-4)


def test_backward_op_matches_its_fake():
    """The backward op's real outputs have the fake's (contiguous) layout with fp32 master weights, as under
    autocast: a transposed dW_down view once broke torch.compile on the GPU ("stride 1==768")."""
    x = _input((20, 64), torch.float32)
    w, wd, wu = _params(64, 16, False)
    out, rstd, a = torch.ops.sinkfree.gated_norm_fwd(x, w, wd, wu, 1e-5, 1.0, torch.float32)
    args = (torch.randn_like(out), x, w, wd, wu, rstd, a, 1.0, torch.float32)
    for got, want in zip(torch.ops.sinkfree.gated_norm_bwd(*args), (x, w, wd, wu)):
        assert got.shape == want.shape and got.is_contiguous()
    torch.library.opcheck(torch.ops.sinkfree.gated_norm_bwd.default, args, test_utils=("test_schema", "test_faketensor"))
