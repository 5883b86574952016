"""The 8-bit attention kernels (sage8, sage8-infer) under the Triton interpreter against the fake-quant
reference (same quantization, same key blocks: they agree up to fp32 summation order), the custom ops
(opcheck) and the attention-registry backends. Kept tiny: the interpreter is slow."""
import numpy as np
import pytest
import torch

import sinkfree_kernels.sage8_ops  # noqa: F401  (registers the sinkfree::sage8_* ops)
from kernel_checks import rel_err
from sinkfree.attention import AttentionSpec, attend, get_backend
from sinkfree_kernels import attention_reference, random_lists
from sinkfree_kernels.quant_reference import sage8_attention_reference, sage8_block_sparse_reference
from sinkfree_kernels.sage8_ops import (sage8_attention, sage8_attention_quantized, sage8_block_sparse_attention,
                                        sage8_quantize)

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array:DeprecationWarning")
OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
TOL = 2e-3  # kernel vs fake-quant: fp32 summation order (and fp16 output rounding)


def _inputs(b, hq, hkv, sq, sk, d, dtype, seed, sink=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, sq, d, generator=g)
    k = torch.randn(b, hkv, sk, d, generator=g) + 2.0 * torch.randn(d, generator=g)  # a common K offset
    v = torch.randn(b, hkv, sk, d, generator=g)
    ins = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    s = (torch.randn(hq, generator=g) * 2).requires_grad_() if sink else None
    return ins, s


def _check(fn, ref_fn, ins, sink, dlse_weight=0.5):
    out, lse = fn(*ins, sink)
    ref_out, ref_lse = ref_fn(*ins, sink)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref_out) < TOL, rel_err(out, ref_out)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    fin = torch.isfinite(ref_lse)
    assert (lse[fin] - ref_lse[fin]).abs().max() < 1e-3
    g = torch.Generator().manual_seed(1)
    dout = torch.randn(out.shape, generator=g)
    dl = torch.randn(lse.shape, generator=g) * dlse_weight
    wrt = [*ins] + ([sink] if sink is not None else [])

    def loss(o, l_):
        return (o.float() * dout).sum() + (torch.where(fin, l_, 0.0) * dl).sum()

    grads = torch.autograd.grad(loss(out, lse), wrt)
    ref_grads = torch.autograd.grad(loss(ref_out, ref_lse), wrt)
    for name, a, r in zip("qkvs", grads, ref_grads):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, r) < TOL, f"d{name}: {rel_err(a, r):.2e}"


@pytest.mark.parametrize("dtype,causal,hq,hkv,sq,sk,smooth", [
    (torch.float32, True, 2, 1, 100, 100, True),
    (torch.float16, False, 2, 2, 70, 130, True),
    (torch.float32, True, 2, 1, 130, 70, False),  # Sq > Sk: rows with no key; no smoothing
])
def test_dense_matches_fake_quant(dtype, causal, hq, hkv, sq, sk, smooth):
    ins, sink = _inputs(1, hq, hkv, sq, sk, 64, dtype, seed=sq + sk)
    _check(lambda q, k, v, s: sage8_attention(q, k, v, s, causal, smooth_k=smooth),
           lambda q, k, v, s: sage8_attention_reference(q, k, v, s, causal, smooth_k=smooth), ins, sink)


@pytest.mark.parametrize("tile,causal,v_split", [(64, True, True), (128, False, False)])
def test_block_sparse_matches_fake_quant(tile, causal, v_split):
    s = 150
    ins, sink = _inputs(1, 2, 1, s, s, 64, torch.float32, seed=tile)
    idx, cnt = random_lists(1, 2, s, s, tile, tile, 0.5, generator=torch.Generator().manual_seed(2),
                            causal=causal)
    klen = None if tile == 64 else torch.tensor([100, 22], dtype=torch.int32)  # padded key tiles
    _check(lambda q, k, v, sk: sage8_block_sparse_attention(q, k, v, idx, cnt, sk, causal, tile_q=tile,
                                                            tile_k=tile, kv_tile_len=klen, v_split=v_split),
           lambda q, k, v, sk: sage8_block_sparse_reference(q, k, v, idx, cnt, sk, causal, tile_q=tile,
                                                            tile_k=tile, kv_tile_len=klen, v_split=v_split),
           ins, sink)


def test_head_dim_128_forward():
    ins, sink = _inputs(1, 1, 1, 64, 64, 128, torch.float16, seed=5)
    with torch.no_grad():
        out, lse = sage8_attention(*ins, sink, causal=True, infer=True, v_split=True)
        ref, ref_lse = sage8_attention_reference(*ins, sink, causal=True, v_split=True)
    assert rel_err(out, ref) < TOL and (lse - ref_lse).abs().max() < 1e-3


