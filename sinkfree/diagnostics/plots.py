"""Figures from a run's `sinks/stats.csv` and `sinks/last_probe.npz`: each as PNG, SVG and the CSV it plots."""
from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from sinkfree.diagnostics.metrics import HIGH_NORM_REL

MASS_LABEL = "attention on the first token (fraction)"
MAX_KEY_LABEL = "largest mean attention on one key (fraction)"


def _figure(figsize, ncols: int = 1, **kw):
    """An Agg figure outside pyplot: no global backend switch, nothing to close."""
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols, **kw)


def find_stats(run_dir: str | Path) -> Path:
    """`stats.csv` of a run: RUN_DIR/sinks/stats.csv, RUN_DIR/stats.csv, or RUN_DIR itself."""
    run_dir = Path(run_dir)
    for cand in (run_dir / "sinks" / "stats.csv", run_dir / "stats.csv", run_dir):
        if cand.is_file():
            return cand
    found = sorted(run_dir.glob("**/sinks/stats.csv")) if run_dir.is_dir() else []
    if len(found) == 1:
        return found[0]
    where = f"; found several: {', '.join(map(str, found))}" if found else ""
    raise FileNotFoundError(f"no sinks/stats.csv under {run_dir} (is SinkMonitor on for this run?){where}")


def read_stats(path: str | Path) -> dict[str, dict[tuple[int, int], dict[int, float]]]:
    """stats.csv -> {metric: {(layer, head): {step: value}}}; a step probed twice keeps its last value."""
    table: dict = defaultdict(lambda: defaultdict(dict))
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            table[row["metric"]][(int(row["layer"]), int(row["head"]))][int(row["step"])] = float(row["value"])
    if not table:
        raise ValueError(f"{path} has no rows")
    return table


def _save(fig, out: Path, name: str, header: list[str], rows: list[list]) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png", out / f"{name}.svg", out / f"{name}.csv"]
    fig.savefig(paths[0], dpi=130, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    with open(paths[2], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return paths


def _layers(series: dict) -> list[int]:
    return sorted(layer for layer, head in series if layer >= 0 and head == -1)


def _steps(series: dict) -> list[int]:
    return sorted({s for values in series.values() for s in values})


def layer_step_heatmap(stats, metric: str, out: Path, title: str, label: str, log: bool = False) -> list[Path]:
    """Layer × step heat map of a per-layer metric in [0, 1]; `log` colours on a log scale from
    min(1e-3, the smallest value) to 1 (max-key mass: uniform attention over S keys gives 1/S, not 0).
    Small grids print each cell's value."""
    series = stats[metric]
    layers, steps = _layers(series), _steps(series)
    grid = np.array([[series[(l, -1)].get(s, np.nan) for s in steps] for l in layers])
    fig, ax = _figure((max(5.0, 0.35 * len(steps) + 3), max(3.0, 0.3 * len(layers) + 1.5)))
    positive = grid[np.isfinite(grid) & (grid > 0)]
    scale = dict(norm=LogNorm(vmin=min(1e-3, positive.min()) if positive.size else 1e-3, vmax=1.0)) if log \
        else dict(vmin=0, vmax=1)
    im = ax.imshow(grid, aspect="auto", origin="lower", cmap="magma", interpolation="nearest", **scale)
    if grid.size <= 120:
        for (i, j), v in np.ndenumerate(grid):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=7,
                        color="white" if im.norm(max(v, 1e-12)) < 0.6 else "black")
    ticks = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), 10)).round().astype(int))
    ax.set_xticks(ticks, [str(steps[i]) for i in ticks], rotation=45 if len(steps) > 5 else 0)
    ax.set_yticks(range(len(layers)), [str(l) for l in layers])
    ax.set(xlabel="training step (optimizer steps)", ylabel="layer", title=title)
    fig.colorbar(im, ax=ax, label=label + (", log" if log else ""))
    rows = [[l] + list(r) for l, r in zip(layers, grid.tolist())]
    return _save(fig, out, f"{metric}_heatmap", ["layer"] + [f"step_{s}" for s in steps], rows)


