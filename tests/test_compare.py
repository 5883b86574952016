"""`sinkfree compare`: numbers, verdicts, figure and bad-input errors on synthetic CSVLogger run folders."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from sinkfree.cli import main
from sinkfree.compare import compare_main, default_labels, smooth

HEADER = ["epoch", "lr-AdamW", "sink/max_key_mass", "sink/max_key_mass/layer_0", "step", "test/loss", "train/loss", "val/loss"]


def make_run(root: Path, name: str, final_val: float, version: int = 0, steps: int = 100, val_every: int = 25,
             train_col: str = "train/loss", val_col: str = "val/loss") -> Path:
    """runs/<name>/version_<version>/metrics.csv as Lightning's CSVLogger writes it: one row per logging call,
    empty cells elsewhere; train loss every 10 steps, val loss every `val_every` ending at `final_val`."""
    run = root / name / f"version_{version}"
    run.mkdir(parents=True)
    header = [train_col if c == "train/loss" else val_col if c == "val/loss" else c for c in HEADER]
    rows = []
    for s in range(9, steps, 10):
        rows.append({"epoch": "0", "step": str(s), train_col: f"{final_val + 2.0 * (1 - s / steps):.6f}"})
        rows.append({"lr-AdamW": "0.001", "step": str(s)})
    for s in range(val_every - 1, steps, val_every):
        val = final_val + 1.0 * (1 - (s + 1) / steps)
        rows.append({"epoch": "0", "step": str(s), val_col: repr(val)})
    rows.append({"sink/max_key_mass": "0.1", "sink/max_key_mass/layer_0": "0.1", "step": str(steps - 1)})
    with open(run / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        w.writerows(rows)
    (run / "hparams.yaml").write_text("lr: 0.001\n")
    return run


@pytest.fixture
def runs(tmp_path: Path) -> dict[str, Path]:
    """dense seeds 0/1 (gap 0.4%), vsa 0.6% above dense-s0 (within 2 × gap), bad 3% above."""
    root = tmp_path / "runs"
    return {
        "s0": make_run(root, "dense", 2.0, version=0),
        "s1": make_run(root, "dense", 2.008, version=1),
        "vsa": make_run(root, "vsa", 2.012),
        "bad": make_run(root, "bad", 2.06),
    }


def run_compare(tmp_path: Path, *argv: str) -> tuple[int, dict]:
    js = tmp_path / "out" / "result.json"
    code = compare_main([*argv, "--out", str(tmp_path / "out"), "--json", str(js)])
    return code, json.loads(js.read_text()) if js.exists() else {}


def test_numbers_and_pass(tmp_path: Path, runs, capsys) -> None:
    code, res = run_compare(tmp_path, str(runs["s0"]), str(runs["s1"]), str(runs["vsa"]),
                            "--labels", "dense-s0", "dense-s1", "vsa", "--seed-pair", "0", "1")
    out = capsys.readouterr().out
    assert code == 0
    assert res["verdict"] == "PASS" and "verdict: PASS" in out
    r0, r1, rv = res["runs"]
    assert (r0["role"], r1["role"], rv["role"]) == ("baseline", "seed", "judged")
    assert r0["final_step"] == rv["final_step"] == 99 and res["steps_equal"]
    assert r0["value"] == pytest.approx(2.0) and rv["value"] == pytest.approx(2.012)
    assert res["seed_gap"] == pytest.approx(0.008 / 2.008)
    assert res["limit"] == pytest.approx(max(0.005, 2 * 0.008 / 2.008))
    assert rv["rel_diff"] == pytest.approx(0.006)
    assert rv["ratio_to_seed_gap"] == pytest.approx(0.006 / (0.008 / 2.008))
    assert rv["checks"] == {"limit": True}
    assert r0["train_metric"] == "train/loss" and "train curve: train/loss" in out
    assert "+0.600%" in out and "1.51×" in out  # signed relative difference, ratio to the seed gap
    png = Path(res["figure"][0])
    assert png.suffix == ".png" and png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    assert Path(res["figure"][1]).read_text().lstrip().startswith("<?xml")
    assert not [p for p in png.parent.iterdir() if p.name.startswith(".")]  # no temp files left


def test_fail_by_seed_gap_and_by_max_rel(tmp_path: Path, runs, capsys) -> None:
    # bad: 3% off, far beyond 2 × the 0.4% seed gap -> FAIL, exit status still 0
    code, res = run_compare(tmp_path, str(runs["s0"]), str(runs["s1"]), str(runs["vsa"]), str(runs["bad"]),
                            "--seed-pair", "0", "1")
    assert code == 0 and res["verdict"] == "FAIL"
    assert [r["pass"] for r in res["runs"][2:]] == [True, False]
    assert "verdict: FAIL (bad outside the limit)" in capsys.readouterr().out
    # --max-rel is required on top: vsa's 0.6% fails a 0.5% max-rel though within 2 × the seed gap
    code, res = run_compare(tmp_path, str(runs["s0"]), str(runs["s1"]), str(runs["vsa"]),
                            "--seed-pair", "0", "1", "--max-rel", "0.005")
    assert code == 0 and res["verdict"] == "FAIL"
    assert res["runs"][2]["checks"] == {"limit": True, "max_rel": False}
    # --tolerance is a floor: 5% lets bad (3%) through
    code, res = run_compare(tmp_path, str(runs["s0"]), str(runs["bad"]), "--tolerance", "0.05")
    assert res["verdict"] == "PASS" and res["seed_gap"] is None and res["limit"] == 0.05


def test_one_sided_passes_a_lower_loss_only(tmp_path: Path, runs, capsys) -> None:
    better = make_run(tmp_path / "runs", "better", 1.90)  # 5% below dense-s0: outside 2 × the seed gap and max-rel
    argv = [str(runs["s0"]), str(runs["s1"]), str(better), str(runs["bad"]), "--seed-pair", "0", "1",
            "--max-rel", "0.04"]
    _, two = run_compare(tmp_path, *argv)
    assert [r["pass"] for r in two["runs"][2:]] == [False, False] and not two["one_sided"]
    capsys.readouterr()
    _, one = run_compare(tmp_path, *argv, "--one-sided")
    out = capsys.readouterr().out
    assert one["one_sided"] and one["seed_gap"] == two["seed_gap"]  # the seed gap stays two-sided
    assert one["runs"][2]["checks"] == {"limit": True, "max_rel": True}  # lower: passes
    assert one["runs"][3]["checks"] == {"limit": False, "max_rel": True}  # 3% higher: still fails the limit
    assert one["verdict"] == "FAIL" and "one-sided" in out and "≤ +" in out


def test_parent_folder_takes_newest_version_and_labels(tmp_path: Path, runs, capsys) -> None:
    # runs/dense -> version_1 (the newest), compared against version_0 given explicitly
    code, res = run_compare(tmp_path, str(runs["s0"]), str(runs["s0"].parent), "--baseline", "1")
    assert code == 0
    assert res["runs"][1]["run"] == str(runs["s1"]) and res["runs"][1]["role"] == "baseline"
    assert [r["label"] for r in res["runs"]] == ["dense/version_0", "dense/version_1"]
    assert res["runs"][0]["rel_diff"] == pytest.approx(2.0 / 2.008 - 1)
    assert default_labels([Path("/a/runs/x/version_0"), Path("/b/runs/x/version_0")]) == \
        ["a/runs/x/version_0", "b/runs/x/version_0"]


def test_step_option_and_unequal_steps(tmp_path: Path, capsys) -> None:
    a = make_run(tmp_path / "runs", "a", 2.0, steps=100)
    b = make_run(tmp_path / "runs", "b", 2.0, steps=200)
    code, res = run_compare(tmp_path, str(a), str(b))
    assert code == 0 and not res["steps_equal"]
    assert "warning: the compared steps differ (a 99, b 199)" in capsys.readouterr().out
    code, res = run_compare(tmp_path, str(a), str(b), "--step", "99")
    assert res["steps_equal"] and res["runs"][1]["value"] == pytest.approx(2.0 + 0.5)


def test_underscore_columns_and_no_train_curve(tmp_path: Path, capsys) -> None:
    a = make_run(tmp_path / "runs", "a", 2.0, train_col="train_loss", val_col="val_loss")
    b = make_run(tmp_path / "runs", "b", 2.0, train_col="other", val_col="val_loss")
    code, res = run_compare(tmp_path, str(a), str(b), "--metric", "val_loss")
    out = capsys.readouterr().out
    assert code == 0 and res["verdict"] == "PASS"
    assert [r["train_metric"] for r in res["runs"]] == ["train_loss", None]
    assert "train curve: none found" in out and Path(res["figure"][0]).stat().st_size > 0


def test_nan_final_value_fails_and_json_is_strict(tmp_path: Path, capsys) -> None:
    a = make_run(tmp_path / "runs", "a", 2.0)
    b = make_run(tmp_path / "runs", "b", 2.0)
    text = (b / "metrics.csv").read_text().replace(",2.0\n", ",nan\n")
    (b / "metrics.csv").write_text(text)
    code, res = run_compare(tmp_path, str(a), str(b))
    assert code == 0 and res["verdict"] == "FAIL" and res["runs"][1]["value"] == "nan"
    json.loads((tmp_path / "out" / "result.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    # a diverged seed (nan) gives no limit: every judged run fails
    c = make_run(tmp_path / "runs", "c", 2.0)
    code, res = run_compare(tmp_path, str(a), str(b), str(c), "--seed-pair", "0", "1")
    assert code == 0 and res["seed_gap"] == "nan" and res["verdict"] == "FAIL"


def test_smooth() -> None:
    assert smooth([1.0, 3.0, 5.0, 7.0], 2).tolist() == [1.0, 2.0, 4.0, 6.0]
    assert smooth([1.0, 3.0], 1) == [1.0, 3.0]


@pytest.mark.parametrize("case, expected", [
    ("missing", "RUN {tmp}/runs/nope: no such folder"),
    ("no_csv", "no metrics.csv in it and no version_N folders"),
    ("metric", "--metric val/los: not a column of {tmp}/runs/dense/version_0/metrics.csv (did you mean "
               "val/loss?); columns with values: epoch, lr-AdamW, sink/max_key_mass, train/loss, val/loss (and 1 "
               "per-layer columns)"),
    ("empty_metric", "--metric test/loss: its column in {tmp}/runs/dense/version_0/metrics.csv is empty"),
    ("labels", "--labels: 1 labels for 2 runs"),
    ("baseline", "--baseline 5: out of range for 2 runs"),
    ("seed_pair", "--seed-pair 0 0: name two different runs"),
    ("one_run", "give at least two runs"),
    ("step", "--step 3: "),
    ("not_number", "column val/loss: 'abc' is not a number"),
])
def test_bad_input_is_one_clear_line(tmp_path: Path, runs, capsys, case: str, expected: str) -> None:
    s0, s1 = str(runs["s0"]), str(runs["s1"])
    (tmp_path / "empty").mkdir()
    if case == "not_number":
        p = runs["s1"] / "metrics.csv"
        p.write_text(p.read_text().replace(",2.008\n", ",abc\n"))
    argv = {
        "missing": [s0, str(tmp_path / "runs" / "nope")],
        "no_csv": [s0, str(tmp_path / "empty")],
        "metric": [s0, s1, "--metric", "val/los"],
        "empty_metric": [s0, s1, "--metric", "test/loss"],
        "labels": [s0, s1, "--labels", "x"],
        "baseline": [s0, s1, "--baseline", "5"],
        "seed_pair": [s0, s1, "--seed-pair", "0", "0"],
        "one_run": [s0],
        "step": [s0, s1, "--step", "3"],
        "not_number": [s0, s1],
    }[case]
    code, res = run_compare(tmp_path, *argv)
    err = capsys.readouterr().err
    assert code == 2 and not res
    assert err.count("\n") == 1 and err.startswith("sinkfree compare: error: ")
    assert expected.format(tmp=tmp_path) in err, err


def test_dispatcher_and_help(tmp_path: Path, runs, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "compare" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["compare", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for opt in ("--metric", "--labels", "--baseline", "--seed-pair", "--tolerance", "--max-rel", "--step",
                "--train-metric", "--smooth", "--out", "--json"):
        assert opt in out
    with pytest.raises(SystemExit) as e:  # through the dispatcher: error line, exit 2, no traceback
        main(["compare", str(runs["s0"]), str(tmp_path / "nope")])
    assert e.value.code == 2 and "no such folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["compare", str(runs["s0"]), str(runs["s1"]), "--out", str(tmp_path / "o")])
    assert e.value.code == 0 and "verdict: PASS" in capsys.readouterr().out  # 0.4% apart, tolerance 0.5%
