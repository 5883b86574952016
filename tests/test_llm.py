"""sinkfree.models: LLMConfig validation and presets, every switch trains, clipping, groups, generate."""
import math

import pytest
import torch

from sinkfree.attention import BackendInfo, register_backend, registry
from sinkfree.models import LLM, LLMConfig, generate
from sinkfree.nn import GatedNorm

SMALL = dict(n_layer=2, block_size=32)


def tiny(**kw):
    return LLMConfig.from_name("tiny", **{**SMALL, **kw})


def ids(b=2, s=16, seed=0, vocab=4096):
    return torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(seed))


SWITCHES = [
    {},
    {"attn_gate": "headwise"},
    {"attn_gate": "elementwise"},
    {"attn_sink": "learnable", "sink_init": 0.5},
    {"attn_sink": "off_by_one"},
    {"attn_sink": "learnable", "attn_backend": "eager"},
    {"residual_sink": "preaffine"},
    {"residual_sink": "gatednorm"},
    {"residual_sink": "gatednorm", "gatednorm_identity_init": True, "gatednorm_rank": 4},
    {"norm": "zero_centered", "residual_sink": "gatednorm"},
    {"norm": "zero_centered"},
    {"norm": "dyt"},
    {"norm": "identity"},
    {"attn_softmax": "sigmoid", "attn_backend": "eager"},
    {"outlier_clip": 5.0},
    {"outlier_clip": 5.0, "attn_logit_clip": 5.0, "attn_backend": "eager"},
    {"qk_norm": True, "attn_bias": True, "tie_embeddings": True},
    {"head_dim": 48, "n_kv_head": 1, "intermediate_size": 200},
    {"rope_scaling": {"type": "linear", "factor": 2.0}},
    {"rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16}},
    {"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}},
    {"attn_gate": "elementwise", "residual_sink": "gatednorm", "qk_norm": True, "attn_sink": "learnable"},
]


@pytest.mark.parametrize("switches", SWITCHES, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()) or "plain")
def test_every_switch_trains(switches):
    torch.manual_seed(0)
    model = LLM(tiny(**switches))
    x = ids()
    logits = model(x)
    assert logits.shape == (2, 16, 4096)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    assert math.log(4096) - 0.5 < loss.item() < math.log(4096) + 0.5  # near uniform at init
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    if switches.get("attn_sink") == "learnable":
        assert model.layers[0].attn.sink.grad.abs().sum() > 0
        assert model.layers[0].attn.sink.detach().eq(switches.get("sink_init", 0.0)).all()


def test_sdpa_and_eager_models_agree():
    torch.manual_seed(0)
    a = LLM(tiny(attn_sink="learnable", attn_gate="elementwise"))
    b = LLM(tiny(attn_sink="learnable", attn_gate="elementwise", attn_backend="eager"))
    with torch.no_grad():
        for layer in a.layers:
            layer.attn.sink.uniform_(-2, 2)
    b.load_state_dict(a.state_dict())
    x = ids()
    torch.testing.assert_close(b(x), a(x), atol=1e-4, rtol=1e-4)


def test_gatednorm_identity_init_model_equals_plain():
    torch.manual_seed(0)
    plain = LLM(tiny())
    gated = LLM(tiny(residual_sink="gatednorm", gatednorm_identity_init=True))
    gated.load_state_dict(plain.state_dict(), strict=False)  # gate_down/gate_up stay as built
    assert isinstance(gated.norm, GatedNorm)
    x = ids()
    assert torch.equal(gated(x), plain(x))


def test_outlier_clip_clamps_block_outputs():
    torch.manual_seed(0)
    model = LLM(tiny(outlier_clip=0.01, init_std=0.5))
    assert all(layer.attn.spec.logit_clip is None for layer in model.layers)  # logits: attn_logit_clip
    seen = {}
    block = model.layers[1]
    block.attn.register_forward_hook(lambda m, a, out: seen.__setitem__("attn", out))
    block.mlp.register_forward_hook(lambda m, a, out: seen.__setitem__("mlp", out))
    block.register_forward_hook(lambda m, a, out: seen.__setitem__("io", (a[0], out)))
    model(ids())
    assert seen["attn"].abs().max() > 0.01 and seen["mlp"].abs().max() > 0.01  # raw outputs are larger
    x_in, x_out = seen["io"]
    assert (x_out - x_in).abs().max() <= 0.02 + 1e-6  # two clamped adds


def test_layer_hook_sees_residual_stream_and_tied_head():
    model = LLM(tiny(tie_embeddings=True))
    assert model.lm_head is None
    seen = []
    model.layers[0].register_forward_hook(lambda m, a, out: seen.append(out.shape))
    x = ids(s=10)
    logits = model(x)
    assert seen == [(2, 10, 128)]
    h = model.embed(x)
    rope = model.rope(10)
    for layer in model.layers:
        h = layer(h, rope)
    torch.testing.assert_close(logits, model.norm(h) @ model.embed.weight.T)
    with pytest.raises(ValueError, match="block_size"):
        model(ids(s=33))


def test_init_scales_residual_writes():
    torch.manual_seed(0)
    model = LLM(tiny(n_layer=8))
    attn = model.layers[3].attn
    assert attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert attn.o_proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.1)
    assert model.layers[0].mlp.down_proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.1)
    assert model.embed.weight.std().item() == pytest.approx(0.02, rel=0.1)


