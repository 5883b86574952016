"""Dense Triton flash attention vs the fp32 reference (CPU: interpreter with fp16/fp32, small shapes)."""
import pytest
import torch

from kernel_checks import compare, make_qkv, rel_err
from sinkfree_kernels import attention_reference, flash_attention

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array:DeprecationWarning")

TOL = {torch.float32: 1e-4, torch.float16: 1e-2}  # fp32: summation order over outlier keys gives ~3e-5


def _dense(causal):
    def fn(q, k, v, sink=None):
        return flash_attention(q, k, v, sink, causal)

    def ref(q, k, v, sink=None):
        return attention_reference(q, k, v, sink, causal)

    return fn, ref


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("b,hq,hkv,sq,sk,d,dtype", [
    (2, 4, 2, 100, 100, 64, torch.float32),   # GQA, S not a multiple of the block
    (1, 2, 2, 70, 150, 64, torch.float32),    # Sq < Sk (causal: bottom-right)
    (2, 2, 1, 130, 67, 64, torch.float16),    # Sq > Sk: some causal rows see no key
    (1, 2, 1, 64, 128, 128, torch.float16),   # D = 128, exact multiples
])
def test_dense_with_sink(causal, b, hq, hkv, sq, sk, d, dtype):
    q, k, v = make_qkv(b, hq, hkv, sq, sk, d, dtype)
    sink = torch.randn(hq).requires_grad_()
    fn, ref = _dense(causal)
    compare(fn, ref, [q, k, v, sink], TOL[dtype])


@pytest.mark.parametrize("causal", [False, True])
def test_dense_without_sink_and_lse_grad(causal):
    q, k, v = make_qkv(2, 2, 2, 90, 90, 64, torch.float32)
    fn, ref = _dense(causal)
    compare(fn, ref, [q, k, v], TOL[torch.float32], dlse_weight=0.5)


@pytest.mark.parametrize("causal", [False, True])
def test_atomic_dq_mode(causal):
    q, k, v = make_qkv(1, 4, 2, 100, 120, 64, torch.float32)

    def fn(q, k, v, sink):
        return flash_attention(q, k, v, sink, causal, deterministic=False)

    compare(fn, _dense(causal)[1], [q, k, v, torch.randn(4).requires_grad_()], TOL[torch.float32])


def test_sink_minus_inf_is_plain_attention():
    q, k, v = make_qkv(1, 2, 1, 80, 80, 64, torch.float32)
    sink = torch.full((2,), float("-inf"), requires_grad=True)
    out, lse = flash_attention(q, k, v, sink, causal=True)
    plain, plain_lse = flash_attention(q, k, v, None, causal=True)
    assert rel_err(out, plain) < 1e-6 and torch.allclose(lse, plain_lse)
    out.sum().backward()
    assert sink.grad is not None and torch.all(sink.grad == 0)


def test_sink_mass_matches_lse():
    # p_sink = exp(s - LSE): the sink takes what the keys do not
    q, k, v = make_qkv(1, 2, 2, 64, 64, 64, torch.float32, outliers=False)
    sink = torch.tensor([0.0, 3.0])
    _, lse = flash_attention(q, k, v, sink)
    _, lse_plain = flash_attention(q, k, v)
    expect = torch.logaddexp(lse_plain, sink.view(1, 2, 1))
    assert torch.allclose(lse, expect, atol=1e-5)


def test_rows_without_keys_are_zero():
    q, k, v = make_qkv(1, 1, 1, 100, 30, 64, torch.float32)
    out, lse = flash_attention(q, k, v, causal=True)  # rows i < 70 see no key
    assert torch.all(out[:, :, :70] == 0) and torch.all(torch.isneginf(lse[:, :, :70]))
    assert torch.isfinite(lse[:, :, 70:]).all()