SINK_RATE_LINES = (("sink_rate", "at the probe length"), ("sink_rate_64", "at 64 tokens (Gu et al.)"),
                   ("first_token_mass", "mean first-token mass"))
MAX_KEY_RATE_LINES = (("max_key_rate", "share of heads with max-key mass > 0.3"),
                      ("max_key_mass", "mean max-key mass"))


def sink_rate_plot(stats, out: Path, lines=SINK_RATE_LINES, name: str = "sink_rate",
                   title: str = "Attention-sink rate Sink$^{0.3}$ over training") -> list[Path]:
    """Model-level Sink^0.3 rate (share of heads whose first-token mass > 0.3) against the step; with
    MAX_KEY_RATE_LINES the bidirectional counterpart (share of heads whose max-key mass > 0.3)."""
    fig, ax = _figure((6, 3.8))
    columns, steps = {}, set()
    for metric, label in lines:
        values = stats.get(metric, {}).get((-1, -1))
        if values:
            xs = sorted(values)
            ax.plot(xs, [values[x] for x in xs], marker="o", ms=3, label=label,
                    ls="--" if metric.endswith("_mass") else "-")
            columns[metric], steps = values, steps | set(xs)
    ax.set(xlabel="training step (optimizer steps)", ylabel="share of heads; mass as a fraction (0–1)",
           ylim=(-0.03, 1.03), title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    rows = [[s] + [columns[m].get(s, "") for m in columns] for s in sorted(steps)]
    return _save(fig, out, name, ["step"] + list(columns), rows)


def token_norms_plot(stats, out: Path, threshold: float = HIGH_NORM_REL) -> list[Path]:
    """Per layer against the step: max / median token norm ‖h_i‖ and the count of high-norm tokens."""
    layers, steps = _layers(stats["token_norm_ratio"]), _steps(stats["token_norm_ratio"])
    fig, axes = _figure((12, 4.2), 2, sharex=True)
    fig.subplots_adjust(wspace=0.3, top=0.82)
    cmap = colormaps["viridis"]
    rows = []
    for ax, metric in zip(axes, ("token_norm_ratio", "high_norm_tokens")):
        for l in layers:
            values = stats.get(metric, {}).get((l, -1), {})
            ax.plot(steps, [values.get(s, np.nan) for s in steps], color=cmap(l / max(1, len(layers) - 1)),
                    marker="o" if len(steps) < 3 else None, ms=3)
            rows += [[metric, l, s, values[s]] for s in steps if s in values]
        ax.grid(alpha=0.3)
        ax.set(xlabel="training step (optimizer steps)")
    axes[0].axhline(threshold, color="grey", ls=":", lw=1, label=f"{threshold:g}× median (high-norm threshold)")
    axes[0].legend(fontsize=8)
    axes[0].set(ylabel="max / median token norm ‖h‖", title="Largest token norm over the median")
    axes[1].set(ylabel="tokens (all probe sequences)", title=f"High-norm tokens (‖h‖ > {threshold:g}× median)")
    axes[1].set_ylim(bottom=0, top=max(1.0, axes[1].get_ylim()[1]))
    axes[1].yaxis.set_major_locator(MaxNLocator(integer=True))
    sm = ScalarMappable(cmap=cmap, norm=Normalize(layers[0], layers[-1]))
    fig.colorbar(sm, ax=axes, label="layer", pad=0.01, ticks=MaxNLocator(integer=True))
    fig.suptitle("Residual token norms over training, one line per layer")
    return _save(fig, out, "token_norms", ["metric", "layer", "step", "value"], rows)


MAG = (("resid_max", "top-1 |h|"), ("resid_top2", "top-2 |h|"), ("resid_top3", "top-3 |h|"),
       ("resid_median", "median |h|"))


def residual_last_plot(stats, out: Path) -> list[Path]:
    """Top-1/2/3 and median |h| of the residual stream per layer at the last probed step (log scale)."""
    series = stats["resid_max"]
    layers, step = _layers(series), _steps(series)[-1]
    fig, ax = _figure((6, 3.8))
    rows = [[l] for l in layers]
    for (metric, label), marker in zip(MAG, "os^x"):
        ys = [stats[metric][(l, -1)].get(step, np.nan) for l in layers]
        ax.plot(layers, ys, marker=marker, label=label)
        for r, y in zip(rows, ys):
            r.append(y)
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="layer (residual stream after the block)", ylabel="|h| (activation magnitude, log)",
           title=f"Residual-stream magnitudes per layer, step {step}")
    ax.axhline(100, color="grey", ls=":", lw=1, label="|h| = 100 (massive threshold)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, out, "resid_magnitude_last", ["layer"] + [m for m, _ in MAG], rows)


def residual_steps_plot(stats, out: Path) -> list[Path]:
    """Top-1/2/3 and median |h| against the step, one line per layer (log scale)."""
    layers, steps = _layers(stats["resid_max"]), _steps(stats["resid_max"])
    fig, axes = _figure((15, 3.8), 4, sharex=True)
    cmap = colormaps["viridis"]
    rows = []
    for ax, (metric, label) in zip(axes, MAG):
        for l in layers:
            values = stats[metric][(l, -1)]
            ax.plot(steps, [values.get(s, np.nan) for s in steps], color=cmap(l / max(1, len(layers) - 1)),
                    marker="o" if len(steps) < 3 else None, ms=3)
            rows += [[metric, l, s, values[s]] for s in steps if s in values]
        ax.set_yscale("log")
        ax.set(title=label, xlabel="training step (optimizer steps)")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("|h| (activation magnitude, log)")
    sm = ScalarMappable(cmap=cmap, norm=Normalize(layers[0], layers[-1]))
    fig.colorbar(sm, ax=axes, label="layer", pad=0.01, ticks=MaxNLocator(integer=True))
    fig.suptitle("Residual-stream magnitudes over training, one line per layer")
    return _save(fig, out, "resid_magnitude_steps", ["metric", "layer", "step", "value"], rows)


def residual_stripes_plot(arrays, out: Path) -> list[Path]:
    """Layers × dims heat map of the per-dim mean |h| over non-first tokens (all tokens for bidirectional
    models): residual sinks are stripes."""
    grid = arrays["resid_dim_mean_abs"]  # (L, C)
    tokens = "non-first tokens" if bool(arrays.get("causal", True)) else "all tokens"
    fig, ax = _figure((10, max(3.0, 0.3 * grid.shape[0] + 1.5)))
    positive = grid[grid > 0]
    norm = LogNorm(vmin=max(positive.min(), positive.max() * 1e-4), vmax=positive.max()) if positive.size else None
    im = ax.imshow(np.where(grid > 0, grid, np.nan), aspect="auto", origin="lower", norm=norm, cmap="viridis",
                   interpolation="nearest")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="residual dimension", ylabel="layer",
           title=f"Residual-sink stripes: mean |h| per dimension ({tokens}), step {int(arrays['step'])}")
    fig.colorbar(im, ax=ax, label="mean |h| (log)")
    rows = [[l] + row for l, row in enumerate(grid.tolist())]
    return _save(fig, out, "resid_sink_stripes", ["layer"] + [f"dim_{d}" for d in range(grid.shape[1])], rows)


