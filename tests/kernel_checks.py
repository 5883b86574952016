"""Shared helpers of the kernel tests: random inputs with outliers, error metrics, gradient comparison."""
import contextlib
import os

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
        err = (lse[fin] - ref_lse[fin]).abs().max().item()
        assert err < atol, f"lse: max abs err {err:.3e} (atol {atol:.1e})"


def describe_err(name, a, b, tol):
    """One line for a failed comparison: which tensor, its relative error against the tolerance, the largest
    absolute error and where, and how many entries are not finite."""
    a, b = a.detach().float(), b.detach().float()
    diff = (a - b).abs()
    bad = int((~torch.isfinite(a)).sum().item())
    if diff.numel() and torch.isfinite(diff).any():
        flat = torch.where(torch.isfinite(diff), diff, torch.zeros_like(diff)).flatten()
        at = int(flat.argmax().item())
        where = tuple(int(i) for i in torch.unravel_index(torch.tensor(at), diff.shape)) if diff.dim() else ()
        worst = f"max abs err {flat[at].item():.3e} at {where} (got {a.flatten()[at].item():.4g}, " \
                f"want {b.flatten()[at].item():.4g})"
    else:
        worst = "no finite entries"
    return (f"{name}: rel err {rel_err(a, b):.3e} (tol {tol:.1e}), {worst}, {bad} non-finite of {a.numel()}, "
            f"shape {tuple(a.shape)}, ref norm {b.norm().item():.3e}")


def compare(fn, ref_fn, inputs, tol, dlse_weight=0.0, names=None):
    """Run fn and ref_fn (both -> (out, lse)) on the same inputs; compare out, lse and all input grads.
    names labels the inputs in failure messages (default: 'input i')."""
    names = list(names) if names is not None else [f"input {i}" for i in range(len(inputs))]
    out, lse = fn(*inputs)
    ref_inputs = [t.detach().float().requires_grad_() if t.is_floating_point() else t for t in inputs]
    ref_out, ref_lse = ref_fn(*ref_inputs)
    assert torch.isfinite(out).all(), describe_err("out", out, ref_out, tol)
    assert rel_err(out, ref_out) < tol, describe_err("out", out, ref_out, tol)
    check_lse(lse, ref_lse, atol=tol * 10)
    dout = torch.randn_like(ref_out)
    fin = torch.isfinite(ref_lse)
    loss = (out.float() * dout).sum() + dlse_weight * lse[fin].sum()
    ref_loss = (ref_out * dout).sum() + dlse_weight * ref_lse[fin].sum()
    want = [i for i, t in enumerate(inputs) if t.is_floating_point() and t.requires_grad]
    grads = torch.autograd.grad(loss, [inputs[i] for i in want])
    ref_grads = torch.autograd.grad(ref_loss, [ref_inputs[i] for i in want])
    errors = [describe_err(f"grad of {names[i]}", g, rg, tol) for i, g, rg in zip(want, grads, ref_grads)
              if not torch.isfinite(g).all() or rel_err(g, rg) >= tol]
    assert not errors, "\n".join(errors)


def autotuned_kernels():
    """The three autotuned Triton kernels by name (imports triton)."""
    from sinkfree_kernels import attention_bwd, attention_fwd

    return {"fwd": attention_fwd._attn_fwd, "dkdv": attention_bwd._attn_bwd_dkdv, "dq": attention_bwd._attn_bwd_dq}


@contextlib.contextmanager
def autotune_off():
    """SINKFREE_AUTOTUNE=0 (read at each tuning decision in sinkfree_kernels._tuning): every kernel runs the first
    config its pruning keeps, one compile per kernel and key; the previous value is restored afterwards."""
    old = os.environ.get("SINKFREE_AUTOTUNE")
    os.environ["SINKFREE_AUTOTUNE"] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("SINKFREE_AUTOTUNE", None)
        else:
            os.environ["SINKFREE_AUTOTUNE"] = old


@contextlib.contextmanager
def forced_configs(pairs):
    """Run autotuned kernels with exactly one config each ((kernel, triton.Config) pairs): a one-config
    autotuner neither prunes nor times. Restores the config lists and the tuning caches afterwards."""
    saved = [(kernel, kernel.configs, dict(kernel.cache)) for kernel, _ in pairs]
    for kernel, config in pairs:
        kernel.configs = [config]
        kernel.cache.clear()
    try:
        yield
    finally:
        for kernel, configs, cache in saved:
            kernel.configs = configs
            kernel.cache.clear()
            kernel.cache.update(cache)
