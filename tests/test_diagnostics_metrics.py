"""Sink metrics on synthetic tensors with known answers."""
import math

import pytest
import torch

from sinkfree.diagnostics.metrics import (
    GateStats,
    PerHeadMean,
    ResidualMagnitude,
    ResidualSinkDims,
    SinkRate,
    first_token_mass,
    learned_sink_mass,
    max_key_mass,
    residual_sink_dims,
    value_norm_ratio,
)


def one_hot_first(b, h, s):
    probs = torch.zeros(b, h, s, s)
    probs[..., 0] = 1.0
    return probs


def uniform_causal(b, h, s):
    mask = torch.ones(s, s).tril()
    return (mask / mask.sum(-1, keepdim=True)).expand(b, h, s, s)


def harmonic(n):
    return sum(1.0 / k for k in range(1, n + 1))


def test_one_hot_first_token_gives_mass_one_and_sink_rate_one():
    probs = one_hot_first(3, 4, 10)
    alpha = first_token_mass(probs)
    assert torch.allclose(alpha, torch.ones(3, 4))
    rate = SinkRate(num_layers=2, num_heads=4)
    rate.update(torch.stack([alpha, alpha]))
    assert torch.equal(rate.compute(), torch.ones(2, 4))
    assert torch.allclose(max_key_mass(probs), torch.ones(3, 4))


@pytest.mark.parametrize("s", [8, 64])
def test_uniform_causal_attention_has_harmonic_first_token_mass(s):
    # A_ij = 1/(i+1) for j <= i, so α = (1/S) Σ_i 1/(i+1) = H_S / S: 0.340 at S=8, 0.074 at S=64.
    probs = uniform_causal(2, 3, s)
    expected = harmonic(s) / s
    alpha = first_token_mass(probs)
    assert torch.allclose(alpha, torch.full((2, 3), expected))
    assert torch.allclose(max_key_mass(probs), torch.full((2, 3), expected))  # column 0 has the most mass
    rate = SinkRate(num_layers=1, num_heads=3)
    rate.update(alpha[None])
    assert torch.equal(rate.compute(), torch.full((1, 3), 1.0 if expected > 0.3 else 0.0))


def test_sink_rate_counts_sequences_and_heads_above_eps():
    alpha = torch.tensor([[[0.9, 0.1], [0.31, 0.29]]])  # (L=1, B=2, H=2)
    rate = SinkRate(1, 2, eps=0.3)
    rate.update(alpha)
    assert torch.equal(rate.compute(), torch.tensor([[1.0, 0.0]]))


def test_per_head_mean_accumulates_over_updates():
    m = PerHeadMean(1, 2)
    m.update(torch.tensor([[[1.0, 2.0]]]))
    m.update(torch.tensor([[[3.0, 6.0], [5.0, 10.0]]]))
    assert torch.allclose(m.compute(), torch.tensor([[3.0, 6.0]]))


def test_learned_sink_mass():
    sink_mass = torch.full((2, 3, 5), 0.25)
    sink_mass[:, 1] = 0.0
    assert torch.allclose(learned_sink_mass(sink_mass), torch.tensor([[0.25, 0.0, 0.25]] * 2))


def test_value_norm_ratio():
    v = torch.ones(1, 2, 4, 8)
    v[:, :, 0] *= 0.1  # first-token value norm 0.1 × the others
    expected = 0.1 / ((0.1 + 3) / 4)
    assert torch.allclose(value_norm_ratio(v), torch.full((1, 2), expected))


def test_gate_stats_mean_share_below_and_histogram():
    gate = torch.full((2, 1, 4, 3, 2), 0.9)  # (L, B, S, H, D)
    gate[0, :, :2] = 0.05  # layer 0: half the tokens closed
    gate[1, ..., 0, :] = 0.05  # layer 1: head 0 closed
    m = GateStats(num_layers=2, num_heads=3, bins=10)
    m.update(gate)
    out = m.compute()
    assert torch.allclose(out["mean"], torch.tensor([[0.475] * 3, [0.05, 0.9, 0.9]]))
    assert torch.allclose(out["below"], torch.tensor([[0.5] * 3, [1.0, 0.0, 0.0]]))
    assert out["hist"][0, 0] == 12 and out["hist"][0, 9] == 12 and out["hist"][0].sum() == 24
    assert out["hist"][1, 0] == 8 and out["hist"][1, 9] == 16


def test_injected_massive_activation_found_with_count_and_dim():
    torch.manual_seed(0)
    h = torch.randn(2, 3, 16, 32)  # (L, B, S, C)
    h[1, :, 0, 7] = 5000.0  # layer 1, every sequence's first token, dim 7
    m = ResidualMagnitude()
    m.update(h)
    out = m.compute()
    assert out["massive_count"].tolist() == [0, 3]
    assert torch.nonzero(out["massive_dims"]).tolist() == [[1, 7]]
    assert out["massive_dims"][1, 7] == 3
    assert out["top"][1].tolist() == [5000.0] * 3
    assert torch.equal(out["top"][0], h[0].abs().flatten().topk(3).values)
    assert out["median"][0] == h[0].abs().flatten().median()


def test_massive_needs_both_thresholds():
    # 500 > 100 but < 1000 × median(|N(0,1)|) ≈ 674: not massive. Scaled to N(0, 0.1): massive.
    torch.manual_seed(0)
    h = torch.randn(1, 2, 16, 32)
    h[0, :, 0, 7] = 500.0
    m = ResidualMagnitude()
    m.update(h)
    assert m.compute()["massive_count"].reshape(-1).tolist() == [0]  # torchmetrics squeezes 1-element
    h2 = 0.1 * torch.randn(1, 2, 16, 32)
    h2[0, :, 0, 7] = 500.0
    h2[0, :, 3, 5] = 90.0  # over 1000 × median but under 100: not massive
    m2 = ResidualMagnitude()
    m2.update(h2)
    out = m2.compute()
    assert out["massive_count"].reshape(-1).tolist() == [2]
    assert torch.nonzero(out["massive_dims"][0]).flatten().tolist() == [7]


def test_residual_sink_dim_found_and_first_token_ignored():
    torch.manual_seed(0)
    h = torch.randn(1, 4, 32, 64)
    h[0, :, 1:, 3] = 20.0  # a dim that dominates on every non-first token
    h[0, :, 0, 9] = 1e4  # first-token massive activation: not a residual sink
    m = ResidualSinkDims(num_layers=1, width=64)
    m.update(h)
    dim_mean = m.compute()[0]
    assert math.isclose(float(dim_mean[3]), 20.0, rel_tol=1e-6)
    score, dims = residual_sink_dims(dim_mean)
    assert dims.tolist() == [3]
    assert 20 < float(score) < 40  # 20 / median(mean |N(0,1)|) ≈ 20 / 0.8


def test_no_sink_dims_on_isotropic_noise():
    torch.manual_seed(0)
    score, dims = residual_sink_dims(torch.randn(4096, 64).abs().mean(0))
    assert dims.numel() == 0 and float(score) < 1.2
