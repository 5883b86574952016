"""sinkfree.nn: norms, RoPE scaling, attention module (gates, sinks, capture), MLP, clip."""
import math

import pytest
import torch
import torch.nn.functional as F

from sinkfree.attention import AttentionSpec
from sinkfree.nn import (
    MLP,
    Attention,
    DyT,
    GatedNorm,
    IdentityNorm,
    PreAffineRMSNorm,
    RMSNorm,
    RotaryEmbedding,
    ZeroCenteredRMSNorm,
    apply_rope,
    build_norm,
    clip_output,
    rope_inv_freq,
    rotate_half,
)


def x_like(*shape, seed=0, dtype=torch.float32):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3).to(dtype)


# ---------------------------------------------------------------- norms
def test_rmsnorm_formula():
    norm = RMSNorm(24, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2, 24))
    x = x_like(3, 5, 24)
    ref = x.double() / torch.sqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight.double()
    torch.testing.assert_close(norm(x).double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("zero_centered", [False, True])
def test_gatednorm_identity_init_equals_rmsnorm_bitwise(dtype, zero_centered):
    base = (ZeroCenteredRMSNorm if zero_centered else RMSNorm)(32)
    gated = GatedNorm(32, rank=4, identity_init=True, zero_centered=zero_centered)
    with torch.no_grad():  # non-trivial shared norm weight
        w = torch.randn(32, generator=torch.Generator().manual_seed(1))
        base.weight.copy_(w)
        gated.weight.copy_(w)
    base, gated = base.to(dtype), gated.to(dtype)
    x = x_like(2, 7, 32, dtype=dtype)
    assert torch.equal(gated(x), base(x))
    assert gated.gate_scale == 2.0 and gated.gate_up.weight.abs().sum() == 0


def test_gatednorm_default_init_gates_down():
    gated = GatedNorm(32, rank=4)
    base = RMSNorm(32)
    x = x_like(2, 7, 32)
    y, ref = gated(x), base(x)
    assert gated.gate_scale == 1.0 and gated.gate_up.weight.abs().sum() > 0
    ratio = y / ref
    assert (ratio > 0).all() and (ratio < 1).all()  # sigmoid gate only scales down
    torch.testing.assert_close(ratio, gated.gate(ref))
    y.sum().backward()
    assert gated.gate_down.weight.grad.abs().sum() > 0


def test_preaffine():
    base, pre = RMSNorm(16), PreAffineRMSNorm(16)
    x = x_like(4, 16)
    assert torch.equal(pre(x), base(x))  # λ = 1 at init
    with torch.no_grad():
        pre.pre_scale.copy_(torch.linspace(0.1, 10, 16))
    torch.testing.assert_close(pre(x), base(x * pre.pre_scale))
    assert not torch.allclose(pre(x), base(x))


def test_zero_centered():
    base, zc = RMSNorm(16), ZeroCenteredRMSNorm(16)
    x = x_like(4, 16)
    assert torch.equal(zc(x), base(x))
    assert zc.weight.abs().sum() == 0
    with torch.no_grad():
        zc.weight.fill_(0.5)
        base.weight.fill_(1.5)
    torch.testing.assert_close(zc(x), base(x))
    torch.testing.assert_close(zc.effective_weight(), torch.full((16,), 1.5))


def test_dyt_and_identity():
    dyt = DyT(8)
    assert dyt.alpha.item() == 0.5
    with torch.no_grad():
        dyt.weight.copy_(torch.arange(8.0))
        dyt.bias.fill_(0.25)
    x = x_like(3, 8)
    torch.testing.assert_close(dyt(x), torch.tanh(0.5 * x) * torch.arange(8.0) + 0.25)
    ident = IdentityNorm(8)
    assert torch.equal(ident(x), x) and torch.equal(ident.effective_weight(), torch.ones(8))


def test_build_norm_and_weight_decay_marks():
    cases = {("rmsnorm", "none"): RMSNorm, ("zero_centered", "none"): ZeroCenteredRMSNorm, ("dyt", "none"): DyT,
             ("identity", "none"): IdentityNorm, ("rmsnorm", "preaffine"): PreAffineRMSNorm,
             ("zero_centered", "gatednorm"): GatedNorm}
    for (kind, sink), cls in cases.items():
        norm = build_norm(kind, sink, 16, 1e-5, 4, False)
        assert type(norm) is cls
        assert norm.effective_weight().shape == (16,)
    assert build_norm("zero_centered", "gatednorm", 16).zero_centered
    assert getattr(RMSNorm(4).weight, "_no_weight_decay", False)
    assert not getattr(ZeroCenteredRMSNorm(4).weight, "_no_weight_decay", False)
    assert getattr(PreAffineRMSNorm(4).pre_scale, "_no_weight_decay", False)
    assert all(getattr(p, "_no_weight_decay", False) for p in DyT(4).parameters())
    with pytest.raises(ValueError, match="norm="):
        build_norm("layernorm", "none", 8)
    with pytest.raises(ValueError, match="residual_sink="):
        build_norm("rmsnorm", "bogus", 8)
    with pytest.raises(ValueError, match="residual_sink"):
        build_norm("dyt", "gatednorm", 8)


# ---------------------------------------------------------------- RoPE
def ref_inv_freq(d, theta, scaling):
    """Independent per-frequency scalar implementation of the HF formulas."""
    freqs = [theta ** (-(2 * i) / d) for i in range(d // 2)]
    kind = (scaling or {}).get("type")
    if kind is None:
        return freqs, 1.0
    factor = scaling["factor"]
    if kind == "linear":
        return [f / factor for f in freqs], 1.0
    if kind == "llama3":
        orig, lo, hi = scaling["original_max_position_embeddings"], scaling["low_freq_factor"], \
            scaling["high_freq_factor"]
        out = []
        for f in freqs:
            wl = 2 * math.pi / f
            if wl < orig / hi:
                out.append(f)
            elif wl > orig / lo:
                out.append(f / factor)
            else:
                s = (orig / wl - lo) / (hi - lo)
                out.append((1 - s) * f / factor + s * f)
        return out, 1.0
    orig = scaling["original_max_position_embeddings"]
    fast, slow = scaling.get("beta_fast", 32), scaling.get("beta_slow", 1)

    def dim_of(rot):
        return d * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(theta))

    lo, hi = max(math.floor(dim_of(fast)), 0), min(math.ceil(dim_of(slow)), d - 1)
    out = []
    for i, f in enumerate(freqs):
        r = min(max((i - lo) / (hi - lo), 0.0), 1.0)  # 0: keep (extrapolate), 1: divide by factor
        out.append(f * (1 - r) + f / factor * r)
    mscale = lambda s, m=1.0: 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0
    if "mscale" in scaling:
        att = mscale(factor, scaling["mscale"]) / mscale(factor, scaling["mscale_all_dim"])
    else:
        att = mscale(factor)
    return out, att


SCALINGS = [
    None,
    {"type": "linear", "factor": 4.0},
    {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
    {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096},
    {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 16,
     "beta_slow": 2, "mscale": 1.0, "mscale_all_dim": 0.5},
]


@pytest.mark.parametrize("scaling", SCALINGS)
def test_rope_inv_freq_matches_reference(scaling):
    d, theta = 128, 500000.0
    inv, att = rope_inv_freq(d, theta, scaling)
    ref, ref_att = ref_inv_freq(d, theta, scaling)
    torch.testing.assert_close(inv.double(), torch.tensor(ref, dtype=torch.float64), rtol=1e-5, atol=0)
    assert att == pytest.approx(ref_att, rel=1e-12)
    if scaling is not None:  # every scaling really changes the low frequencies
        assert inv[-1] < ref_inv_freq(d, theta, None)[0][-1] * 0.99
    cos, sin = RotaryEmbedding(d, theta, scaling)(seq_len=5)
    pos = torch.arange(5.0).view(5, 1) * inv.view(1, -1)
    torch.testing.assert_close(cos[:, : d // 2], pos.cos() * att)
    torch.testing.assert_close(sin[:, d // 2:], pos.sin() * att)


@pytest.mark.parametrize("scaling", SCALINGS[1:])
def test_rope_matches_transformers_if_installed(scaling):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    hf_scaling = {("rope_type" if k == "type" else k): v for k, v in scaling.items()}
    cfg = transformers.LlamaConfig(hidden_size=256, num_attention_heads=2, rope_theta=500000.0,
                                   max_position_embeddings=scaling.get("original_max_position_embeddings", 2048)
                                   * int(scaling["factor"]), rope_scaling=hf_scaling)
    inv_hf, att_hf = ROPE_INIT_FUNCTIONS[scaling["type"]](cfg, "cpu")
    inv, att = rope_inv_freq(128, 500000.0, scaling)
    torch.testing.assert_close(inv, inv_hf.float(), rtol=1e-5, atol=0)
    assert att == pytest.approx(att_hf)


def test_rope_layout_and_relative_positions():
    x = torch.zeros(8)
    x[0] = 1.0
    assert torch.equal(rotate_half(x), torch.cat([torch.zeros(4), torch.tensor([1.0, 0, 0, 0])]))
    rope = RotaryEmbedding(8)
    cos, sin = rope(seq_len=12)
    q, k = x_like(1, 1, 1, 8, seed=1), x_like(1, 1, 1, 8, seed=2)

    def score(m, n):
        qm = apply_rope(q, cos[m:m + 1], sin[m:m + 1])
        kn = apply_rope(k, cos[n:n + 1], sin[n:n + 1])
        return (qm * kn).sum()

    torch.testing.assert_close(score(7, 3), score(10, 6))  # depends on m - n only
    assert not torch.allclose(score(7, 3), score(7, 4))
    rotated = apply_rope(q, cos[5:6], sin[5:6])
    torch.testing.assert_close(rotated.norm(), q.norm())


def test_rope_scaling_validation():
    with pytest.raises(ValueError, match="type"):
        rope_inv_freq(8, scaling={"type": "ntk", "factor": 2.0})
    with pytest.raises(ValueError, match="low_freq_factor"):
        rope_inv_freq(8, scaling={"type": "llama3", "factor": 2.0})
    with pytest.raises(ValueError, match="bogus"):
        rope_inv_freq(8, scaling={"type": "linear", "factor": 2.0, "bogus": 1})


# ---------------------------------------------------------------- attention module
def make_attn(**kw):
    torch.manual_seed(0)
    kw.setdefault("spec", AttentionSpec("sdpa"))
    return Attention(48, 6, 2, 8, **kw)


def pre_o_proj(attn, x, rope=None):
    """The (B, S, H*D) input of o_proj."""
    seen = {}
    handle = attn.o_proj.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    attn(x, rope)
    handle.remove()
    return seen["x"]


@pytest.mark.parametrize("gate", ["headwise", "elementwise"])
def test_gate_multiplies_its_own_head(gate):
    x = torch.rand(2, 9, 48) + 0.5  # positive, so a large negative row drives its gate to 0
    ungated, gated = make_attn(), make_attn(gate=gate)
    gated.load_state_dict(ungated.state_dict(), strict=False)
    head, dim = 4, 3  # with GQA 6/2 head 4 reads kv head 2
    with torch.no_grad():
        gated.gate_proj.weight.zero_()  # every gate 0.5
        row = head if gate == "headwise" else head * 8 + dim
        gated.gate_proj.weight[row] = -1000.0
    ref = pre_o_proj(ungated, x).view(2, 9, 6, 8)
    out = pre_o_proj(gated, x).view(2, 9, 6, 8)
    expect = 0.5 * ref
    if gate == "headwise":
        expect[:, :, head] = 0
    else:
        expect[:, :, head, dim] = 0
    torch.testing.assert_close(out, expect)
    assert ref[:, :, head].abs().min() > 0  # so the zeros above come from the gate


def test_sink_parameters_and_off_by_one():
    learn = make_attn(sink="learnable", sink_init=0.0)
    off = make_attn(sink="off_by_one")
    assert learn.sink.dtype == torch.float32 and learn.sink.shape == (6,)
    assert "sink" in dict(learn.named_parameters()) and getattr(learn.sink, "_no_weight_decay", False)
    assert "sink" not in dict(off.named_parameters()) and off.sink.abs().sum() == 0
    off.load_state_dict(learn.state_dict(), strict=False)
    x = x_like(2, 9, 48)
    torch.testing.assert_close(off(x), learn(x))
    plain = make_attn()
    plain.load_state_dict(learn.state_dict(), strict=False)
    assert (plain(x) - learn(x)).abs().max() > 1e-4
    learn(x).pow(2).sum().backward()
    assert learn.sink.grad.abs().sum() > 0


def test_qk_norm_makes_scale_of_qk_irrelevant():
    x = x_like(1, 9, 48)
    for qk_norm, same in ((True, True), (False, False)):
        a, b = make_attn(qk_norm=qk_norm), make_attn(qk_norm=qk_norm)
        with torch.no_grad():
            b.q_proj.weight.mul_(10)
            b.k_proj.weight.mul_(10)
        assert torch.allclose(a(x), b(x), atol=1e-5) == same


def test_capture_probe_hook():
    attn = make_attn(gate="headwise", sink="learnable", sink_init=-0.5)
    rope = RotaryEmbedding(8)(seq_len=9)
    x = x_like(2, 9, 48)
    normal = attn(x, rope)
    attn.capture = {}
    probed = attn(x, rope)
    cap = attn.capture
    torch.testing.assert_close(probed, normal, atol=1e-5, rtol=1e-5)
    assert cap["probs"].shape == (2, 6, 9, 9) and cap["probs"].dtype == torch.float32
    assert cap["sink_mass"].shape == (2, 6, 9) and cap["v"].shape == (2, 2, 9, 8)
    assert cap["gate"].shape == (2, 9, 6, 1) and ((cap["gate"] > 0) & (cap["gate"] < 1)).all()
    torch.testing.assert_close(cap["probs"].sum(-1) + cap["sink_mass"], torch.ones(2, 6, 9))
    assert cap["probs"].triu(1).abs().sum() == 0  # causal
    plain = make_attn()
    plain.capture = {}
    plain(x)
    assert plain.capture["sink_mass"] is None and plain.capture["gate"] is None


def test_attention_bias_and_errors():
    attn = make_attn(bias=True)
    assert attn.q_proj.bias is not None and getattr(attn.q_proj.bias, "_no_weight_decay", False)
    assert attn.o_proj.bias is None
    with pytest.raises(ValueError, match="attn_gate"):
        make_attn(gate="bogus")
    with pytest.raises(ValueError, match="attn_sink"):
        make_attn(sink="bogus")
    with pytest.raises(ValueError, match="attn_softmax"):
        make_attn(spec=AttentionSpec("sdpa", softmax="sigmoid"))


# ---------------------------------------------------------------- MLP, clip
def test_mlp_swiglu():
    mlp = MLP(16, 40)
    assert all(m.bias is None for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    x = x_like(3, 16)
    ref = (F.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T
    torch.testing.assert_close(mlp(x), ref)


def test_clip_output():
    x = x_like(100)
    assert clip_output(x, None) is x
    y = clip_output(x, 1.5)
    assert y.abs().max() == 1.5 and x.abs().max() > 1.5
    keep = x.abs() < 1.5
    assert torch.equal(y[keep], x[keep])


@pytest.mark.parametrize("identity_init", [False, True])
def test_gatednorm_under_autocast_outputs_the_autocast_dtype(identity_init):
    """Under bf16 autocast GatedNorm returns bf16 (what the next Linear consumes; the compiled step writes no fp32
    copy of y), its output and every gradient within bf16 rounding of the fp32 module's, eagerly and through
    Dynamo + AOTAutograd (aot_eager, fullgraph: the autocast check does not break the graph)."""
    import torch._dynamo

    torch.manual_seed(0)
    norm = GatedNorm(48, rank=8, identity_init=identity_init)
    with torch.no_grad():
        for p in norm.parameters():
            p.normal_(0, 0.5)  # a non-trivial gate (identity_init would start it at exactly 1)
    x = torch.randn(64, 48) * 3
    x[0, 3] = 80.0  # an outlier channel value
    dy = torch.randn(64, 48)

    def run(fn, autocast):
        xx = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = fn(xx)
        return out, torch.autograd.grad(out, [xx, *norm.parameters()], dy.to(out.dtype))

    def rel(a, b):
        return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())

    torch._dynamo.reset()
    want, want_grads = run(norm, autocast=False)
    assert want.dtype == torch.float32
    for fn in (norm, torch.compile(norm, backend="aot_eager", fullgraph=True)):
        out, grads = run(fn, autocast=True)
        assert out.dtype == torch.bfloat16
        assert 0 < rel(out, want) < 1e-2
        for g, wg in zip(grads, want_grads):
            assert g.dtype == wg.dtype and 0 < rel(g, wg) < 3e-2


def test_gatednorm_unknown_kernel_is_a_clear_error():
    with pytest.raises(ValueError, match="gatednorm_kernel='cuda'.*torch.*triton"):
        GatedNorm(8, kernel="cuda")