@pytest.mark.parametrize("name,low,high", [("tiny", 1.5e6, 2.5e6), ("125m", 1.2e8, 1.4e8),
                                           ("350m", 3.3e8, 4.2e8), ("1b", 1.2e9, 1.3e9)])
def test_presets(name, low, high):
    with torch.device("meta"):
        model = LLM(LLMConfig.from_name(name))
    assert low < model.num_params() < high
    c = model.config
    expect = 6 * model.num_params(exclude_embedding=True) + 6 * c.n_layer * c.n_head * c.head_size * 1024
    assert model.flops_per_token(1024) == expect
    assert LLMConfig.from_name(name, attn_gate="elementwise").attn_gate == "elementwise"


def test_num_params_exclude_embedding():
    untied, tied = LLM(tiny()), LLM(tiny(tie_embeddings=True))
    assert untied.num_params() - untied.num_params(exclude_embedding=True) == 4096 * 128
    assert tied.num_params(exclude_embedding=True) == tied.num_params()
    assert untied.num_params() - tied.num_params() == 4096 * 128


BAD = [
    (dict(n_embd=100, n_head=3, n_kv_head=None), "n_embd=100 is not divisible by n_head=3"),
    (dict(attn_gate="sometimes"), "attn_gate='sometimes'.*elementwise"),
    (dict(attn_sink="sticky"), "attn_sink='sticky'.*off_by_one"),
    (dict(residual_sink="x"), "residual_sink='x'.*gatednorm"),
    (dict(norm="layernorm"), "norm='layernorm'.*zero_centered"),
    (dict(attn_softmax="relu"), "attn_softmax='relu'"),
    (dict(attn_softmax="sigmoid"), "attn_softmax=sigmoid.*attn_backend='sdpa'.*eager"),
    (dict(attn_softmax="sigmoid", attn_backend="eager", attn_sink="learnable"), "attn_sink"),
    (dict(attn_backend="cudnn"), "attn_backend='cudnn'.*sdpa"),
    (dict(attn_logit_clip=3.0), "attn_logit_clip.*eager"),
    (dict(attn_logit_clip=0.0, attn_backend="eager"), "attn_logit_clip=0.0"),
    (dict(outlier_clip=-1.0, attn_backend="eager"), "outlier_clip=-1.0"),
    (dict(n_kv_head=3), "n_kv_head=3"),
    (dict(n_layer=0), "n_layer=0"),
    (dict(head_dim=7), "head_dim"),
    (dict(rms_norm_eps=0.0), "rms_norm_eps"),
    (dict(gatednorm_rank=0), "gatednorm_rank"),
    (dict(residual_sink="gatednorm", gatednorm_kernel="cuda"), "gatednorm_kernel='cuda'.*triton"),
    (dict(norm="dyt", residual_sink="preaffine"), "residual_sink='preaffine'.*norm='dyt'"),
    (dict(rope_scaling={"type": "ntk", "factor": 2.0}), "rope_scaling"),
    (dict(rope_scaling={"type": "llama3", "factor": 2.0}), "rope_scaling.*low_freq_factor"),
    (dict(attn_tile_size=32), "attn_tile_size=32"),
    (dict(attn_topk_keep=0.0), "attn_topk_keep=0.0"),
    (dict(attn_topk_keep=1.5), "attn_topk_keep=1.5"),
]


@pytest.mark.parametrize("kwargs,match", BAD)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kwargs)


def test_tile_options_reach_every_layer():
    cfg = tiny(attn_backend="topk", attn_tile_size=128, attn_topk_keep=0.25, attn_fallback_layers=[0])
    assert (cfg.attention_spec.tile_size, cfg.attention_spec.topk_keep) == (128, 0.25)
    fb = cfg.layer_attention_spec(0)
    assert fb.backend == "flash" and (fb.tile_size, fb.topk_keep) == (128, 0.25)


def test_gatednorm_kernel_reaches_every_norm(monkeypatch):
    monkeypatch.setattr(GatedNorm, "fused", False)  # the class default (SINKFREE_FUSED_GATEDNORM unset)
    for kernel, fused in (("torch", False), ("triton_gate", False), ("triton", True)):
        norms = [m for m in LLM(tiny(residual_sink="gatednorm", gatednorm_kernel=kernel)).modules()
                 if isinstance(m, GatedNorm)]
        assert len(norms) == 2 * 2 + 1 and all(m.fused is fused and m.kernel == kernel for m in norms)


