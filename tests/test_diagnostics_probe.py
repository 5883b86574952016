"""`collect` / `compute_stats` on a small fake model that follows the contract, and on the real LLM."""
import math

import pytest
import torch
from torch import nn

from sinkfree.diagnostics.probe import SinkStats, collect, compute_stats, probe_model


class FakeAttention(nn.Module):
    """Causal attention with the contract's `capture` hook, optional learned sink and elementwise gate."""

    def __init__(self, c, h, sink=None, gate=False):
        super().__init__()
        self.h, self.d = h, c // h
        self.qkv = nn.Linear(c, 3 * c)
        self.o_proj = nn.Linear(c, c)
        self.gate_proj = nn.Linear(c, c) if gate else None
        self.sink = None if sink is None else nn.Parameter(torch.full((h,), float(sink)))
        self.capture = None
        self.force_probs = None  # tests may pin the attention pattern

    def forward(self, x):
        b, s, c = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.h, self.d).permute(2, 0, 3, 1, 4)  # (B, H, S, D)
        z = q @ k.transpose(-1, -2) / math.sqrt(self.d)
        z = z.masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), float("-inf"))
        sink_mass = None
        if self.sink is not None:
            z = torch.cat([z, self.sink.view(1, -1, 1, 1).expand(b, -1, s, 1)], -1)
            p = z.softmax(-1)
            p, sink_mass = p[..., :-1], p[..., -1]
        else:
            p = z.softmax(-1)
        if self.force_probs is not None:
            p = self.force_probs[:s, :s].expand(b, self.h, s, s)
        out = (p @ v).transpose(1, 2)  # (B, S, H, D)
        gate = None
        if self.gate_proj is not None:
            gate = torch.sigmoid(self.gate_proj(x)).view(b, s, self.h, self.d)
            out = out * gate
        if self.capture is not None:
            self.capture.update(probs=p, sink_mass=sink_mass, gate=gate, v=v)
        return self.o_proj(out.reshape(b, s, c))


class FakeBlock(nn.Module):
    def __init__(self, c, h, **kw):
        super().__init__()
        self.attn_norm, self.attn = nn.RMSNorm(c), FakeAttention(c, h, **kw)
        self.mlp_norm, self.mlp = nn.RMSNorm(c), nn.Sequential(nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c))
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        x = x + self.drop(self.attn(self.attn_norm(x)))
        return x + self.mlp(self.mlp_norm(x))


class FakeLLM(nn.Module):
    """Follows docs/contracts.md: `layers` of blocks with `attn_norm`/`attn`, a final `norm`."""

    def __init__(self, vocab=50, c=16, h=2, n_layer=3, **kw):
        super().__init__()
        self.embed = nn.Embedding(vocab, c)
        self.layers = nn.ModuleList(FakeBlock(c, h, **kw) for _ in range(n_layer))
        self.norm = nn.RMSNorm(c)
        self.lm_head = nn.Linear(c, vocab)

    def forward(self, idx):
        x = self.embed(idx)
        for block in self.layers:
            x = block(x)
        return self.lm_head(self.norm(x))


def test_collect_restores_model_state_and_matches_manual_forward():
    torch.manual_seed(0)
    model = FakeLLM(sink=0.0, gate=True)
    model.train()
    model.layers[1].mlp.eval()  # a mixed train/eval state must come back as it was
    ids = torch.randint(0, 50, (2, 12))
    probes = collect(model, ids, map_layers=[-1])

    assert model.training and model.layers[0].drop.training and not model.layers[1].mlp.training
    assert all(b.attn.capture is None for b in model.layers)
    assert all(not b._forward_hooks for b in model.layers)
    assert len(probes) == 3
    model.eval()
    with torch.no_grad():
        x = model.embed(ids)
        for i, block in enumerate(model.layers):
            x = block(x)
            assert torch.allclose(probes[i].resid, x)
    p = probes[2]
    assert p.first_token.shape == (2, 2) and p.sink_mass.shape == (2, 2) and p.value_ratio.shape == (2, 2)
    assert p.gate.shape == (2, 12, 2, 8) and p.attn_map.shape == (2, 12, 12)
    assert probes[0].attn_map is None
    assert torch.equal(probes[0].norm_weight, model.layers[1].attn_norm.weight)
    assert torch.equal(probes[2].norm_weight, model.norm.weight)


def test_collect_cleans_up_after_an_error():
    model = FakeLLM()
    model.train()
    with pytest.raises(IndexError):
        collect(model, torch.full((1, 4), 99))  # out of the vocabulary
    assert model.training and all(b.attn.capture is None and not b._forward_hooks for b in model.layers)


def test_one_hot_first_token_model_gives_rows_of_one():
    torch.manual_seed(0)
    model = FakeLLM(n_layer=2)
    s = 10
    probs = torch.zeros(s, s)
    probs[:, 0] = 1.0
    for b in model.layers:
        b.attn.force_probs = probs
    rows = compute_stats(*probe_model(model, torch.randint(0, 50, (3, s)), short_len=4), step=7)
    get = {(r.layer, r.head, r.metric): r.value for r in rows}
    assert all(r.step == 7 for r in rows)
    for key in [(-1, -1, "first_token_mass"), (-1, -1, "sink_rate"), (-1, -1, "sink_rate_64"),
                (0, 1, "first_token_mass"), (1, -1, "sink_rate"), (-1, -1, "max_key_mass")]:
        assert get[key] == pytest.approx(1.0)
    assert "learned_sink_mass" not in {r.metric for r in rows} and "gate_mean" not in {r.metric for r in rows}


