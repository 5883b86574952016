"""The fake-quant sage8 reference (quantize -> dequantize -> fp32 math, the kernels' exact quantization)
against the fp32 reference: the algorithmic error of 8-bit attention, separate from kernel bugs. Pure
PyTorch, small shapes (the GPU session measures the issue's S = 4096/16384 figures)."""
import math

import pytest
import torch

from sinkfree_kernels import attention_reference, block_sparse_attention_reference, random_lists
from sinkfree_kernels.quant_reference import (quant_int8_blocks, round_half_away, sage8_attention_reference,
                                              sage8_block_sparse_reference, to_e4m3)


def cos(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    return (a @ b / (a.norm() * b.norm())).item()


def rel_l1(a, b):
    return ((a.double() - b.double()).abs().sum() / b.double().abs().sum()).item()


def _qkv(hq, hkv, s, d, seed, sink=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, hq, s, d, generator=g)
    k = torch.randn(1, hkv, s, d, generator=g)
    v = torch.randn(1, hkv, s, d, generator=g)
    return q, k, v, (torch.randn(hq, generator=g) * 2 if sink else None)


def _grads(fn, q, k, v, sink, dlse_weight=0.2, seed=0):
    ins = [t.clone().requires_grad_() for t in (q, k, v)] + ([sink.clone().requires_grad_()] if sink is not None
                                                             else [])
    out, lse = fn(*ins)
    g = torch.Generator().manual_seed(seed)
    dout = torch.randn(out.shape, generator=g)
    dl = torch.randn(lse.shape, generator=g) * dlse_weight
    fin = torch.isfinite(lse)
    loss = (out * dout).sum() + (torch.where(fin, lse, 0.0) * dl).sum()
    return out.detach(), lse.detach(), torch.autograd.grad(loss, ins)


@pytest.mark.parametrize("d,causal,with_sink", [(64, True, True), (64, False, False), (128, False, True),
                                                (128, True, False)])
def test_forward_and_grads_vs_fp32(d, causal, with_sink):
    q, k, v, sink = _qkv(2, 1, 192, d, seed=d + causal + 2 * with_sink, sink=with_sink)
    out, lse, grads = _grads(lambda *t: sage8_attention_reference(*t[:3], t[3] if with_sink else None, causal),
                             q, k, v, sink)
    ref, ref_lse, ref_grads = _grads(lambda *t: attention_reference(*t[:3], t[3] if with_sink else None, causal),
                                     q, k, v, sink)
    assert cos(out, ref) >= 0.999 and rel_l1(out, ref) <= 0.04  # FP8 P and V: ~0.9993 / 0.03 (see NOTES)
    assert (lse - ref_lse).abs().max() < 2e-2
    dq, dk, dv = (cos(a, b) for a, b in zip(grads[:3], ref_grads[:3]))
    assert dv >= 0.999 and dq >= 0.995 and dk >= 0.995, (dq, dk, dv)
    if with_sink:  # dsink sums p_sink * delta over rows: FP8 noise in O does not average out over 2 heads
        assert cos(grads[3], ref_grads[3]) >= 0.995


def test_block_sparse_vs_fp32():
    q, k, v, sink = _qkv(2, 1, 192, 64, seed=9)
    idx, cnt = random_lists(1, 2, 192, 192, 64, 64, 0.67, generator=torch.Generator().manual_seed(1), causal=True)
    out, _, grads = _grads(lambda *t: sage8_block_sparse_reference(t[0], t[1], t[2], idx, cnt, t[3], True),
                           q, k, v, sink)
    ref, _, ref_grads = _grads(lambda *t: block_sparse_attention_reference(t[0], t[1], t[2], idx, cnt, t[3], True),
                               q, k, v, sink)
    assert cos(out, ref) >= 0.999
    assert [cos(a, b) >= t for a, b, t in zip(grads, ref_grads, (0.995, 0.995, 0.999, 0.995))] == [True] * 4


@pytest.mark.parametrize("offset", [5.0, 10.0])
def test_outlier_key_channel_needs_smoothing(offset):
    """A K channel offset by 5-10 sigma (plus a common bias): smoothing removes it before INT8, and the sink's
    per-row correction keeps the softmax exact; without smoothing the channel eats the INT8 range."""
    q, k, v, sink = _qkv(2, 2, 192, 64, seed=int(offset))
    k[..., 3] += offset
    k = k + 1.0
    q[..., 3] *= 3.0  # the logits do depend on the offset channel
    ref, ref_lse = attention_reference(q, k, v, sink, True)
    smooth, lse = sage8_attention_reference(q, k, v, sink, True)
    raw_lse = sage8_attention_reference(q, k, v, sink, True, smooth_k=False)[1]
    assert cos(smooth, ref) >= 0.999
    # the logits' INT8 error shows in the LSE (the output's error is dominated by FP8 P V either way)
    assert (raw_lse - ref_lse).abs().mean() > 3 * (lse - ref_lse).abs().mean()


def test_large_q_and_gradients():
    q, k, v, sink = _qkv(2, 1, 128, 64, seed=4)
    q = q * 6.0  # peaked softmax
    out, _, grads = _grads(lambda *t: sage8_attention_reference(*t, causal=True), q, k, v, sink)
    ref, _, ref_grads = _grads(lambda *t: attention_reference(*t, causal=True), q, k, v, sink)
    assert cos(out, ref) >= 0.999
    assert cos(grads[2], ref_grads[2]) >= 0.999 and min(cos(a, b) for a, b in zip(grads[:2], ref_grads[:2])) >= 0.99


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_huge_logits_stay_finite(sign):
    """Logits up to +-1e4 (and |v| up to 1e4): no NaN or Inf in out, lse or any gradient."""
    q, k, v, sink = _qkv(2, 2, 96, 64, seed=5)
    q = q / q.norm(dim=-1, keepdim=True) * 100.0
    k = sign * k / k.norm(dim=-1, keepdim=True) * 1600.0  # |q.k| * scale up to ~1e4
    v[..., 0, :] *= 1e4
    out, lse, grads = _grads(lambda *t: sage8_attention_reference(*t, causal=True), q, k, v, sink)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert (q @ k.transpose(-1, -2)).abs().max() / math.sqrt(64) > 5e3
    assert all(torch.isfinite(g).all() for g in grads)
    ref = attention_reference(q, k, v, sink, True)[0]
    assert cos(out, ref) >= 0.99


def test_quantizers():
    x = torch.tensor([-2.5, -0.5, 0.0, 0.49, 0.5, 1.5, 126.6])
    assert torch.equal(round_half_away(x), torch.tensor([-3.0, -1.0, 0.0, 0.0, 1.0, 2.0, 127.0]))
    assert to_e4m3(torch.tensor([127.9, 500.0, -1e-4, 0.3])).tolist() == [128.0, 448.0, -0.0, 0.3125]
    a = torch.randn(1, 1, 130, 70)
    a[..., 5, :] = 0.0  # an all-zero row stays zero (no division by zero)
    deq = quant_int8_blocks(a, 64, -1)
    assert torch.isfinite(deq).all() and (deq[..., 5, :] == 0).all()
    assert ((deq - a).abs() <= a.abs().amax() / 254 + 1e-6).all()
    assert torch.allclose(quant_int8_blocks(a, 64, -2), quant_int8_blocks(a.transpose(-1, -2), 64, -1).mT)


def test_v_split_meets_the_issue_forward_target():
    """FP8 P and FP8 V each round to 3 mantissa bits: on N(0, 1) inputs the output's cosine sits near 0.9993
    (relL1 ~0.035) whatever the scales. V as two FP8 terms leaves P's rounding alone: cos >= 0.9995,
    relL1 <= 0.03 (the issue's forward target)."""
    q, k, v, sink = _qkv(2, 1, 192, 64, seed=21)
    ref = attention_reference(q, k, v, sink, True)[0]
    out = sage8_attention_reference(q, k, v, sink, True, v_split=True)[0]
    assert cos(out, ref) >= 0.9995 and rel_l1(out, ref) <= 0.03


def _int8_exact(shape, g):
    """Integers in [-127, 127] with 127 in every row: per-token INT8 reproduces them exactly."""
    x = torch.randint(-127, 128, shape, generator=g).float()
    x[..., 0] = 127.0
    return x


@pytest.mark.parametrize("logit_std,causal", [(1.0, True), (10.0, False)])
def test_dv_int8_beats_e4m3(logit_std, causal):
    """dV = P^T dO with INT8 P per key column within query blocks and INT8 dO per channel (issue 7's "dV in
    INT8"). Q and K are exact INT8 values (no smoothing), so P is exact to fp32 and dV's error is the dV product's
    own. INT8 gives cos ~0.99991 (logit std 1) / ~0.99997 (std 10, peaked P); the former e4m3(448 P) x e4m3(dO)
    gave ~0.9992-0.9995 on the same inputs, so this fails if dV goes back to e4m3."""
    g = torch.Generator().manual_seed(int(logit_std) + causal)
    s, d = 256, 64
    q, k = _int8_exact((1, 2, s, d), g), _int8_exact((1, 1, s, d), g)
    v, dout = torch.randn(1, 1, s, d, generator=g), torch.randn(1, 2, s, d, generator=g)
    scale = logit_std / (127.0 ** 2 / 3 * math.sqrt(d))  # q . k has std ~ 127^2 / 3 * sqrt(d)
    dvs = []
    for fn, dt in ((lambda *t: sage8_attention_reference(*t, causal=causal, scale=scale, smooth_k=False),
                    torch.float32),
                   (lambda *t: attention_reference(*t, causal=causal, scale=scale), torch.float64)):
        vv = v.to(dt).requires_grad_()
        out = fn(q.to(dt), k.to(dt), vv)[0]
        dvs.append(torch.autograd.grad((out * dout.to(dt)).sum(), vv)[0])
    assert cos(*dvs) > (0.9998 if logit_std == 1.0 else 0.9999), cos(*dvs)
