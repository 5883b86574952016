"""The `sinkfree` command end to end on a CPU: fit, resume, predict, and clear errors on bad input."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import lightning as L

from sinkfree.cli import main
from sinkfree.cli_lightning import SinkfreeCLI

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "llm" / "tiny.yaml"


def tiny_overrides(tmp_path: Path, **extra: object) -> list[str]:
    """Shrink the tiny recipe further so a CLI test takes seconds, with its own cache and run folder."""
    opts = {
        "trainer.max_steps": 6,
        "trainer.val_check_interval": 3,
        "trainer.limit_val_batches": 2,
        "trainer.log_every_n_steps": 1,
        "trainer.enable_progress_bar": False,
        "trainer.logger.init_args.save_dir": str(tmp_path / "runs"),
        "model.arch.n_layer": 2,
        "model.arch.n_embd": 32,
        "model.arch.n_head": 2,
        "model.arch.n_kv_head": 1,
        "model.arch.vocab_size": 300,
        "model.warmup_steps": 2,
        "data.vocab_size": 300,
        "data.seq_len": 32,
        "data.batch_size": 4,
        "data.max_documents": 40,
        "data.cache_dir": str(tmp_path / "cache"),
    }
    opts.update(extra)
    return [f"--{k}={v}" for k, v in opts.items()]


def read_metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_fit_writes_run_folder_and_config_reproduces(tmp_path: Path) -> None:
    main(["fit", "--config", str(TINY), *tiny_overrides(tmp_path)])
    run = tmp_path / "runs" / "tiny" / "version_0"
    assert (run / "config.yaml").is_file()
    assert (run / "tokenizer.json").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file()
    rows = read_metrics(run)
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) >= 5 and all(torch.isfinite(torch.tensor(losses)))
    assert any(r.get("val/loss") for r in rows)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["init_args"]["arch"]["n_embd"] == 32
    # The saved config alone reproduces the run: same first losses.
    main(["fit", "--config", str(run / "config.yaml"), "--trainer.logger.init_args.version=again"])
    again = read_metrics(tmp_path / "runs" / "tiny" / "again")
    again_losses = [float(r["train/loss"]) for r in again if r.get("train/loss")]
    assert again_losses[:3] == pytest.approx(losses[:3], rel=1e-6)


class RecordBatches(L.Callback):
    """Keeps the token ids and loss of every training step."""

    def __init__(self) -> None:
        self.ids: dict[int, torch.Tensor] = {}
        self.loss: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step  # already incremented: this batch made step `step`
        self.ids[step] = batch["input_ids"].clone()
        self.loss[step] = float(outputs["loss"])


class DieAtStep(L.Callback):
    """Simulates a killed job: raises after step `step` finished (and its checkpoint was written)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


def _cli(tmp_path: Path, name: str) -> SinkfreeCLI:
    args = ["--config", str(TINY), *tiny_overrides(tmp_path, **{
        "trainer.max_steps": 8, "trainer.limit_val_batches": 0, "data.num_workers": 1,
        "trainer.logger.init_args.name": name,
    })]
    cli = SinkfreeCLI(args=args, run=False, subclass_mode_model=True, subclass_mode_data=True,
                      auto_configure_optimizers=False, save_config_callback=None)
    for cb in cli.trainer.callbacks:
        if isinstance(cb, L.pytorch.callbacks.ModelCheckpoint):
            cb._every_n_train_steps = 4
    return cli


def test_killed_and_resumed_run_sees_same_batches_and_loss(tmp_path: Path) -> None:
    ref = _cli(tmp_path, "ref")
    rec_ref = RecordBatches()
    ref.trainer.callbacks.append(rec_ref)
    ref.trainer.fit(ref.model, ref.datamodule)

    crashed = _cli(tmp_path, "crash")
    crashed.trainer.callbacks.append(DieAtStep(5))
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.trainer.fit(crashed.model, crashed.datamodule)
    ckpt = tmp_path / "runs" / "crash" / "version_0" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()

    resumed = _cli(tmp_path, "crash")
    rec = RecordBatches()
    resumed.trainer.callbacks.append(rec)
    resumed.trainer.fit(resumed.model, resumed.datamodule, ckpt_path=str(ckpt))
    assert sorted(rec.ids) == [5, 6, 7, 8]
    for step in rec.ids:
        assert torch.equal(rec.ids[step], rec_ref.ids[step]), f"different tokens at step {step}"
        assert rec.loss[step] == pytest.approx(rec_ref.loss[step], abs=1e-5)