def test_deterministic_backward():
    q, k, v = make_qkv(1, 4, 2, 100, 100, 64, torch.float32)
    sink = torch.randn(4).requires_grad_()
    dout = torch.randn(1, 4, 100, 64)
    grads = []
    for _ in range(2):
        out, _ = flash_attention(q, k, v, sink, causal=True)
        grads.append(torch.autograd.grad((out * dout).sum(), (q, k, v, sink)))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize("bad,match", [
    (dict(d=80), "head dim 80"),
    (dict(hkv=3), "multiple of kv heads"),
])
def test_bad_inputs(bad, match):
    shape = dict(b=1, hq=4, hkv=2, sq=16, sk=16, d=64) | bad
    q = torch.randn(shape["b"], shape["hq"], shape["sq"], shape["d"])
    k = torch.randn(shape["b"], shape["hkv"], shape["sk"], shape["d"])
    with pytest.raises(ValueError, match=match):
        flash_attention(q, k, k)


def test_bad_sink_and_dtype():
    q = torch.randn(1, 2, 16, 64)
    with pytest.raises(ValueError, match="sink must have shape"):
        flash_attention(q, q, q, torch.zeros(3))
    with pytest.raises(ValueError, match="share one of"):
        flash_attention(q, q.half(), q)


# ---- opt-in tensor-descriptor (TMA) forward: SINKFREE_ATTN_TMA=1, configs forced (the interpreter runs one) ----

def _tma_config(warp_spec=False):
    import triton

    from sinkfree_kernels.attention_fwd import tma_block_shapes
    return triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "USE_TMA": True, "WARP_SPEC": warp_spec}, num_warps=4,
                         num_stages=2, pre_hook=tma_block_shapes)


@pytest.fixture
def tma_on(monkeypatch):
    monkeypatch.setenv("SINKFREE_ATTN_TMA", "1")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("b,hq,hkv,sq,sk,d,warp_spec", [
    (2, 4, 2, 100, 130, 64, False),   # GQA, odd S: the last key block is zero-filled past Sk, then masked
    (1, 2, 1, 130, 67, 64, True),     # Sq > Sk (causal: rows without keys), warp-specialized loops
    (1, 2, 2, 64, 128, 128, False),   # D = 128, exact multiples (EVEN_M / EVEN_N)
    (2, 2, 1, 100, 100, 128, True),   # D = 128, GQA, odd S, one warp-specialized loop masked throughout
])
def test_dense_tma_forced(tma_on, causal, b, hq, hkv, sq, sk, d, warp_spec):
    from kernel_checks import forced_configs
    from sinkfree_kernels import attention_fwd, ops

    q, k, v = make_qkv(b, hq, hkv, sq, sk, d, torch.float16, seed=sq + sk)
    assert ops._tma_descs(q, k, v) is not None
    sink = torch.randn(hq).requires_grad_()
    fn, ref = _dense(causal)
    with forced_configs([(attention_fwd._attn_fwd, _tma_config(warp_spec))]):
        compare(fn, ref, [q, k, v, sink], TOL[torch.float16])


def test_dense_tma_reads_nothing_past_s(tma_on):
    # k, v are views of longer NaN-padded buffers: TMA must zero-fill past Sk per head (a NaN in V would leak
    # through p = 0), and the LSE must not count the zero keys (they are masked to -inf)
    from kernel_checks import forced_configs
    from sinkfree_kernels import attention_fwd

    q, k, v = make_qkv(1, 2, 1, 70, 90, 64, torch.float16, seed=3)
    pad_k = torch.full((1, 1, 128, 64), float("nan"), dtype=torch.float16)
    pad_v = pad_k.clone()
    pad_k[:, :, :90], pad_v[:, :, :90] = k.detach(), v.detach()
    kp, vp = pad_k[:, :, :90], pad_v[:, :, :90]
    sink = torch.randn(2)
    with forced_configs([(attention_fwd._attn_fwd, _tma_config())]):
        out, lse = flash_attention(q.detach(), kp, vp, sink)
    ref, ref_lse = attention_reference(q.detach().float(), k.detach().float(), v.detach().float(), sink)
    assert torch.isfinite(out).all() and rel_err(out, ref) < TOL[torch.float16]
    assert (lse - ref_lse).abs().max() < 1e-2


