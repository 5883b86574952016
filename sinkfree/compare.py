"""`sinkfree compare RUN [RUN ...]`: A/B quality comparison of run folders from their `metrics.csv`.

Reads Lightning CSVLogger files (one row per logging call, empty cells for the other columns), takes the
final value of a metric (default `val/loss`) in every run, prints a table of the relative differences to
a baseline run and, with `--seed-pair I J`, judges every other run against the gap between two seeds:

    seed gap  g = |m_I - m_J| / m_J
    limit     L = max(--tolerance, 2 g)            (--tolerance alone without --seed-pair)
    a run passes when |m - m_base| / m_base <= L   (and <= --max-rel when given)
    --one-sided: only a higher m counts (a loss: "no worse than"), i.e. (m - m_base) / m_base <= L

The verdict (PASS / FAIL) is printed and written to --json; the exit status is 0 whatever the verdict and
non-zero only for bad input. A figure (PNG + SVG + the CSV it plots) shows the metric against the step,
the metric relative to the baseline with the limit as a band, and the smoothed training loss.
Only numpy and matplotlib: no torch import, so the verb starts fast.
"""
from __future__ import annotations

import argparse
import csv
import difflib
import json
import math
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# Training-loss columns tried in order when --train-metric is not given (sinkfree tasks log `train/loss`).
TRAIN_CANDIDATES = ("train/loss", "train_loss", "train/loss_step", "train_loss_step", "loss",
                    "train/loss_epoch", "train_loss_epoch")


class CompareError(ValueError):
    """Bad input; the message is one line that names the option or argument at fault."""


@dataclass
class Run:
    path: Path  # the version folder that holds metrics.csv
    csv: Path
    label: str
    columns: list[str]
    metric: dict[int, float]  # step -> value
    train_metric: str | None = None
    train: dict[int, float] = field(default_factory=dict)
    step: int = -1  # the step compared
    value: float = math.nan  # the metric at that step


def resolve_run(arg: str) -> tuple[Path, Path]:
    """RUN argument -> (run folder, metrics.csv): a version folder, a parent (newest version_N), or the
    metrics.csv file itself."""
    p = Path(arg)
    if p.is_file():
        if p.name != "metrics.csv":
            raise CompareError(f"RUN {arg}: a file that is not metrics.csv; pass the run folder")
        return p.parent, p
    if not p.is_dir():
        raise CompareError(f"RUN {arg}: no such folder")
    if (p / "metrics.csv").is_file():
        return p, p / "metrics.csv"
    versions = sorted((int(m.group(1)), d) for d in p.iterdir()
                      if d.is_dir() and (m := re.fullmatch(r"version_(\d+)", d.name)))
    if not versions:
        raise CompareError(f"RUN {arg}: no metrics.csv in it and no version_N folders under it")
    newest = versions[-1][1]
    if not (newest / "metrics.csv").is_file():
        raise CompareError(f"RUN {arg}: its newest version {newest} has no metrics.csv (still starting, or "
                           f"pass an older version folder)")
    return newest, newest / "metrics.csv"


def _number(cell: str, what: str) -> float:
    try:
        return float(cell)
    except ValueError:
        raise CompareError(f"{what}: {cell!r} is not a number") from None


