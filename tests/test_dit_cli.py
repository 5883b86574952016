"""`sinkfree fit` / `predict` with the DiT recipes, in-process on the CPU, and their clear errors."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml

from sinkfree.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "dit" / "tiny.yaml"


@pytest.fixture(autouse=True)
def _reference_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # VSA's fine stage through its PyTorch reference


def tiny_vsa_recipe(tmp_path: Path) -> Path:
    """The tiny recipe shrunk to seconds, with VSA and the sparsity ramp."""
    cfg = yaml.safe_load(TINY.read_text())
    cfg["trainer"].update(max_steps=4, val_check_interval=2, limit_val_batches=1, log_every_n_steps=1,
                          enable_progress_bar=False, enable_model_summary=False)
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "runs")
    cfg["trainer"]["callbacks"].insert(0, {"class_path": "sinkfree.tasks.VSASparsityRamp",
                                           "init_args": {"rate": 0.25, "every_n_steps": 2}})
    cfg["model"]["init_args"]["arch"].update(n_layer=1, n_embd=64, n_head=1, attn_backend="vsa",
                                             attn_gate="elementwise", attn_sink="learnable")
    cfg["model"]["init_args"].update(sample_steps=2, val_samples=2)
    cfg["data"]["init_args"].update(frames=4, size=16, batch_size=2, val_size=2, predict_samples=3)
    path = tmp_path / "tiny-vsa.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_fit_and_predict_write_run_folder_and_samples(tmp_path: Path, capsys) -> None:
    main(["fit", "--config", str(tiny_vsa_recipe(tmp_path))])
    run = tmp_path / "runs" / "dit-tiny" / "version_0"
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len([r for r in rows if r.get("train/loss")]) == 4 and any(r.get("val/loss") for r in rows)
    assert [float(r["vsa/sparsity"]) for r in rows if r.get("vsa/sparsity")] == [0.0, 0.0, 0.25, 0.25]
    assert (run / "samples" / "step_0000004.gif").is_file()
    main(["predict", "--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])
    assert (run / "samples" / "predict_000.gif").is_file()
    assert "predict_000.gif" in capsys.readouterr().out


def test_bad_vsa_head_dim_is_one_line_error(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(TINY), "--model.arch.attn_backend=vsa", "--model.arch.n_head=4",
              f"--trainer.logger.init_args.save_dir={tmp_path}"])
    assert exc.value.code == 2
    assert "head_dim=32 is not supported by attn_backend='vsa'" in capsys.readouterr().err


def test_bench_vsa_needs_a_gpu(capsys) -> None:
    import torch

    from sinkfree.bench import bench_main

    if torch.cuda.is_available():
        pytest.skip("has a GPU: the benchmark would run")
    assert bench_main(["vsa", "--grid", "8,8,8"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
