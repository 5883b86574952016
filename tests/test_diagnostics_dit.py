"""Sink diagnostics of bidirectional models (DiTs): max-key metrics instead of first-token ones, probe
inputs as a dict, `SinkMonitor` in the tiny DiT recipe, `sinks plot` / `sinks probe` on a DiT run."""
import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from test_diagnostics_probe import FakeLLM

from sinkfree.attention import AttentionSpec
from sinkfree.diagnostics import sinks_main
from sinkfree.diagnostics.metrics import HighNormTokens, SinkRate, max_key_mass
from sinkfree.diagnostics.probe import SinkStats, collect, compute_stats, probe_model, slice_inputs

ROOT = Path(__file__).resolve().parents[1]
FIRST_TOKEN_METRICS = {"first_token_mass", "sink_rate", "sink_rate_64", "value_norm_ratio"}
BIDIRECTIONAL_METRICS = {"max_key_mass", "max_key_rate", "high_norm_tokens", "token_norm_ratio", "resid_max",
                         "resid_top2", "resid_top3", "resid_median", "massive_count", "resid_sink_score"}


def test_all_queries_on_one_key_give_max_key_mass_one():
    s = 6
    one_key = torch.zeros(2, 3, s, s)
    one_key[..., 4] = 1.0  # every query of every head puts all its attention on key 4
    assert torch.equal(max_key_mass(one_key), torch.ones(2, 3))
    assert torch.allclose(max_key_mass(torch.full((1, 1, s, s), 1 / s)), torch.tensor(1 / s))
    rate = SinkRate(1, 3)
    rate.update(max_key_mass(one_key)[None])
    assert torch.equal(rate.compute(), torch.ones(1, 3))


def bidirectional_fake(force_key=None):
    """The fake LLM of the probe tests declared non-causal; optionally every query attends one key."""
    torch.manual_seed(0)
    model = FakeLLM(c=16, h=2, n_layer=2, gate=True)
    for block in model.layers:
        block.attn.spec = AttentionSpec("eager", causal=False)
        if force_key is not None:
            probs = torch.zeros(12, 12)
            probs[:, force_key] = 1.0
            block.attn.force_probs = probs
    return model


def test_one_key_model_rows_are_one_and_have_no_first_token_metrics():
    rows = compute_stats(collect(bidirectional_fake(force_key=5), torch.randint(0, 50, (3, 12))))
    metrics = {r.metric for r in rows}
    assert not metrics & FIRST_TOKEN_METRICS
    for metric in ("max_key_mass", "max_key_rate"):
        values = [r.value for r in rows if r.metric == metric]
        assert len(values) == 2 * 2 + 2 + 1 and values == pytest.approx([1.0] * len(values)), metric


def test_high_norm_tokens_counts_the_injected_token():
    h = torch.randn(2, 3, 10, 8)  # (L, B, S, C)
    h[1, 2, 7] *= 50.0  # one high-norm token in layer 1
    metric = HighNormTokens()
    metric.update(h)
    out = metric.compute()
    assert out["count"].tolist() == [0, 1] and out["ratio"][1] > 4 * out["ratio"][0]


@pytest.mark.parametrize("backend", ["sdpa", "vsa"])
def test_collect_on_tiny_dit(backend):
    from sinkfree.models.dit import DiT, DiTConfig

    torch.manual_seed(0)
    model = DiT(DiTConfig(n_layer=2, n_embd=64, n_head=1, num_classes=3, attn_backend=backend,
                          attn_gate="headwise", attn_sink="learnable"))
    with torch.no_grad():  # adaLN-Zero starts every block as the identity: open the gates
        for block in model.layers:
            block.adaln.bias.normal_()
    model.train()
    inputs = {"x": torch.randn(3, 3, 4, 16, 16), "t": torch.full((3,), 0.5), "y": torch.tensor([0, 1, 2])}
    probe, short = probe_model(model, inputs, map_layers=[0, -1])
    assert short is probe and not probe[0].causal  # no 64-token rerun for a bidirectional model
    assert model.training and all(b.attn.capture is None for b in model.layers)
    stats = SinkStats(probe, map_layers=[0, -1])
    stats.update(probe, short)
    results = stats.compute()
    rows = stats.rows(results, step=7)
    metrics = {r.metric for r in rows}
    assert BIDIRECTIONAL_METRICS | {"gate_mean", "learned_sink_mass"} <= metrics
    assert not metrics & FIRST_TOKEN_METRICS
    mass = [r.value for r in rows if r.metric == "max_key_mass"]
    assert all(1 / 256 - 1e-6 <= v <= 1 for v in mass)
    arrays = stats.arrays(results, step=7)
    assert arrays["attn_maps"].shape == (2, 256, 256) and not arrays["causal"]
    half = slice_inputs(inputs, slice(0, None, 2))
    assert half["x"].shape[0] == 2 and torch.equal(half["y"], torch.tensor([0, 2]))