def attention_maps_plot(arrays, out: Path) -> list[Path]:
    """Head-averaged attention maps (query × key) at the saved layers, log colour scale. Causal models: the
    title gives the first-token mass; bidirectional ones the largest column mean (max-key mass of the map)."""
    maps, layers = arrays["attn_maps"], arrays["attn_map_layers"]
    causal = bool(arrays.get("causal", True))
    n = len(layers)
    fig, axes = _figure((3.6 * n + 1, 3.8), n, squeeze=False)
    norm = LogNorm(vmin=1e-4, vmax=1.0)
    cmap = colormaps["magma"].with_extremes(bad="white")  # masked (future) keys stay white
    for ax, m, layer in zip(axes[0], maps, layers):
        im = ax.imshow(np.where(m > 0, np.clip(m, 1e-4, None), np.nan), norm=norm, cmap=cmap,
                       interpolation="nearest")
        mass = f"first-token mass {m[:, 0].mean():.2f}" if causal else f"max-key mass {m.mean(0).max():.3f}"
        ax.set(title=f"layer {int(layer)}\n{mass}", xlabel="key position" if causal else "key token")
    axes[0, 0].set_ylabel("query position" if causal else "query token")
    fig.colorbar(im, ax=axes[0].tolist(), label="attention probability (log)", pad=0.01)
    fig.suptitle(f"Head-averaged attention maps, step {int(arrays['step'])}")
    s = maps.shape[-1]
    rows = [[int(layer), q] + [f"{x:.4g}" for x in m[q]] for layer, m in zip(layers, maps) for q in range(s)]
    return _save(fig, out, "attention_maps", ["layer", "query"] + [f"key_{k}" for k in range(s)], rows)