def test_infer_and_kernel_only_match_trainable_forward():
    ins, sink = _inputs(1, 2, 1, 80, 80, 64, torch.float16, seed=7)
    idx, cnt = random_lists(1, 2, 80, 80, 64, 64, 0.5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        train = sage8_block_sparse_attention(*ins, idx, cnt, sink)
        infer = sage8_block_sparse_attention(*ins, idx, cnt, sink, infer=True)
        kernel_only = sage8_attention_quantized(sage8_quantize(*ins), sink, q2k_idx=idx, q2k_cnt=cnt)
    for a in (infer, kernel_only):
        assert torch.equal(a[0], train[0]) and torch.equal(a[1], train[1])
    with pytest.raises(RuntimeError, match="forward-only"):
        sage8_attention(*ins, sink, infer=True)


def test_opcheck():
    ins, sink = _inputs(1, 2, 1, 40, 40, 64, torch.float32, seed=3)
    torch.library.opcheck(torch.ops.sinkfree.sage8_fwd.default,
                          (*ins, None, None, None, sink, True, 0.125, 64, 64, True, False), test_utils=OPCHECK_TESTS)
    idx, cnt = random_lists(1, 2, 40, 40, 64, 64, 1.0)
    torch.library.opcheck(torch.ops.sinkfree.sage8_fwd.default,
                          (*ins, idx, cnt, None, None, False, 0.125, 64, 64, False, True), test_utils=OPCHECK_TESTS)
    plain = [t.detach() for t in ins]
    torch.library.opcheck(torch.ops.sinkfree.sage8_infer_fwd.default,
                          (*plain, None, None, None, sink.detach(), False, 0.125, 64, 64, True, False),
                          test_utils=("test_schema", "test_faketensor"))


def test_backends(monkeypatch):
    ins, sink = _inputs(1, 2, 1, 64, 64, 64, torch.float32, seed=11)
    q, k, v = (t.detach() for t in ins)
    sink = sink.detach()
    ref = sage8_attention_reference(q, k, v, sink, causal=True)[0]
    assert rel_err(attend(q, k, v, AttentionSpec(backend="sage8"), sink), ref) < TOL
    assert rel_err(attend(q, k, v, AttentionSpec(backend="sage8-infer"), sink), ref) < TOL
    assert get_backend("sage8-infer").supports_sink
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors, no interpreter: the fake-quant reference
    assert rel_err(attend(q, k, v, AttentionSpec(backend="sage8"), sink), ref) < 1e-6
    spec = AttentionSpec(backend="sage8", topk_keep=0.5)
    idx, cnt = random_lists(1, 2, 64, 64, 64, 64, 1.0)
    out = get_backend("sage8").fn(q, k, v, spec, sink, tiles=(idx, cnt))
    assert rel_err(out, ref) < 1e-6


def test_vsplit_backends(monkeypatch):
    """`sage8-vsplit` / `sage8-infer-vsplit` run the two-term V (kernel and reference path), which is closer to
    exact attention than plain sage8 on random V."""
    ins, sink = _inputs(1, 2, 1, 64, 64, 64, torch.float32, seed=12)
    q, k, v = (t.detach() for t in ins)
    sink = sink.detach()
    exact = attention_reference(q, k, v, sink, True)[0]
    ref = sage8_attention_reference(q, k, v, sink, causal=True, v_split=True)[0]
    plain = attend(q, k, v, AttentionSpec(backend="sage8"), sink)
    for name in ("sage8-vsplit", "sage8-infer-vsplit"):
        out = attend(q, k, v, AttentionSpec(backend=name), sink)
        assert rel_err(out, ref) < TOL, name
        assert rel_err(out, exact) < 0.8 * rel_err(plain, exact), name
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors, no interpreter: the fake-quant reference
    assert rel_err(attend(q, k, v, AttentionSpec(backend="sage8-vsplit"), sink), ref) < 1e-6


def test_bad_input():
    q = torch.randn(1, 2, 64, 80)
    with pytest.raises(ValueError, match="head dim 80"):
        sage8_attention(q, q, q)


def test_llm_per_layer_fallback(monkeypatch):
    from sinkfree.models.llm import LLM, LLMConfig

    cfg = LLMConfig.from_name("tiny", n_head=2, n_kv_head=1, attn_backend="sage8", attn_sink="learnable",
                              qk_norm=True, attn_fallback_layers=[0, -1])
    model = LLM(cfg)
    assert [b.attn.spec.backend for b in model.layers] == ["flash", "sage8", "sage8", "flash"]
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU: the fake-quant reference, differentiable
    idx = torch.randint(0, cfg.vocab_size, (2, 24))
    model(idx).float().logsumexp(-1).mean().backward()
    assert all(torch.isfinite(b.attn.sink.grad).all() for b in model.layers)
    with pytest.raises(ValueError, match="attn_fallback_layers"):
        LLMConfig.from_name("tiny", attn_backend="sage8", attn_fallback_layers=[4])


def test_bench_providers_run():
    """The `sinkfree bench attention` sage8 rows build and run (tiny, interpreter); timing needs a GPU."""
    from sinkfree.bench.attention import FWD_ONLY, _sage8_cands

    ins, sink = _inputs(1, 1, 1, 64, 64, 64, torch.float16, seed=2)
    idx, cnt = random_lists(1, 1, 64, 64, 64, 64, 1.0)
    for cands in (_sage8_cands(*ins, sink, True), _sage8_cands(*ins, sink, False, idx, cnt, 64)):
        assert len(cands) == 7
        with torch.no_grad():
            outs = {name: fn() for name, fn in cands.items()}
        ref = outs[next(n for n in outs if n.endswith("+sink") and "infer" not in n)]
        assert torch.equal(outs[next(n for n in outs if n.endswith("kernel-only"))], ref)
        assert sum(any(t in n for t in FWD_ONLY) for n in cands) == 4


def _gpu_fdiv(self, lhs, rhs):
    """fp32 `/` as a reciprocal then a product (two roundings, within 1.5 ulp): a model of what Triton emits
    on NVIDIA GPUs for `/` on fp32 (PTX div.full.f32, up to 2 ulp off), where the interpreter divides exactly.
    Other dtypes divide exactly. `tl.math.div_rn` (create_precise_divf) is left exact, as on the GPU."""
    def op(a, b):
        if a.dtype == np.float32 and b.dtype == np.float32:
            return (np.float32(1.0) / b).astype(np.float32) * a
        return np.divide(a, b)
    return self.binary_op(lhs, rhs, op)


@pytest.mark.parametrize("smooth", [False, True])
def test_half_inputs_k_offset_lse_with_gpu_division(monkeypatch, smooth):
    """Regression (GPU: LSE 0.04-0.09 off in fp16/bf16 with a K offset, fine in fp32). Half-precision inputs
    put x * 127 / absmax exactly on a rounding tie far more often than fp32 ones (x = absmax / 2 gives 63.5),
    so an inexact 127 / absmax (fp32 `/` on the GPU) moves a Q element by one INT8 step: with an unsmoothed
    K offset o that shifts every logit of the row by ~ scale * q_scale * o, i.e. the LSE by ~2e-2, while the
    output barely moves. The quantization must divide as IEEE (div_rn), like the fake-quant reference. Each Q
    row here gets such a tie; `/` is made GPU-like (approximate) for the run."""
    from triton.runtime.interpreter import InterpreterBuilder

    monkeypatch.setattr(InterpreterBuilder, "create_fdiv", _gpu_fdiv)
    g = torch.Generator().manual_seed(21)
    b, h, s, d = 1, 2, 96, 64
    q = torch.randn(b, h, s, d, generator=g).half()
    q[..., 0] = (q[..., 1:].abs().amax(-1) * 0.5).half()  # exactly absmax / 2 (a power-of-two scaling)
    k = (torch.randn(b, h, s, d, generator=g) + 8.0).half()  # the same offset on every channel
    v = torch.randn(b, h, s, d, generator=g).half()
    ins = [t.requires_grad_() for t in (q, k, v)]
    out, lse = sage8_attention(*ins, smooth_k=smooth)
    ref_out, ref_lse = sage8_attention_reference(*ins, smooth_k=smooth)
    err = (lse - ref_lse).abs().max().item()
    assert err < 2e-3, f"lse max abs err {err:.3e}"
    assert rel_err(out, ref_out) < TOL
    # the backward recomputes P = exp2(S2 - (LSE - c) log2e) from the same quantization: gradients agree too
    g = torch.Generator().manual_seed(1)
    dout, dl = torch.randn(out.shape, generator=g), torch.randn(lse.shape, generator=g) * 0.5
    grads = torch.autograd.grad((out.float() * dout).sum() + (lse * dl).sum(), ins)
    ref_grads = torch.autograd.grad((ref_out.float() * dout).sum() + (ref_lse * dl).sum(), ins)
    for name, a, r in zip("qkv", grads, ref_grads):
        assert rel_err(a, r) < TOL, f"d{name}: {rel_err(a, r):.2e}"