def test_video_probe_batch_is_fixed_and_task_noises_it():
    from sinkfree.data.video import SyntheticVideoDataModule
    from sinkfree.models.dit import DiTConfig
    from sinkfree.tasks.flow import PROBE_T, RectifiedFlow

    dm = SyntheticVideoDataModule(frames=2, size=8, batch_size=2, train_size=4, val_size=3)
    batch = dm.probe_batch(5, 512)
    assert batch["x"].shape == (5, 3, 2, 8, 8) and torch.equal(batch["x"][3], batch["x"][0])  # cycles
    assert torch.equal(batch["x"], dm.probe_batch(5)["x"])
    task = RectifiedFlow(arch=DiTConfig(n_layer=1, n_embd=64, n_head=1, num_classes=6))
    task.configure_model()
    a, b = task.probe_inputs(batch), task.probe_inputs(batch)
    assert torch.equal(a["x"], b["x"]) and torch.equal(a["t"], torch.full((5,), PROBE_T))
    assert torch.equal(a["y"], batch["y"]) and not torch.equal(a["x"], batch["x"])
    task.model(**a)  # the keyword inputs the probe passes


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_tiny_dit_recipe_monitor_plots_and_probe(tmp_path, monkeypatch, capsys):
    from sinkfree.cli import main

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cfg = yaml.safe_load((ROOT / "recipes" / "dit" / "tiny.yaml").read_text())
    monitor = next(c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("SinkMonitor"))
    monitor["init_args"].update(every_n_steps=2, num_sequences=2)
    cfg["trainer"].update(max_steps=3, val_check_interval=3, limit_val_batches=1, log_every_n_steps=1,
                          enable_progress_bar=False, enable_model_summary=False)
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "runs")
    cfg["trainer"]["callbacks"] = [c for c in cfg["trainer"]["callbacks"] if "EMA" not in c["class_path"]]
    cfg["model"]["init_args"]["arch"].update(n_layer=2, n_embd=64, n_head=1, attn_gate="headwise")
    cfg["model"]["init_args"].update(val_samples=0)
    cfg["data"]["init_args"].update(frames=2, size=8, batch_size=2, val_size=2)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(cfg))
    main(["fit", "--config", str(recipe)])

    run = tmp_path / "runs" / "dit-tiny" / "version_0"
    rows = read_rows(run / "sinks" / "stats.csv")
    assert sorted({int(r["step"]) for r in rows}) == [0, 2, 3]  # start, every 2 steps, end
    metrics = {r["metric"] for r in rows}
    assert BIDIRECTIONAL_METRICS | {"gate_mean"} <= metrics and not metrics & FIRST_TOKEN_METRICS
    logged = read_rows(run / "metrics.csv")
    assert any(r.get("sink/max_key_mass") for r in logged) and any(r.get("resid/high_norm_tokens") for r in logged)

    assert sinks_main(["plot", str(run)]) == 0
    plots = run / "sinks" / "plots"
    for name in ("max_key_mass_heatmap", "max_key_rate", "resid_magnitude_last", "resid_magnitude_steps",
                 "token_norms", "resid_sink_stripes", "attention_maps", "gate_histograms"):
        assert (plots / f"{name}.png").stat().st_size > 0, name
    assert not (plots / "first_token_mass_heatmap.png").exists() and not (plots / "sink_rate.png").exists()
    heat = list(csv.reader(open(plots / "max_key_mass_heatmap.csv")))
    assert heat[0] == ["layer", "step_0", "step_2", "step_3"] and len(heat) == 1 + 2

    out = tmp_path / "probe"
    argv = ["probe", "--checkpoint", str(run / "checkpoints" / "last.ckpt"), "--out", str(out), "--device", "cpu",
            "--num-sequences", "3"]
    assert sinks_main(argv) == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kind"] == "dit" and summary["num_sequences"] == 3 and summary["seq_len"] == 2 * 4 * 4
    assert 0 < summary["metrics"]["sink/max_key_mass"] <= 1 and "sink/first_token_mass" not in summary["metrics"]
    assert (out / "plots" / "max_key_mass_heatmap.png").stat().st_size > 0