def gate_histogram_plot(arrays, out: Path) -> list[Path]:
    """Distribution of the attention-output gate values σ(·) per layer (share of values per bin)."""
    hist, edges = arrays["gate_hist"], arrays["gate_edges"]
    share = hist / np.maximum(hist.sum(1, keepdims=True), 1)
    centres = (edges[:-1] + edges[1:]) / 2
    fig, ax = _figure((6, 3.8))
    cmap = colormaps["viridis"]
    for l, row in enumerate(share):
        ax.step(centres, row, where="mid", color=cmap(l / max(1, len(share) - 1)), lw=1.2)
    ax.axvline(0.1, color="grey", ls=":", lw=1)
    ax.set(xlabel="gate value σ(·) (0 = closed, 1 = open)", ylabel="share of gate values per bin",
           title=f"Attention-gate histograms per layer, step {int(arrays['step'])}", xlim=(0, 1))
    sm = ScalarMappable(cmap=cmap, norm=Normalize(0, len(share) - 1))
    fig.colorbar(sm, ax=ax, label="layer", ticks=MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    rows = [[f"{lo:.4g}", f"{hi:.4g}"] + r for lo, hi, r in zip(edges[:-1], edges[1:], share.T.tolist())]
    return _save(fig, out, "gate_histograms", ["bin_low", "bin_high"] + [f"layer_{l}" for l in range(len(share))],
                 rows)


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> list[Path]:
    """Write every figure the run's data allows to `out` (default RUN_DIR's sinks/plots); returns the files."""
    stats_path = find_stats(run_dir)
    out = Path(out) if out is not None else stats_path.parent / "plots"
    stats = read_stats(stats_path)
    files = []
    if "first_token_mass" in stats:
        files += layer_step_heatmap(stats, "first_token_mass", out, "First-token attention mass per layer",
                                    MASS_LABEL)
        files += sink_rate_plot(stats, out)
    elif "max_key_mass" in stats:  # bidirectional (DiT): no first token
        files += layer_step_heatmap(stats, "max_key_mass", out, "Max-key attention mass per layer", MAX_KEY_LABEL,
                                    log=True)
        files += sink_rate_plot(stats, out, MAX_KEY_RATE_LINES, "max_key_rate",
                                "Share of heads with max-key mass > 0.3 over training")
    if "learned_sink_mass" in stats:
        files += layer_step_heatmap(stats, "learned_sink_mass", out, "Learned-sink attention mass per layer",
                                    "attention on the learned sink (fraction)")
    if "resid_max" in stats:
        files += residual_last_plot(stats, out)
        files += residual_steps_plot(stats, out)
    if "token_norm_ratio" in stats:
        files += token_norms_plot(stats, out)
    npz = stats_path.parent / "last_probe.npz"
    if npz.is_file():
        with np.load(npz) as arrays:
            arrays = dict(arrays)
        files += residual_stripes_plot(arrays, out)
        if "attn_maps" in arrays:
            files += attention_maps_plot(arrays, out)
        if "gate_hist" in arrays:
            files += gate_histogram_plot(arrays, out)
    return files
