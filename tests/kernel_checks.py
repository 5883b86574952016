"""Shared helpers of the kernel tests: random inputs with outliers, error metrics, gradient comparison."""
import torch


def make_qkv(b, hq, hkv, sq, sk, d, dtype, device="cpu", outliers=True, seed=None):
    """Fresh random q, k, v (requires_grad) with a few large-magnitude keys when outliers."""
    g = torch.Generator(device="cpu")
    g.manual_seed(torch.randint(0, 2**31, ()).item() if seed is None else seed)
    q = torch.randn(b, hq, sq, d, generator=g)
    k = torch.randn(b, hkv, sk, d, generator=g)
    v = torch.randn(b, hkv, sk, d, generator=g)
    if outliers:
        cols = torch.randperm(sk, generator=g)[: max(1, sk // 50)]
        k[:, :, cols] *= 8.0
        v[:, :, cols[:1]] *= 20.0
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v)]


def rel_err(a, b):
    """||a - b|| / ||b|| in fp32 (0 when both vanish)."""
    a, b = a.float(), b.float()
    den = b.norm()
    return (a - b).norm().item() / den.item() if den > 0 else (a - b).norm().item()


def check_lse(lse, ref_lse, atol):
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), "rows with no key disagree"
    fin = torch.isfinite(ref_lse)
    if fin.any():
        assert (lse[fin] - ref_lse[fin]).abs().max().item() < atol


def compare(fn, ref_fn, inputs, tol, dlse_weight=0.0):
    """Run fn and ref_fn (both -> (out, lse)) on the same inputs; compare out, lse and all input grads."""
    out, lse = fn(*inputs)
    ref_inputs = [t.detach().float().requires_grad_() if t.is_floating_point() else t for t in inputs]
    ref_out, ref_lse = ref_fn(*ref_inputs)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref_out) < tol, rel_err(out, ref_out)
    check_lse(lse, ref_lse, atol=tol * 10)
    dout = torch.randn_like(ref_out)
    fin = torch.isfinite(ref_lse)
    loss = (out.float() * dout).sum() + dlse_weight * lse[fin].sum()
    ref_loss = (ref_out * dout).sum() + dlse_weight * ref_lse[fin].sum()
    want = [i for i, t in enumerate(inputs) if t.is_floating_point() and t.requires_grad]
    grads = torch.autograd.grad(loss, [inputs[i] for i in want])
    ref_grads = torch.autograd.grad(ref_loss, [ref_inputs[i] for i in want])
    for i, g, rg in zip(want, grads, ref_grads):
        assert torch.isfinite(g).all(), f"non-finite grad of input {i}"
        assert rel_err(g, rg) < tol, f"grad of input {i}: rel err {rel_err(g, rg):.2e}"
