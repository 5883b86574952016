"""SinkMonitor in a tiny CPU Lightning run, plots from its output, and the `sinks` command line."""
import csv

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from test_diagnostics_probe import FakeLLM

from sinkfree.diagnostics import SinkMonitor, sinks_main
from sinkfree.diagnostics.monitor import CSV_HEADER, append_rows, save_arrays, scalar_name
from sinkfree.diagnostics.plots import plot_run
from sinkfree.diagnostics.probe import Row, SinkStats, probe_model

VOCAB = 50


class TinyTask(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = FakeLLM(VOCAB, c=16, h=2, n_layer=3, sink=0.0, gate=True)

    def training_step(self, batch, _):
        logits = self.model(batch[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


class TinyData(L.LightningDataModule):
    def __init__(self):
        super().__init__()
        self.probe_calls = []

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        return torch.utils.data.DataLoader(torch.randint(0, VOCAB, (12, 17), generator=g), batch_size=2)

    def probe_batch(self, num_sequences=8, seq_len=512):
        self.probe_calls.append((num_sequences, seq_len))
        ids = torch.randint(1, VOCAB, (num_sequences, seq_len), generator=torch.Generator().manual_seed(1))
        ids[:, 0] = 0  # BOS
        return ids


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_monitor_writes_rows_logs_scalars_and_maps(tmp_path):
    torch.manual_seed(0)
    dm = TinyData()
    monitor = SinkMonitor(every_n_steps=2, num_sequences=3, seq_len=16, layers_for_maps=[0, -1], short_len=8)
    trainer = L.Trainer(max_steps=5, logger=CSVLogger(tmp_path), callbacks=[monitor], accelerator="cpu",
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        accumulate_grad_batches=2)
    task = TinyTask()
    trainer.fit(task, datamodule=dm)

    stats = tmp_path / "lightning_logs" / "version_0" / "sinks" / "stats.csv"
    rows = read_rows(stats)
    assert tuple(rows[0]) == CSV_HEADER and sum(r == list(CSV_HEADER) for r in rows) == 1
    steps = sorted({int(r[0]) for r in rows[1:]})
    assert steps == [0, 2, 4, 5]  # start, every 2 steps (once despite accumulation), end
    assert dm.probe_calls == [(3, 16)]  # fixed probe batch, fetched once
    assert task.model.training and all(b.attn.capture is None for b in task.model.layers)
    metrics = {r[3] for r in rows[1:]}
    assert {"first_token_mass", "sink_rate", "sink_rate_64", "learned_sink_mass", "gate_mean", "resid_max",
            "massive_count", "resid_sink_score", "value_norm_ratio"} <= metrics

    logged = read_rows(tmp_path / "lightning_logs" / "version_0" / "metrics.csv")
    header = logged[0]
    for key in ("sink/first_token_mass", "sink/sink_rate", "sink/first_token_mass/layer_2", "resid/max",
                "resid/massive_count", "resid/sink_score/layer_0", "sink/gate_mean", "sink/probe_seconds"):
        assert key in header, key
    with np.load(stats.parent / "last_probe.npz") as z:
        assert int(z["step"]) == 5 and list(z["attn_map_layers"]) == [0, 2]
        assert z["attn_maps"].shape == (2, 16, 16) and z["gate_hist"].shape == (3, 50)
        assert np.allclose(np.triu(z["attn_maps"][0], 1), 0)  # causal
    assert monitor.probe_seconds > 0


def test_monitor_without_probe_batch_is_a_clear_error(tmp_path):
    class NoProbe(L.LightningDataModule):
        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.randint(0, VOCAB, (4, 9)), batch_size=2)

    trainer = L.Trainer(max_steps=1, logger=False, callbacks=[SinkMonitor()], accelerator="cpu",
                        enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="probe_batch"):
        trainer.fit(TinyTask(), datamodule=NoProbe())


def test_scalar_names():
    assert scalar_name(Row(0, -1, -1, "first_token_mass", 0.5)) == "sink/first_token_mass"
    assert scalar_name(Row(0, 3, -1, "resid_top2", 0.5)) == "resid/top2/layer_3"
    assert scalar_name(Row(0, 3, -1, "massive_count", 2)) == "resid/massive_count/layer_3"
    assert scalar_name(Row(0, 3, 1, "first_token_mass", 0.5)) is None
    assert scalar_name(Row(0, 3, -1, "resid_sink_dim", 0.5)) is None


def synthetic_run(run_dir):
    """Three probes of a fake model whose residual sink and first-token attention grow with the step."""
    torch.manual_seed(0)
    model = FakeLLM(VOCAB, c=32, h=2, n_layer=4, sink=0.0, gate=True)
    ids = torch.randint(0, VOCAB, (2, 24))
    path = run_dir / "sinks" / "stats.csv"
    for step in (0, 100, 200):
        with torch.no_grad():
            for block in model.layers:
                block.mlp[2].bias[7] = 0.5 * step
        probe, short = probe_model(model, ids, [0, 3], short_len=8)
        stats = SinkStats(probe, map_layers=[0, 3])
        stats.update(probe, short)
        results = stats.compute()
        append_rows(path, stats.rows(results, step))
        save_arrays(path.with_name("last_probe.npz"), stats.arrays(results, step))
    return path


PLOTS = ("first_token_mass_heatmap", "sink_rate", "learned_sink_mass_heatmap", "resid_magnitude_last", "token_norms",
         "resid_magnitude_steps", "resid_sink_stripes", "attention_maps", "gate_histograms")


def test_plots_produce_every_file(tmp_path):
    synthetic_run(tmp_path)
    files = plot_run(tmp_path)
    expected = {tmp_path / "sinks" / "plots" / f"{name}.{ext}" for name in PLOTS for ext in ("png", "svg", "csv")}
    assert set(files) == expected
    assert all(f.stat().st_size > 0 for f in expected)
    heat = read_rows(tmp_path / "sinks" / "plots" / "first_token_mass_heatmap.csv")
    assert heat[0] == ["layer", "step_0", "step_100", "step_200"] and len(heat) == 1 + 4
    stripes = read_rows(tmp_path / "sinks" / "plots" / "resid_sink_stripes.csv")
    assert float(stripes[4][1 + 7]) > 10 * float(stripes[4][1 + 6])  # dim 7 is the stripe at the last layer


def test_sinks_plot_command(tmp_path, capsys):
    synthetic_run(tmp_path)
    assert sinks_main(["plot", str(tmp_path), "--out", str(tmp_path / "figs")]) == 0
    assert (tmp_path / "figs" / "sink_rate.png").stat().st_size > 0
    assert "sink_rate.svg" in capsys.readouterr().out
    assert sinks_main(["plot", str(tmp_path / "missing")]) == 1
    assert "no sinks/stats.csv" in capsys.readouterr().err


def test_sinks_help_explains_every_option(capsys):
    for cmd in (["--help"], ["plot", "--help"], ["probe", "--help"]):
        with pytest.raises(SystemExit) as e:
            sinks_main(cmd)
        assert e.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--checkpoint", "--data", "--num-sequences", "--seq-len", "--no-bos", "--out", "--tokenizer",
                "--layers-for-maps", "RUN_DIR"):
        assert opt in out


def test_sinks_probe_on_a_lightning_checkpoint(tmp_path):
    pytest.importorskip("sinkfree.checkpoints.hf")
    llm = pytest.importorskip("sinkfree.models.llm")
    from sinkfree.data.tokenizer import save_atomic, train_tokenizer

    text = "\n".join(f"def f{i}(x):\n    return x * {i} + {i * i}  # sink probe line" for i in range(300))
    (tmp_path / "probe.txt").write_text(text)
    run = tmp_path / "run"
    save_atomic(train_tokenizer([text], 300, show_progress=False), run / "tokenizer.json")
    cfg = llm.LLMConfig(vocab_size=300, n_layer=2, n_embd=32, n_head=4, block_size=64, attn_gate="headwise",
                        attn_sink="learnable")
    model = llm.LLM(cfg)
    import dataclasses

    (run / "checkpoints").mkdir(parents=True)
    torch.save({"hyper_parameters": {"arch": dataclasses.asdict(cfg)}, "global_step": 3,
                "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}},
               run / "checkpoints" / "last.ckpt")
    out = tmp_path / "probe_out"
    argv = ["probe", "--checkpoint", str(run / "checkpoints" / "last.ckpt"), "--data", str(tmp_path / "probe.txt"),
            "--num-sequences", "3", "--seq-len", "40", "--out", str(out), "--device", "cpu"]
    assert sinks_main(argv) == 0
    rows = read_rows(out / "stats.csv")
    assert {"learned_sink_mass", "gate_mean", "sink_rate_64"} <= {r[3] for r in rows[1:]}
    import json

    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_sequences"] == 3 and summary["seq_len"] == 40 and summary["bos"] is True
    assert 0 <= summary["metrics"]["sink/first_token_mass"] <= 1
    assert (out / "plots" / "attention_maps.png").stat().st_size > 0
    assert (out / "plots" / "gate_histograms.svg").stat().st_size > 0
    assert sinks_main(argv) == 1  # refuses to mix two probes in one stats.csv