def test_ckpt_path_last_continues_latest_run_folder(tmp_path: Path) -> None:
    main(["fit", "--config", str(TINY), *tiny_overrides(tmp_path, **{"trainer.max_steps": 3})])
    main(["fit", "--config", str(TINY), *tiny_overrides(tmp_path, **{"trainer.max_steps": 5}),
          "--ckpt_path", "last"])
    runs = sorted(p.name for p in (tmp_path / "runs" / "tiny").iterdir())
    assert runs == ["version_0"], runs
    steps = [int(r["step"]) for r in read_metrics(tmp_path / "runs" / "tiny" / "version_0") if r.get("train/loss")]
    assert max(steps) >= 4


def test_predict_generates_text(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    main(["fit", "--config", str(TINY), *tiny_overrides(tmp_path, **{"trainer.max_steps": 2})])
    run = tmp_path / "runs" / "tiny" / "version_0"
    main(["predict", "--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
          "--data.prompts=['def f(x):']", "--model.max_new_tokens=8", "--model.temperature=0.8",
          "--model.top_p=0.9"])
    out = capsys.readouterr().out
    assert "def f(x):" in out


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "sinkfree.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_help_at_every_level(tmp_path: Path) -> None:
    top = run_cli("--help", cwd=tmp_path)
    assert top.returncode == 0 and "fit" in top.stdout and "sinks" in top.stdout
    fit = run_cli("fit", "--config", str(TINY), "--help", cwd=tmp_path)
    assert fit.returncode == 0
    assert "--model.init_from" in fit.stdout or "init_from" in fit.stdout
    assert "--data.bos_at_doc_start" in fit.stdout or "bos_at_doc_start" in fit.stdout


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--model.arch.attn_gate=sideways"], "attn_gate"),
        (["--model.arch.n_embd=100", "--model.arch.n_head=3"], "n_head"),
        (["--data.data=/nonexistent/corpus.txt"], "data"),
        (["--model.no_such_option=1"], "no_such_option"),
        (["--trainer.logger.init_args.save_dir={tmp}/a_file/runs"], "not a writable folder"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path: Path, args: list[str], expected: str) -> None:
    (tmp_path / "a_file").write_text("not a folder")
    args = [a.format(tmp=tmp_path) for a in args]
    res = run_cli("fit", "--config", str(TINY), *tiny_overrides(tmp_path), *args, cwd=tmp_path)
    assert res.returncode != 0
    assert expected in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr


def test_malformed_yaml(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  class_path: sinkfree.tasks.CausalLM\n  init_args: [unclosed\n")
    res = run_cli("fit", "--config", str(bad), cwd=tmp_path)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "parsing config" in res.stderr and "line 3" in res.stderr


def test_unknown_verb(tmp_path: Path) -> None:
    res = run_cli("trian", cwd=tmp_path)
    assert res.returncode == 2 and "unknown verb" in res.stderr


def _tokenizer_of_cli(tmp_path: Path, *extra: str) -> str | None:
    args = ["--config", str(TINY), *tiny_overrides(tmp_path), *extra]
    cli = SinkfreeCLI(args=args, run=False, subclass_mode_model=True, subclass_mode_data=True,
                      auto_configure_optimizers=False, save_config_callback=None)
    return cli.datamodule.tokenizer_path


def test_init_from_folder_supplies_the_default_tokenizer(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "tokenizer.json").write_text("{}")  # only its presence matters until the data is set up
    with caplog.at_level("INFO", logger="sinkfree"):
        assert _tokenizer_of_cli(tmp_path, f"--model.init_from={ckpt}") == str(ckpt / "tokenizer.json")
    assert "data.tokenizer not set" in caplog.text
    # a file inside such a folder (a .safetensors, a .ckpt) finds the tokenizer beside it
    assert _tokenizer_of_cli(tmp_path, f"--model.init_from={ckpt / 'model.safetensors'}") == str(ckpt / "tokenizer.json")
    # an explicit data.tokenizer wins; no tokenizer.json leaves it unset; no init_from changes nothing
    other = tmp_path / "other.json"
    other.write_text("{}")
    assert _tokenizer_of_cli(tmp_path, f"--model.init_from={ckpt}", f"--data.tokenizer={other}") == str(other)
    assert _tokenizer_of_cli(tmp_path, f"--model.init_from={tmp_path / 'cache'}") is None
    assert _tokenizer_of_cli(tmp_path) is None