def test_config_rejects_sink_on_backend_without_sinks(monkeypatch):
    monkeypatch.setattr(registry, "_BACKENDS", dict(registry._BACKENDS))
    register_backend(BackendInfo("nosink", lambda q, k, v, spec, sink: q))
    tiny(attn_backend="nosink")
    with pytest.raises(ValueError, match="attn_sink.*nosink"):
        tiny(attn_backend="nosink", attn_sink="off_by_one")


def test_config_presets_and_yaml_nones():
    with pytest.raises(ValueError, match="preset 'huge'.*tiny"):
        LLMConfig.from_name("huge")
    with pytest.raises(ValueError, match="n_embed"):
        LLMConfig.from_name("tiny", n_embed=64)
    c = tiny(attn_gate=None, outlier_clip="none")
    assert c.attn_gate == "none" and c.outlier_clip is None
    assert (c.num_kv_heads, c.head_size, c.mlp_hidden) == (2, 32, 384)
    assert LLMConfig().num_kv_heads == 12 and LLMConfig().head_size == 64


def test_param_groups():
    model = LLM(tiny(attn_sink="learnable", attn_bias=True, residual_sink="preaffine"))
    decay, no_decay = model.param_groups(0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    d, nd = {id(p) for p in decay["params"]}, {id(p) for p in no_decay["params"]}
    assert not d & nd and len(d) + len(nd) == len(list(model.parameters()))
    layer = model.layers[0]
    for p in (layer.attn.sink, layer.attn.q_proj.bias, layer.attn_norm.weight, layer.attn_norm.pre_scale,
              model.norm.weight):
        assert id(p) in nd
    for p in (layer.attn.q_proj.weight, layer.mlp.down_proj.weight, model.embed.weight, model.lm_head.weight):
        assert id(p) in d
    zc = LLM(tiny(norm="zero_centered", residual_sink="gatednorm"))
    d, nd = ({id(p) for p in g["params"]} for g in zc.param_groups(0.1))
    assert id(zc.layers[0].mlp_norm.weight) in d and id(zc.layers[0].mlp_norm.gate_up.weight) in d
    dyt = LLM(tiny(norm="dyt"))
    _, nd = ({id(p) for p in g["params"]} for g in dyt.param_groups(0.1))
    assert {id(p) for p in dyt.layers[0].attn_norm.parameters()} <= nd


def test_generate_greedy():
    torch.manual_seed(0)
    model = LLM(tiny())
    prompt = ids(s=5)
    out = generate(model, prompt, 4)
    assert out.shape == (2, 9) and torch.equal(out[:, :5], prompt)
    assert torch.equal(generate(model, prompt, 4), out)
    manual = prompt
    for _ in range(4):
        manual = torch.cat([manual, model(manual)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(manual, out)
    assert model.training  # restored


def test_generate_crops_to_block_size():
    model = LLM(tiny(block_size=8))
    out = generate(model, ids(s=7), 5)
    assert out.shape == (2, 12)
    assert torch.equal(out[:, -1], model(out[:, -9:-1])[:, -1].argmax(-1))


def test_generate_sampling_seed_and_top_p():
    torch.manual_seed(0)
    model = LLM(tiny())
    prompt = ids(s=4)

    def sample(seed, **kw):
        return generate(model, prompt, 6, generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(sample(1, temperature=1.0, top_p=0.9), sample(1, temperature=1.0, top_p=0.9))
    assert not torch.equal(sample(1, temperature=1.0), sample(2, temperature=1.0))
    # a tiny nucleus keeps only the argmax token
    assert torch.equal(sample(3, temperature=1.0, top_p=1e-6), generate(model, prompt, 6))
    with pytest.raises(ValueError, match="top_p"):
        generate(model, prompt, 1, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, prompt, 1, temperature=-1.0)


def test_generate_top_p_support():
    # With a nucleus of p, only tokens inside the smallest top set reaching p can ever be drawn.
    from sinkfree.models.generate import _top_p_filter
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = _top_p_filter(probs, 0.75)
    torch.testing.assert_close(kept, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    torch.testing.assert_close(_top_p_filter(probs, 1.0), probs)


def test_generate_stops_at_eos():
    torch.manual_seed(0)
    model = LLM(tiny())
    prompt = ids(b=1, s=5)
    first = generate(model, prompt, 1)[0, -1].item()
    out = generate(model, prompt, 6, eos_id=first)
    assert out.shape == (1, 6) and out[0, -1].item() == first


@pytest.mark.parametrize("gate", ["headwise", "elementwise"])
def test_attn_gate_identity_init_model_equals_plain(gate):
    torch.manual_seed(0)
    plain = LLM(tiny())
    gated = LLM(tiny(attn_gate=gate, attn_gate_identity_init=True))
    gated.load_state_dict(plain.state_dict(), strict=False)
    assert gated.layers[0].attn.gate_proj.weight.abs().sum() == 0
    x = ids()
    assert torch.equal(gated(x), plain(x))
    default = LLM(tiny(attn_gate=gate))
    default.load_state_dict(plain.state_dict(), strict=False)
    assert not torch.allclose(default(x), plain(x))