def test_dense_tma_fallbacks(tma_on, monkeypatch):
    # descriptors only for 16-bit, 16-byte-aligned tensors and dense launches; otherwise the pointer configs
    from sinkfree_kernels import ops
    from sinkfree_kernels._tuning import prune_configs
    from sinkfree_kernels.attention_fwd import FWD_POINTER_CONFIGS

    q, k, v = make_qkv(1, 2, 2, 64, 64, 64, torch.float16)
    assert ops._tma_descs(q, k, v) is not None
    assert ops._tma_descs(q.float(), k.float(), v.float()) is None
    odd = torch.randn(1, 2, 64, 72, dtype=torch.float16)[..., 4:68]  # base 8 bytes off a 16-byte boundary
    assert odd.stride(-1) == 1 and ops._tma_descs(odd, k, v) is None
    monkeypatch.setenv("SINKFREE_ATTN_TMA", "0")
    assert ops._tma_descs(q, k, v) is None
    configs = FWD_POINTER_CONFIGS + [_tma_config()]
    n_ptr = len(FWD_POINTER_CONFIGS)
    smem = 232448
    assert len(prune_configs(configs, "fwd", 64, False, 64, 64, 2, smem)) == n_ptr  # no descriptors
    assert len(prune_configs(configs, "fwd", 64, False, 64, 64, 2, smem, has_desc=True)) == n_ptr + 1
    assert len(prune_configs(configs, "fwd", 64, True, 64, 64, 2, smem, has_desc=True)) <= n_ptr  # sparse
    only = prune_configs(configs, "fwd", 64, False, 64, 64, 2, smem, has_desc=True, tma_only=True)
    assert [c.kwargs.get("USE_TMA") for c in only] == [True]


def test_dense_tma_config_without_descriptors_is_refused(monkeypatch):
    # a USE_TMA config on a launch without descriptors (SINKFREE_ATTN_TMA off) fails at compile time instead of
    # silently reading through the wrong arguments; the pruning never lets this happen in the autotuner
    from kernel_checks import forced_configs
    from sinkfree_kernels import attention_fwd

    monkeypatch.setenv("SINKFREE_ATTN_TMA", "0")
    q, k, v = make_qkv(1, 1, 1, 64, 64, 64, torch.float16)
    with forced_configs([(attention_fwd._attn_fwd, _tma_config())]), pytest.raises(Exception):
        flash_attention(q.detach(), k.detach(), v.detach())


# ---- the backward's descriptor path (dK/dV and dQ kernels): TMA configs forced, pointer forward ----

def _bwd_tma(warp_spec=False):
    from sinkfree_kernels import attention_bwd
    return [(attention_bwd._attn_bwd_dkdv, _tma_config(warp_spec)), (attention_bwd._attn_bwd_dq, _tma_config(warp_spec))]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("b,hq,hkv,sq,sk,d,warp_spec", [
    (2, 4, 2, 100, 130, 64, False),   # GQA (each dK/dV program walks 2 query heads), odd Sq and Sk
    (1, 2, 1, 130, 67, 64, True),     # Sq > Sk (causal: rows without keys), one WS loop over (head, query block)
    (1, 2, 2, 64, 128, 128, False),   # D = 128, exact multiples (EVEN_M / EVEN_N)
    (2, 2, 1, 100, 70, 128, True),    # D = 128, GQA, odd S, warp-specialized loops masked throughout
])
def test_dense_tma_backward_forced(tma_on, causal, b, hq, hkv, sq, sk, d, warp_spec):
    from kernel_checks import forced_configs
    from sinkfree_kernels import ops

    q, k, v = make_qkv(b, hq, hkv, sq, sk, d, torch.float16, seed=3 * sq + sk)
    assert ops._tma_descs(q, k, v, torch.empty_like(q)) is not None
    sink = torch.randn(hq).requires_grad_()
    fn, ref = _dense(causal)
    with forced_configs(_bwd_tma(warp_spec)):
        compare(fn, ref, [q, k, v, sink], TOL[torch.float16], dlse_weight=0.5)