def test_minus_inf_learned_sink_gives_zero_sink_mass():
    torch.manual_seed(0)
    rows = compute_stats(collect(FakeLLM(sink=float("-inf")), torch.randint(0, 50, (2, 8))))
    masses = [r.value for r in rows if r.metric == "learned_sink_mass"]
    assert len(masses) == 3 * 2 + 3 + 1 and all(m == 0.0 for m in masses)
    rows = compute_stats(collect(FakeLLM(sink=20.0), torch.randint(0, 50, (2, 8))))
    assert next(r.value for r in rows if r.metric == "learned_sink_mass" and r.layer == -1) > 0.99


def test_stats_rows_cover_every_metric_with_gate_and_sink():
    torch.manual_seed(0)
    model = FakeLLM(sink=0.0, gate=True)
    with torch.no_grad():
        model.layers[0].mlp[2].bias[5] = 300.0  # a residual-sink dim from layer 0 on
        model.layers[2].attn_norm.weight[5] = 0.01  # ... that the next norm scales down
    probe, short = probe_model(model, torch.randint(0, 50, (2, 16)), map_layers=[0, 2], short_len=8)
    stats = SinkStats(probe, map_layers=[0, 2])
    stats.update(probe, short)
    results = stats.compute()
    rows = stats.rows(results, step=3)
    metrics = {r.metric for r in rows}
    assert metrics >= {"first_token_mass", "sink_rate", "sink_rate_64", "max_key_mass", "learned_sink_mass",
                       "value_norm_ratio", "gate_mean", "gate_below_0.1", "resid_max", "resid_top2",
                       "resid_top3", "resid_median", "resid_mact", "massive_count", "resid_sink_score",
                       "resid_sink_dim_count", "resid_sink_dim", "resid_sink_dim_weight", "norm_weight_median"}
    sink_dims = {(r.layer, r.head) for r in rows if r.metric == "resid_sink_dim"}
    assert (1, 5) in sink_dims and (0, 5) in sink_dims
    weight = [r.value for r in rows if r.metric == "resid_sink_dim_weight" and r.layer == 1 and r.head == 5]
    assert weight == [pytest.approx(0.01)]
    arrays = stats.arrays(results, step=3)
    assert arrays["attn_maps"].shape == (2, 16, 16) and list(arrays["attn_map_layers"]) == [0, 2]
    assert arrays["gate_hist"].shape == (3, 50) and arrays["resid_dim_mean_abs"].shape == (3, 16)
    assert arrays["gate_hist"].sum() == 3 * 2 * 16 * 16


def test_collect_on_real_llm_with_gate_and_sink():
    llm = pytest.importorskip("sinkfree.models.llm")
    torch.manual_seed(0)
    cfg = llm.LLMConfig(vocab_size=64, n_layer=2, n_embd=32, n_head=4, n_kv_head=2, block_size=64,
                        attn_gate="elementwise", attn_sink="learnable")
    model = llm.LLM(cfg)
    model.train()
    ids = torch.randint(0, 64, (2, 16))
    probes = collect(model, ids, map_layers=[1])
    assert model.training
    assert all(m.capture is None for m in model.modules() if hasattr(m, "capture"))
    assert len(probes) == 2
    p = probes[1]
    assert p.first_token.shape == (2, 4) and p.sink_mass.shape == (2, 4) and p.value_ratio.shape == (2, 2)
    assert p.gate.shape == (2, 16, 4, 8) and p.resid.shape == (2, 16, 32) and p.attn_map.shape == (2, 16, 16)
    # probabilities over real keys plus the sink sum to one on every query row
    full = torch.ones(2, 4)
    assert torch.all(p.first_token <= full) and torch.all(p.sink_mass > 0)
    rows = compute_stats(probes, step=1)
    assert {"gate_mean", "learned_sink_mass", "value_norm_ratio"} <= {r.metric for r in rows}


def test_preaffine_scale_reported_at_residual_sink_dims():
    llm = pytest.importorskip("sinkfree.models.llm")
    torch.manual_seed(0)
    cfg = llm.LLMConfig(vocab_size=64, n_layer=2, n_embd=32, n_head=4, block_size=64, residual_sink="preaffine")
    model = llm.LLM(cfg)
    with torch.no_grad():
        model.embed.weight[:, 5] = 50.0  # dim 5 dominates every token's residual stream
        model.layers[1].attn_norm.pre_scale[5] = 0.02  # ... and the next PreAffine λ absorbs it
    rows = compute_stats(collect(model, torch.randint(0, 64, (2, 16))))
    get = {(r.layer, r.head, r.metric): r.value for r in rows}
    assert get[(0, 5, "resid_sink_dim_prescale")] == pytest.approx(0.02)
    assert get[(0, -1, "norm_prescale_ratio")] == pytest.approx(1.0)  # |λ| max/median: 1 vs 1
    assert get[(1, 5, "resid_sink_dim_prescale")] == pytest.approx(1.0)  # the final norm's λ is untouched
    plain = compute_stats(collect(llm.LLM(llm.LLMConfig(vocab_size=64, n_layer=1, n_embd=32, n_head=4)),
                                  torch.randint(0, 64, (1, 8))))
    assert "norm_prescale_ratio" not in {r.metric for r in plain}
