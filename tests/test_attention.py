"""sinkfree.attention: eager vs a naive fp64 reference, sdpa vs eager (outputs and grads), registry."""
import math

import pytest
import torch

from sinkfree.attention import (
    AttentionSpec,
    BackendInfo,
    attend,
    attend_with_probs,
    check_spec,
    get_backend,
    list_backends,
    register_backend,
    registry,
)


def naive(q, k, v, causal, sink=None, softmax="softmax", scale=None, clip=None):
    """Row-by-row fp64 attention written from the formulas in docs/contracts.md."""
    q, k, v = q.double(), k.double(), v.double()
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    scale = 1 / math.sqrt(d) if scale is None else scale
    out = torch.zeros(b, hq, sq, d, dtype=torch.float64)
    probs = torch.zeros(b, hq, sq, sk, dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            kh = h // (hq // hkv)
            for i in range(sq):
                n_vis = min(sk, i + (sk - sq) + 1) if causal else sk
                if n_vis <= 0:
                    continue
                z = (k[bi, kh, :n_vis] @ q[bi, h, i]) * scale
                if clip is not None:
                    z = z.clamp(-clip, clip)
                if softmax == "sigmoid":
                    p = 1 / (1 + torch.exp(-(z - math.log(n_vis))))
                else:
                    e = torch.exp(z - z.max())
                    denom = e.sum()
                    if sink is not None:
                        denom = denom + torch.exp(sink[h].double() - z.max())
                    p = e / denom
                probs[bi, h, i, :n_vis] = p
                out[bi, h, i] = p @ v[bi, kh, :n_vis]
    return out, probs


def rand_qkv(b, hq, hkv, sq, sk, d, dtype=torch.float32, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, sq, d, generator=g).to(dtype) * 1.5
    k = torch.randn(b, hkv, sk, d, generator=g).to(dtype) * 1.5
    v = torch.randn(b, hkv, sk, d, generator=g).to(dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


SHAPES = [(2, 6, 2, 37, 53, 16), (1, 4, 4, 29, 29, 8), (2, 4, 1, 11, 7, 8)]  # the last has empty causal rows


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("with_sink", [False, True])
def test_eager_matches_naive(shape, causal, with_sink):
    q, k, v = rand_qkv(*shape, seed=sum(shape))
    sink = torch.randn(shape[1]) if with_sink else None
    out, probs, sink_mass = attend_with_probs(q, k, v, AttentionSpec("eager", causal=causal), sink)
    ref_out, ref_probs = naive(q, k, v, causal, sink)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(probs.double(), ref_probs, atol=2e-6, rtol=1e-4)
    if with_sink:
        rows_seen = ref_probs.sum(-1) > 0
        total = probs.sum(-1) + sink_mass
        assert torch.allclose(total[rows_seen], torch.ones_like(total[rows_seen]), atol=1e-5)
        assert (sink_mass[rows_seen] > 0).all() and (sink_mass[rows_seen] < 1).all()
        assert (sink_mass[~rows_seen] == 1).all()  # a row with no visible key puts all mass on the sink
    else:
        assert sink_mass is None


@pytest.mark.parametrize("causal", [True, False])
def test_sigmoid_matches_naive(causal):
    q, k, v = rand_qkv(2, 6, 2, 37, 53, 16, seed=3)
    spec = AttentionSpec("eager", causal=causal, softmax="sigmoid")
    out, probs, sink_mass = attend_with_probs(q, k, v, spec)
    ref_out, ref_probs = naive(q, k, v, causal, softmax="sigmoid")
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(probs.double(), ref_probs, atol=2e-6, rtol=1e-4)
    assert sink_mass is None
    assert not torch.allclose(probs.sum(-1), torch.ones(()))  # really unnormalised


def test_logit_clip_matches_naive_and_changes_result():
    q, k, v = rand_qkv(1, 4, 2, 13, 17, 8, seed=5)
    q = q * 4  # logits well beyond the clip
    spec = AttentionSpec("eager", causal=True, logit_clip=1.0)
    out, probs, _ = attend_with_probs(q, k, v, spec)
    ref_out, _ = naive(q, k, v, True, clip=1.0)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=1e-4)
    unclipped, _ = naive(q, k, v, True)
    assert (ref_out - unclipped).abs().max() > 1e-2
    # with |z| <= 1 no probability in a row of n keys can exceed e^2 / (e^2 + n - 1)
    n = torch.arange(17 - 13 + 1, 18).float().view(1, 1, 13, 1)
    assert (probs <= math.e ** 2 / (math.e ** 2 + n - 1) + 1e-6).all()


@pytest.mark.parametrize("shape", [(2, 6, 2, 37, 53, 16), (1, 4, 4, 31, 31, 8), (2, 4, 2, 23, 9, 8)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("with_sink", [False, True])
def test_sdpa_matches_eager_outputs_and_grads(shape, causal, with_sink):
    grads = []
    for backend in ("eager", "sdpa"):
        q, k, v = rand_qkv(*shape, seed=7, requires_grad=True)
        sink = torch.linspace(-2, 2, shape[1]).requires_grad_(True) if with_sink else None
        out = attend(q, k, v, AttentionSpec(backend, causal=causal), sink)
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        (out * w).sum().backward()
        grads.append([out.detach(), q.grad, k.grad, v.grad] + ([sink.grad] if with_sink else []))
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4)
    if with_sink:
        assert grads[0][-1].abs().sum() > 0


def test_sdpa_bf16_close_to_fp32_reference():
    q, k, v = rand_qkv(2, 6, 2, 37, 53, 16, dtype=torch.bfloat16, seed=11)
    sink = torch.randn(6)
    out = attend(q, k, v, AttentionSpec("sdpa"), sink)
    ref, _ = naive(q, k, v, True, sink)
    assert out.dtype == torch.bfloat16
    rel = (out.double() - ref).norm() / ref.norm()
    assert rel < 2e-2


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_sink_minus_inf_is_plain_attention(backend):
    q, k, v = rand_qkv(2, 6, 2, 37, 53, 16, seed=13)
    spec = AttentionSpec(backend)
    plain = attend(q, k, v, spec)
    torch.testing.assert_close(attend(q, k, v, spec, torch.full((6,), float("-inf"))), plain)
    assert (attend(q, k, v, spec, torch.zeros(6)) - plain).abs().max() > 1e-3


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_off_by_one_is_softmax1(backend):
    # softmax1: p_j = e^{z_j} / (1 + sum_k e^{z_k}); check against the formula directly, non-causal.
    q, k, v = rand_qkv(1, 2, 2, 5, 9, 8, seed=17)
    out = attend(q, k, v, AttentionSpec(backend, causal=False), torch.zeros(2))
    e = torch.exp((q.double() @ k.double().transpose(-1, -2)) / math.sqrt(8))
    ref = (e / (1 + e.sum(-1, keepdim=True))) @ v.double()
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_explicit_scale():
    q, k, v = rand_qkv(1, 2, 1, 6, 6, 8, seed=19)
    for backend in ("eager", "sdpa"):
        out = attend(q, k, v, AttentionSpec(backend, scale=0.05))
        ref, _ = naive(q, k, v, True, scale=0.05)
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_registry_errors_name_the_option():
    assert {"eager", "sdpa"} <= set(list_backends())
    with pytest.raises(ValueError, match="attn_backend") as err:
        get_backend("nope")
    assert "sdpa" in str(err.value) and "eager" in str(err.value)
    with pytest.raises(ValueError, match="attn_softmax"):
        check_spec(AttentionSpec("sdpa", softmax="sigmoid"))
    with pytest.raises(ValueError, match="attn_softmax"):
        AttentionSpec("eager", softmax="relu")
    with pytest.raises(ValueError, match="attn_logit_clip"):
        check_spec(AttentionSpec("sdpa", logit_clip=5.0))
    with pytest.raises(ValueError, match="attn_sink"):
        check_spec(AttentionSpec("eager", softmax="sigmoid"), has_sink=True)
    check_spec(AttentionSpec("eager", softmax="sigmoid", logit_clip=5.0))  # all supported by eager


def test_register_custom_backend(monkeypatch):
    monkeypatch.setattr(registry, "_BACKENDS", dict(registry._BACKENDS))
    calls = []

    def fake(q, k, v, spec, sink):
        calls.append(spec.backend)
        return torch.zeros_like(q)

    info = register_backend(BackendInfo("fake", fake, supports_noncausal=False))
    assert get_backend("fake") is info and "fake" in list_backends()
    q, k, v = rand_qkv(1, 2, 1, 4, 4, 8)
    assert attend(q, k, v, AttentionSpec("fake")).abs().sum() == 0 and calls == ["fake"]
    with pytest.raises(ValueError, match="attn_sink.*fake.*eager"):
        attend(q, k, v, AttentionSpec("fake"), torch.zeros(2))
    with pytest.raises(ValueError, match="non-causal"):
        check_spec(AttentionSpec("fake", causal=False))
    with pytest.raises(ValueError, match="already registered"):
        register_backend(BackendInfo("fake", fake))
    register_backend(BackendInfo("fake", fake, supports_sink=True), replace=True)
    check_spec(AttentionSpec("fake"), has_sink=True)


@pytest.mark.parametrize("shapes,match", [
    (((1, 4, 5, 8), (1, 3, 5, 8), (1, 3, 5, 8), None), "multiple of kv heads"),
    (((1, 4, 5, 8), (1, 2, 5, 4), (1, 2, 5, 4), None), "k and v"),
    (((4, 5, 8), (1, 2, 5, 8), (1, 2, 5, 8), None), "4-D"),
    (((1, 4, 5, 8), (1, 2, 5, 8), (1, 2, 5, 8), (2,)), "sink"),
])
def test_attend_rejects_bad_shapes(shapes, match):
    q, k, v = (torch.randn(s) for s in shapes[:3])
    sink = None if shapes[3] is None else torch.zeros(shapes[3])
    with pytest.raises(ValueError, match=match):
        attend(q, k, v, AttentionSpec("sdpa"), sink)