def test_dense_tma_backward_atomic_dq(tma_on):
    # the non-deterministic mode adds dQ by atomics inside the TMA dK/dV kernel
    from kernel_checks import forced_configs

    q, k, v = make_qkv(1, 4, 2, 100, 90, 64, torch.float16, seed=5)

    def fn(q, k, v, sink):
        return flash_attention(q, k, v, sink, True, deterministic=False)

    with forced_configs(_bwd_tma()):
        compare(fn, _dense(True)[1], [q, k, v, torch.randn(4).requires_grad_()], TOL[torch.float16])


@pytest.mark.parametrize("causal", [False, True])
def test_dense_tma_backward_reads_nothing_past_s(tma_on, causal):
    # q, dO (past Sq) and k, v (past Sk) are views of longer NaN-padded buffers; every kernel forced to its TMA
    # config: the descriptors cover only S, so the zero fill (not the NaN) reaches the blocks' last rows
    from kernel_checks import forced_configs
    from sinkfree_kernels import attention_fwd, ops

    b, hq, hkv, sq, sk, d = 1, 2, 1, 70, 90, 64
    q, k, v = make_qkv(b, hq, hkv, sq, sk, d, torch.float16, seed=11)
    dout = torch.randn(b, hq, sq, d).half()
    sink = torch.randn(hq)

    def padded(x):
        buf = torch.full((*x.shape[:2], 128, d), float("nan"), dtype=x.dtype)
        buf[:, :, :x.shape[2]] = x.detach()
        return buf[:, :, :x.shape[2]]

    qp, kp, vp, dop = padded(q), padded(k), padded(v), padded(dout)
    scale = d ** -0.5
    with forced_configs([(attention_fwd._attn_fwd, _tma_config())] + _bwd_tma()):
        assert ops._tma_descs(qp, kp, vp, dop) is not None
        out, lse = flash_attention(qp, kp, vp, sink, causal)
        dq, dk, dv, dsink = ops._backward(dop, None, qp, kp, vp, out, lse, sink, causal, scale, True)
    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v, sink)]
    ref_out, _ = attention_reference(*ref_in, causal)
    ref_grads = torch.autograd.grad((ref_out * dout.float()).sum(), ref_in)
    for name, g, rg in zip(("dq", "dk", "dv", "dsink"), (dq, dk, dv, dsink), ref_grads):
        assert torch.isfinite(g).all() and rel_err(g, rg) < TOL[torch.float16], (name, rel_err(g, rg))


def test_dense_tma_backward_fallbacks():
    # the backward kernels keep their TMA configs only for dense launches with descriptors, like the forward
    from sinkfree_kernels._tuning import prune_configs
    from sinkfree_kernels.attention_bwd import DKDV_POINTER_CONFIGS, DQ_POINTER_CONFIGS

    smem = 232448
    for kernel, pointer in (("dkdv", DKDV_POINTER_CONFIGS), ("dq", DQ_POINTER_CONFIGS)):
        configs, n_ptr = pointer + [_tma_config()], len(pointer)
        assert len(prune_configs(configs, kernel, 64, False, 64, 64, 2, smem)) == n_ptr
        assert len(prune_configs(configs, kernel, 64, False, 64, 64, 2, smem, has_desc=True)) == n_ptr + 1
        assert len(prune_configs(configs, kernel, 64, True, 64, 64, 2, smem, has_desc=True)) <= n_ptr
        only = prune_configs(configs, kernel, 64, False, 64, 64, 2, smem, has_desc=True, tma_only=True)
        assert [c.kwargs.get("USE_TMA") for c in only] == [True]
