"""fused_proj: one GEMM over the concatenated input projections gives the unfused model's outputs and gradients."""

from __future__ import annotations

import pytest
import torch

from sinkfree.models.dit import DiT, DiTConfig
from sinkfree.models.llm import LLM, LLMConfig


@pytest.fixture(autouse=True)
def _reference_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # VSA's fine stage: the PyTorch reference on CPU


def _pair(make):
    """The same model built twice (unfused, fused) with identical random weights, biases and sinks."""
    torch.manual_seed(0)
    plain = make(False)
    with torch.no_grad():
        for p in plain.parameters():
            p.normal_(0, 0.1)  # non-zero gates, biases and sink logits, so every branch carries signal
    fused = make(True)
    fused.load_state_dict(plain.state_dict())
    return plain, fused


def _check(plain, fused, run):
    out_p, out_f = run(plain), run(fused)
    assert out_p.abs().max() > 1e-3
    torch.testing.assert_close(out_f, out_p, rtol=1e-4, atol=1e-5)
    out_p.square().sum().backward()
    out_f.square().sum().backward()
    pf = dict(fused.named_parameters())
    for name, p in plain.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name
        scale = float(p.grad.abs().max())  # fp32 sums in another order: errors relative to the largest entry
        torch.testing.assert_close(pf[name].grad, p.grad, rtol=1e-4, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize("switches", [
    {},
    {"attn_gate": "elementwise", "attn_bias": True, "n_kv_head": 2, "attn_sink": "learnable"},
    {"attn_gate": "headwise", "residual_sink": "gatednorm", "qk_norm": True},
], ids=["plain", "elementwise-bias-gqa", "headwise-gatednorm"])
def test_llm_fused_projections_match(switches):
    plain, fused = _pair(lambda f: LLM(LLMConfig.from_name("tiny", block_size=64, fused_proj=f, **switches)))
    assert fused.config.fused_proj and not plain.config.fused_proj
    assert set(fused.state_dict()) == set(plain.state_dict())  # same checkpoint layout
    idx = torch.randint(0, plain.config.vocab_size, (2, 37))
    _check(plain, fused, lambda m: m(idx))


@pytest.mark.parametrize("backend", ["sdpa", "vsa"])
def test_dit_fused_projections_match(backend):
    extra = dict(attn_backend="vsa", vsa_sparsity=0.5) if backend == "vsa" else {}
    common = dict(in_channels=3, n_layer=2, n_embd=128, n_head=2, num_classes=3, attn_gate="elementwise",
                  attn_sink="learnable", **extra)
    plain, fused = _pair(lambda f: DiT(DiTConfig(**common, fused_proj=f)))
    x, t, y = torch.randn(2, 3, 6, 10, 6), torch.rand(2), torch.tensor([0, 2])  # partial VSA tiles
    _check(plain, fused, lambda m: m(x, t, y))


def test_fused_llm_compiles_as_one_graph():
    import torch._dynamo

    model = LLM(LLMConfig.from_name("tiny", block_size=64, fused_proj=True, attn_gate="elementwise",
                                    residual_sink="gatednorm"))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(torch.randint(0, 100, (1, 16)))
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