def read_metrics(path: Path) -> tuple[list[str], dict[str, dict[int, float]]]:
    """metrics.csv -> (header, {column: {step: value}}) over non-empty cells; a step logged twice (a
    resumed run) keeps its last value."""
    try:
        return _read_metrics(path)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise CompareError(f"RUN {path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None


def _read_metrics(path: Path) -> tuple[list[str], dict[str, dict[int, float]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        if "step" not in header:
            raise CompareError(f"RUN {path}: no `step` column (not a Lightning CSVLogger file?); columns: "
                               f"{', '.join(header) or 'none'}")
        series: dict[str, dict[int, float]] = {c: {} for c in header if c != "step"}
        for n, row in enumerate(reader, start=2):
            if not row.get("step"):
                continue
            step = int(_number(row["step"], f"RUN {path} line {n}, column step"))
            for col, values in series.items():
                cell = row.get(col)
                if cell not in (None, ""):
                    values[step] = _number(cell, f"RUN {path} line {n}, column {col}")
    return header, series


def _available(series: dict[str, dict[int, float]]) -> str:
    """The columns that have values, per-layer columns summarised, for an error message."""
    cols = sorted(c for c, v in series.items() if v)
    short = [c for c in cols if "/layer_" not in c]
    rest = len(cols) - len(short)
    return ", ".join(short) + (f" (and {rest} per-layer columns)" if rest else "") if cols else "none"


def load_run(arg: str, metric: str, train_metric: str | None, step: int | None) -> Run:
    path, csv_path = resolve_run(arg)
    header, series = read_metrics(csv_path)
    if not series.get(metric):
        if metric in header:
            why = f"its column in {csv_path} is empty (did that run log it yet?)"
        else:
            close = difflib.get_close_matches(metric, [c for c, v in series.items() if v], n=1)
            why = f"not a column of {csv_path}" + (f" (did you mean {close[0]}?)" if close else "")
        raise CompareError(f"--metric {metric}: {why}; columns with values: "
                           f"{_available(series)}")
    run = Run(path=path, csv=csv_path, label="", columns=header, metric=dict(sorted(series[metric].items())))
    if train_metric is not None:
        if not series.get(train_metric):
            raise CompareError(f"--train-metric {train_metric}: no values in {csv_path}; columns with values: "
                               f"{_available(series)}")
        run.train_metric = train_metric
    else:
        run.train_metric = next((c for c in TRAIN_CANDIDATES if series.get(c) and c != metric), None)
    if run.train_metric is not None:
        run.train = dict(sorted(series[run.train_metric].items()))
    steps = [s for s in run.metric if step is None or s <= step]
    if not steps:
        raise CompareError(f"--step {step}: {csv_path} has no {metric} at or before it (first at step "
                           f"{next(iter(run.metric))})")
    run.step = steps[-1]
    run.value = run.metric[run.step]
    return run


def default_labels(paths: list[Path]) -> list[str]:
    """`name` of runs/name/version_N when that is unique, name/version_N for versions of one name, else the
    shortest unique tails of the absolute paths (e.g. a/runs/name/version_0 and b/runs/name/version_0)."""
    def name(p: Path) -> str:
        return p.parent.name if re.fullmatch(r"version_\d+", p.name) else p.name

    names = [name(p) for p in paths]
    labels = [n if names.count(n) == 1 or n == p.name else f"{n}/{p.name}" for n, p in zip(names, paths)]
    if len(set(labels)) == len(labels):
        return labels
    parts = [p.resolve().parts for p in paths]
    for k in range(2, max(map(len, parts)) + 1):
        labels = ["/".join(q[-k:]) for q in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{i}:{p}" for i, p in enumerate(paths)]


def rel_diff(value: float, base: float) -> float:
    """(value - base) / |base|, signed; inf when base is 0 and value is not."""
    if base == 0:
        return 0.0 if value == 0 else math.copysign(math.inf, value)
    return (value - base) / abs(base)


def judge(runs: list[Run], metric: str, baseline: int, seed_pair: tuple[int, int] | None, tolerance: float,
          max_rel: float | None, one_sided: bool = False) -> dict:
    """The numbers and the verdict as a JSON-ready dict. one_sided: a value below the baseline's is within every
    limit (lower is better, e.g. a loss); the seed gap stays two-sided."""
    base = runs[baseline].value
    gap = None
    if seed_pair is not None:
        i, j = seed_pair
        gap = abs(rel_diff(runs[i].value, runs[j].value))
    limit = tolerance if gap is None else math.nan if math.isnan(gap) else max(tolerance, 2 * gap)
    rows = []
    for k, r in enumerate(runs):
        d = rel_diff(r.value, base)
        role = "baseline" if k == baseline else "seed" if seed_pair and k in seed_pair else "judged"
        row = {"label": r.label, "run": str(r.path), "metrics_csv": str(r.csv), "role": role,
               "final_step": r.step, "last_logged_step": next(reversed(r.metric)), "value": r.value,
               "rel_diff": d, "abs_rel_diff": abs(d), "train_metric": r.train_metric,
               "ratio_to_seed_gap": None if gap is None or k == baseline else
               (abs(d) / gap if gap > 0 or math.isnan(gap) else (0.0 if d == 0 else math.inf))}
        if role == "judged":
            judged_d = max(d, 0.0) if one_sided and not math.isnan(d) else abs(d)
            checks = {"limit": judged_d <= limit}  # False for nan
            if max_rel is not None:
                checks["max_rel"] = judged_d <= max_rel
            row["checks"] = checks
            row["pass"] = all(checks.values())
        rows.append(row)
    judged = [r for r in rows if r["role"] == "judged"]
    verdict = "n/a" if not judged else "PASS" if all(r["pass"] for r in judged) else "FAIL"
    steps = sorted({r.step for r in runs})
    return {"metric": metric, "baseline": baseline, "seed_pair": list(seed_pair) if seed_pair else None,
            "seed_gap": gap, "tolerance": tolerance, "max_rel": max_rel, "limit": limit, "one_sided": one_sided,
            "steps_equal": len(steps) == 1, "runs": rows, "verdict": verdict}


def _pct(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "-"
    if not math.isfinite(x):
        return str(x)
    return f"{100 * x:+.3f}%" if signed else f"{100 * x:.3f}%"


def format_report(result: dict, runs: list[Run]) -> str:
    metric, gap, limit = result["metric"], result["seed_gap"], result["limit"]
    lines = []
    for k, r in enumerate(runs):
        train = f"train curve: {r.train_metric}" if r.train_metric else "train curve: none found (looked for " \
            f"{', '.join(TRAIN_CANDIDATES)})"
        lines.append(f"[{k}] {r.label}: {r.csv} ({metric} at {len(r.metric)} steps; {train})")
    lines.append("")
    head = ["#", "run", "step", metric, "vs baseline", "× seed gap", "limit", "verdict"]
    body = []
    for k, row in enumerate(result["runs"]):
        ratio = row["ratio_to_seed_gap"]
        verdict = {"baseline": "baseline", "seed": "seed pair"}.get(row["role"]) or ("PASS" if row["pass"] else "FAIL")
        lim = "-"
        if row["role"] == "judged":
            sign = "+" if result.get("one_sided") else ""
            lim = "≤ " + sign + _pct(limit) + (f", ≤ {sign}{_pct(result['max_rel'])}" if result["max_rel"] is not None
                                               else "")
        body.append([str(k), row["label"], str(row["final_step"]), f"{row['value']:.6g}",
                     "-" if row["role"] == "baseline" else _pct(row["rel_diff"], signed=True),
                     "-" if ratio is None else f"{ratio:.2f}×", lim, verdict])
    widths = [max(len(c) for c in col) for col in zip(head, *body)]
    for cells in [head] + body:
        lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip())
    lines.append("")
    if gap is not None:
        i, j = result["seed_pair"]
        lines.append(f"seed gap: |{runs[i].label} - {runs[j].label}| / {runs[j].label} = {_pct(gap)}; "
                     f"limit = max(tolerance {_pct(result['tolerance'])}, 2 × seed gap {_pct(2 * gap)}) = "
                     f"{_pct(limit)}")
    else:
        lines.append(f"limit = tolerance {_pct(limit)} (no --seed-pair)")
    if result["max_rel"] is not None:
        if result.get("one_sided"):
            lines.append(f"also required: vs baseline ≤ +{_pct(result['max_rel'])} (--max-rel, one-sided)")
        else:
            lines.append(f"also required: |vs baseline| ≤ --max-rel {_pct(result['max_rel'])}")
    if result.get("one_sided"):
        lines.append("one-sided (--one-sided): only a value above the baseline counts; a lower one passes")
    if not result["steps_equal"]:
        steps = ", ".join(f"{r.label} {r.step}" for r in runs)
        lines.append(f"warning: the compared steps differ ({steps}); equal training steps make a fair A/B "
                     "(--step N compares at step N)")
    failed = [r["label"] for r in result["runs"] if r["role"] == "judged" and not r["pass"]]
    if result["verdict"] == "n/a":
        lines.append("verdict: n/a (no run besides the baseline and the seed pair to judge)")
    else:
        lines.append(f"verdict: {result['verdict']}" + (f" ({', '.join(failed)} outside the limit)" if failed else ""))
    return "\n".join(lines)


def _atomic(path: Path, write) -> Path:
    """Call write(tmp) on a temporary file beside `path`, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving mean over `window` points (shorter at the start)."""
    if window <= 1 or len(values) < 2:
        return values
    c = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def plot(runs: list[Run], result: dict, out: Path, smooth_window: int | None) -> list[Path]:
    """metric vs step | metric relative to the baseline (limit band) | smoothed train loss: PNG, SVG, CSV."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metric, baseline = result["metric"], result["baseline"]
    has_train = any(r.train for r in runs)
    ncols = 3 if has_train else 2
    fig = Figure(figsize=(5.2 * ncols, 4.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols)
    colors = colormaps["tab10"].colors
    base = runs[baseline]
    bx, by = np.array(list(base.metric)), np.array(list(base.metric.values()))
    rows = []
    for k, r in enumerate(runs):
        color = colors[k % len(colors)]
        xs, ys = np.array(list(r.metric)), np.array(list(r.metric.values()))
        tag = " (baseline)" if k == baseline else " (seed)" if result["runs"][k]["role"] == "seed" else ""
        axes[0].plot(xs, ys, color=color, marker="o" if len(xs) <= 30 else None, ms=3,
                     lw=2.2 if k == baseline else 1.4, label=f"{r.label}{tag}: {r.value:.4g} @ {r.step}")
        rows += [[r.label, metric, int(s), v] for s, v in zip(xs, ys)]
        if k != baseline:  # relative to the baseline on the steps both cover (baseline interpolated)
            keep = (xs >= bx[0]) & (xs <= bx[-1])
            if keep.any():
                rel = 100 * (ys[keep] - np.interp(xs[keep], bx, by)) / np.abs(np.interp(xs[keep], bx, by))
                axes[1].plot(xs[keep], rel, color=color, marker="o" if keep.sum() <= 30 else None, ms=3,
                             label=f"{r.label}{tag}: {_pct(result['runs'][k]['rel_diff'], signed=True)}")
        if r.train:
            tx, ty = np.array(list(r.train)), np.array(list(r.train.values()))
            w = smooth_window if smooth_window is not None else max(1, len(ty) // 25)
            if w > 1:
                axes[2].plot(tx, ty, color=color, alpha=0.2, lw=0.8)
            axes[2].plot(tx, smooth(ty, w), color=color, lw=1.4, label=f"{r.label} ({r.train_metric}"
                         + (f", mean of {w}" if w > 1 else "") + ")")
            rows += [[r.label, r.train_metric, int(s), v] for s, v in zip(tx, ty)]
    limit = 100 * result["limit"]
    one_sided = result.get("one_sided", False)
    lo = min([-limit] + [line.get_ydata().min() for line in axes[1].get_lines() if len(line.get_ydata())]) \
        if one_sided else -limit
    axes[1].axhspan(lo, limit, color="green", alpha=0.12, lw=0,
                    label=("≤ +" if one_sided else "± ") + f"limit {limit:.3g}%"
                    + (" (max(tol, 2 × seed gap))" if result["seed_gap"] is not None else " (tolerance)"))
    if result["max_rel"] is not None:
        for sign in ((1,) if one_sided else (-1, 1)):
            axes[1].axhline(sign * 100 * result["max_rel"], color="grey", ls="--", lw=1,
                            label=("+" if one_sided else "± ") + f"max-rel {100 * result['max_rel']:.3g}%"
                            if sign > 0 else None)
    axes[1].axhline(0, color=colors[baseline % len(colors)], lw=1.5)
    for n, step in enumerate(sorted({r.step for r in runs})):  # the verdict reads the curves here only
        for ax in axes[:2]:
            ax.axvline(step, color="black", ls=":", lw=1, label="compared step" if n == 0 else None)
    axes[0].set(xlabel="training step", ylabel=metric, title=f"{metric} per run")
    axes[1].set(xlabel="training step", ylabel=f"{metric} relative to {base.label} (%)",
                title=f"{metric} vs the baseline; verdict {result['verdict']}")
    if has_train:
        axes[2].set(xlabel="training step", ylabel="training loss (smoothed; raw faint)",
                    title="training loss")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    name = "compare_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", metric)
    png = _atomic(out / f"{name}.png", lambda t: fig.savefig(t, format="png", dpi=130, bbox_inches="tight"))
    svg = _atomic(out / f"{name}.svg", lambda t: fig.savefig(t, format="svg", bbox_inches="tight"))

    def write_csv(t: str) -> None:
        with open(t, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["run", "column", "step", "value"])
            w.writerows(rows)
    return [png, svg, _atomic(out / f"{name}.csv", write_csv)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sinkfree compare",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="A/B comparison of training runs from their metrics.csv: the final value of a metric in\n"
                    "every run, its relative difference to a baseline run, a PASS/FAIL verdict, and a figure\n"
                    "(the metric vs step, relative to the baseline, and the smoothed training loss).",
        epilog="""verdict (for every run other than the baseline and the seed pair):
  seed gap  g = |m_I - m_J| / m_J                 (--seed-pair I J; two runs differing only by seed)
  limit     L = max(--tolerance, 2 g)             (--tolerance alone without --seed-pair)
  pass      |m - m_base| / m_base <= L, and <= --max-rel when given
            (--one-sided: (m - m_base) / m_base <= L, so a lower loss always passes)
The exit status is 0 whatever the verdict (read it from the output or --json); 2 on bad input.

examples:
  sinkfree compare runs/video-dense/version_0 runs/video-dense/version_1 runs/video-vsa \\
      --labels dense-s0 dense-s1 vsa --seed-pair 0 1 --tolerance 0 --max-rel 0.03
  sinkfree compare runs/bf16-s0 runs/bf16-s1 runs/sage8 --seed-pair 0 1 --json compare/sage8.json""")
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="run folders: runs/NAME/version_N, or runs/NAME for its newest version_N, or a "
                        "metrics.csv file (Lightning CSVLogger)")
    p.add_argument("--metric", default="val/loss",
                   help="the metrics.csv column compared (default val/loss): its last logged value, or the last at or "
                        "before --step")
    p.add_argument("--labels", nargs="+", default=None, metavar="LABEL",
                   help="one name per RUN for the table and the figure (default: the run folder names)")
    p.add_argument("--baseline", type=int, default=0, metavar="I",
                   help="index (0-based, in RUN order) of the run the others are measured against (default 0)")
    p.add_argument("--seed-pair", type=int, nargs=2, default=None, metavar=("I", "J"),
                   help="indices of two runs that differ only by seed: their gap |m_I - m_J| / m_J sets the "
                        "limit max(--tolerance, 2 × gap); the table gives each run's difference in seed gaps")
    p.add_argument("--tolerance", type=float, default=0.005,
                   help="smallest relative limit, as a fraction (default 0.005 = 0.5%%); use 0 for "
                        "'within twice the seed gap' alone")
    p.add_argument("--max-rel", type=float, default=None,
                   help="an extra limit that every judged run must also meet: |m - m_base| / m_base <= "
                        "MAX_REL (a fraction, e.g. 0.03 for 3%%); off by default")
    p.add_argument("--one-sided", action="store_true",
                   help="judge only values above the baseline (for a loss: 'no worse than'); a run below the "
                        "baseline passes whatever its distance. The seed gap stays |m_I - m_J| / m_J")
    p.add_argument("--step", type=int, default=None,
                   help="compare at the last value logged at or before this step instead of the last one "
                        "(e.g. at 60%% of max_steps)")
    p.add_argument("--train-metric", default=None,
                   help="training-loss column for the training-loss panel (default: the first present of "
                        f"{', '.join(TRAIN_CANDIDATES)})")
    p.add_argument("--smooth", type=int, default=None, metavar="N",
                   help="moving mean over N logged points for the training loss (default: 1/25 of the "
                        "points; 1 = raw)")
    p.add_argument("--out", default="compare",
                   help="folder for the figure: compare_<metric>.png, .svg and the .csv it plots "
                        "(default ./compare)")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write the numbers and the verdict as JSON to PATH")
    return p


def _check_options(args, n: int) -> None:
    if args.labels is not None and len(args.labels) != n:
        raise CompareError(f"--labels: {len(args.labels)} labels for {n} runs; give one per RUN")
    if args.labels is not None and len(set(args.labels)) != n:
        raise CompareError("--labels: labels must be distinct")
    if not 0 <= args.baseline < n:
        raise CompareError(f"--baseline {args.baseline}: out of range for {n} runs (0..{n - 1})")
    if args.seed_pair is not None:
        i, j = args.seed_pair
        if not (0 <= i < n and 0 <= j < n):
            raise CompareError(f"--seed-pair {i} {j}: out of range for {n} runs (0..{n - 1})")
        if i == j:
            raise CompareError(f"--seed-pair {i} {j}: name two different runs")
    if args.tolerance < 0 or (args.max_rel is not None and args.max_rel < 0):
        raise CompareError("--tolerance and --max-rel must be >= 0 (fractions, e.g. 0.005)")
    if args.smooth is not None and args.smooth < 1:
        raise CompareError("--smooth must be >= 1")
    if n < 2:
        raise CompareError("RUN: give at least two runs to compare")


def _json_safe(x):
    """nan / inf (a diverged run) as the strings "nan", "inf", "-inf": strict JSON has no such numbers."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def compare(args) -> tuple[dict, str]:
    """Load, judge, plot, write JSON; returns (result, report text)."""
    _check_options(args, len(args.runs))
    runs = [load_run(a, args.metric, args.train_metric, args.step) for a in args.runs]
    seen = {}
    for a, r in zip(args.runs, runs):
        if r.path.resolve() in seen:
            raise CompareError(f"RUN {a}: the same run as {seen[r.path.resolve()]}")
        seen[r.path.resolve()] = a
    for r, label in zip(runs, args.labels or default_labels([r.path for r in runs])):
        r.label = label
    seed_pair = tuple(args.seed_pair) if args.seed_pair is not None else None
    result = judge(runs, args.metric, args.baseline, seed_pair, args.tolerance, args.max_rel, args.one_sided)
    result["step_limit"] = args.step
    try:
        files = plot(runs, result, Path(args.out), args.smooth)
    except OSError as e:
        raise CompareError(f"--out {args.out}: cannot write the figure ({e.strerror or e})") from None
    result["figure"] = [str(f) for f in files]
    if args.json:
        text = json.dumps(_json_safe(result), indent=2) + "\n"
        try:
            _atomic(Path(args.json), lambda t: Path(t).write_text(text))
        except OSError as e:
            raise CompareError(f"--json {args.json}: cannot write it ({e.strerror or e})") from None
        files.append(Path(args.json))
    report = format_report(result, runs) + "\n" + "\n".join(f"wrote {f}" for f in files)
    return result, report


def compare_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `sinkfree compare ...`; returns the exit status (0 whatever the verdict)."""
    args = build_parser().parse_args(argv)
    try:
        _, report = compare(args)
    except CompareError as e:
        print(f"sinkfree compare: error: {e}", file=sys.stderr)
        return 2
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(compare_main())
