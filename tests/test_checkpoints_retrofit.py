"""Retrofitting switches onto a pretrained model: unchanged outputs at step 0, calibrated sinks, trainable."""
import pytest
import torch

from sinkfree.checkpoints import CheckpointError, load_for_init, load_pretrained, retrofit_report
from sinkfree.checkpoints.export import save_hf
from sinkfree.checkpoints.retrofit import _sink_masses, merge_arch, probe_ids
from sinkfree.models.llm import LLM, LLMConfig

BASE = LLMConfig(vocab_size=128, n_layer=3, n_embd=64, n_head=4, n_kv_head=2, intermediate_size=96, block_size=64)
IDENTITY_SWITCHES = [{"attn_gate": "headwise"}, {"attn_gate": "elementwise"}, {"residual_sink": "gatednorm"},
                     {"residual_sink": "preaffine"},
                     {"attn_gate": "elementwise", "residual_sink": "gatednorm", "gatednorm_rank": 8}]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A 'pretrained' plain model with non-trivial norms, exported as an HF folder."""
    torch.manual_seed(0)
    model = LLM(BASE).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("ckpt") / "hf"
    save_hf(model, folder)
    return model, folder


def probe():
    return torch.randint(0, BASE.vocab_size, (2, 48), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("switches", IDENTITY_SWITCHES, ids=lambda s: "+".join(f"{k}={v}" for k, v in s.items()))
def test_identity_switches_leave_outputs_unchanged(pretrained, switches):
    plain, folder = pretrained
    model = load_pretrained(folder, {**BASE.__dict__, **switches}).eval()
    for key, value in switches.items():
        assert getattr(model.config, key) == value
    with torch.no_grad():
        assert torch.equal(model(probe()), plain(probe())), "retrofit must be an exact identity at step 0"
    # and the new parameters get gradients (a σ saturated at 1 or a -inf sink would not)
    model.train()
    model(probe()).logsumexp(-1).mean().backward()
    new = [p for n, p in model.named_parameters() if "gate_proj" in n and "attn" in n or "gate_up" in n
           or "pre_scale" in n]
    assert new and all(p.grad is not None and p.grad.abs().sum() > 0 for p in new)


def test_learnable_sink_starts_low_and_finite(pretrained):
    plain, folder = pretrained
    init = load_for_init(folder, {**BASE.__dict__, "attn_sink": "learnable"})
    assert init.new_keys == [f"layers.{i}.attn.sink" for i in range(BASE.n_layer)]
    assert -1e4 < init.config.sink_init < 0
    # one calibrated logit per (layer, head), returned in the state dict (so nothing is missing)
    logits = torch.stack([init.state_dict[k] for k in init.new_keys])
    assert logits.shape == (BASE.n_layer, BASE.n_head) and logits.dtype == torch.float32
    assert init.config.sink_init == logits.min().item() and logits.unique().numel() > 1
    model = LLM(init.config).eval()  # what the task does with init_from
    missing, unexpected = model.load_state_dict(init.state_dict, strict=False)
    assert not missing and not unexpected
    report = retrofit_report(model)
    assert report["max_sink_mass"] <= 1e-3
    # every head's own worst-query sink mass is close to the bound, not ~1e-9 (which would get ~no gradient)
    masses = _sink_masses(model, probe_ids(BASE.vocab_size, None, length=BASE.block_size), logits)
    assert masses.max() <= 1e-3 and masses.min() >= 3e-4, masses
    with torch.no_grad():
        change = (model(probe()) - plain(probe())).abs().max().item()
    print(f"sink logits {logits.min():.2f}..{logits.max():.2f}: max sink mass {report['max_sink_mass']:.1e}, "
          f"largest logit change at step 0 {change:.2e}")
    assert change < 1e-2
    model.train()
    model(probe()).logsumexp(-1).mean().backward()
    assert all(model.layers[i].attn.sink.grad.abs().sum() > 0 for i in range(BASE.n_layer))


def test_explicit_sink_init_is_respected(pretrained):
    _, folder = pretrained
    model = load_pretrained(folder, {"attn_sink": "learnable", "sink_init": -3.0})
    assert model.layers[0].attn.sink[0].item() == -3.0


def test_trained_switches_are_kept_not_reinitialised(tmp_path):
    config = LLMConfig(**{**BASE.__dict__, "attn_gate": "elementwise", "attn_sink": "learnable"})
    model = LLM(config)
    with torch.no_grad():
        for block in model.layers:
            block.attn.sink.copy_(torch.randn(BASE.n_head))
    save_hf(model, tmp_path / "hf")
    again = load_pretrained(tmp_path / "hf", {"attn_gate": "elementwise", "attn_sink": "learnable"})
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


@pytest.mark.parametrize("overrides, match", [
    ({"n_layer": 4}, "n_layer: recipe 4, checkpoint 3"),
    ({"qk_norm": True}, "qk_norm"),
    ({"norm": "dyt"}, "norm"),
    ({"rope_theta": 500000.0}, "rope_theta"),
    ({"not_a_field": 1}, "unknown model.arch fields"),
])
def test_contradicting_overrides(overrides, match):
    with pytest.raises(CheckpointError, match=match):
        merge_arch(BASE.__dict__, overrides, "ckpt")


def test_checkpoint_switch_cannot_be_swapped():
    have = {**BASE.__dict__, "attn_gate": "elementwise"}
    with pytest.raises(CheckpointError, match="attn_gate: recipe 'headwise', checkpoint 'elementwise'"):
        merge_arch(have, {"attn_gate": "headwise"}, "ckpt")
    merged = merge_arch(BASE.__dict__, {"attn_gate": "elementwise", "residual_sink": "gatednorm",
                                        "block_size": 32}, "ckpt")
    assert merged["attn_gate_identity_init"] and merged["gatednorm_identity_init"] and merged["block_size"] == 32
