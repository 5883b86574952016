"""`SinkMonitor`: measure attention and residual sinks on a fixed probe batch while a model trains."""
from __future__ import annotations

import csv
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from lightning.pytorch import Callback

from sinkfree.diagnostics.probe import (
    PER_DIM_METRICS,
    SHORT_LEN,
    ProbeInputs,
    Row,
    SinkStats,
    inputs_to,
    num_sequences,
    probe_model,
    slice_inputs,
)

CSV_HEADER = ("step", "layer", "head", "metric", "value")


def scalar_name(row: Row) -> str | None:
    """Logger key of a row: `sink/<metric>` or `resid/<metric>`, `/layer_<i>` per layer; None for rows
    that are per head or per dim (those stay in the CSV only)."""
    if row.head != -1 or row.metric in PER_DIM_METRICS:
        return None
    residual = row.metric.startswith(("resid_", "massive_", "norm_", "high_norm_", "token_norm_"))
    name = ("resid/" + row.metric.removeprefix("resid_")) if residual else "sink/" + row.metric
    return name if row.layer == -1 else f"{name}/layer_{row.layer}"


def append_rows(path: Path, rows: Sequence[Row]) -> None:
    """Append tidy rows to a CSV, writing the header only when the file is new or empty."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(CSV_HEADER)
        writer.writerows((r.step, r.layer, r.head, r.metric, f"{r.value:.7g}") for r in rows)
        f.flush()


def save_arrays(path: Path, arrays: dict) -> None:
    """Write arrays to .npz through a temporary file, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


def default_map_layers(n_layer: int) -> list[int]:
    """Four evenly spaced layers (first to last) for the attention maps."""
    return sorted({round(i * (n_layer - 1) / 3) for i in range(4)})


class SinkMonitor(Callback):
    """Every `every_n_steps` optimizer steps (and at the start and end of training), run the model in
    eval mode, no grad, fp32 eager attention on a fixed probe batch; log `sink/...` and `resid/...`
    scalars, append tidy rows to `sinks/stats.csv` and save the last probe's attention maps, gate
    histograms and per-dim residual magnitudes to `sinks/last_probe.npz` (all under the run folder).

    With several ranks each probes its share of the batch and torchmetrics reduces the results, so all
    ranks run the probe together; rank 0 writes. The model is `pl_module.model`.

    Probe inputs: `datamodule.probe_batch(num_sequences, seq_len)` returns token ids (B, S) (LLMs) or a
    dict batch; when the LightningModule has `probe_inputs(batch)`, that turns the batch into the model's
    keyword inputs (RectifiedFlow: clean samples noised at a fixed t -> {"x", "t", "y"}). The model is
    called as `model(ids)` or `model(**inputs)`. Bidirectional models (DiTs) report max-key metrics
    instead of first-token ones (docs/diagnostics.md).
    """

    def __init__(self, every_n_steps: int = 500, num_sequences: int = 8, seq_len: int = 512,
                 layers_for_maps: list[int] | None = None, output: str = "sinks/stats.csv",
                 eps: float = 0.3, short_len: int = SHORT_LEN):
        """Args:
        every_n_steps: optimizer steps between probes. 500 keeps the overhead under 1% on the GPU recipes
            (measured on an H200 at 125m: 0.28 s a probe against 80 ms steps, 0.7%); lower it on tiny runs.
        num_sequences: probe sequences, cut from document starts by `datamodule.probe_batch` (BOS first);
            for diffusion data modules the first validation clips.
        seq_len: tokens per probe sequence (capped at the model's block_size); ignored by the diffusion data
            modules, whose probe clips have the training shape.
        layers_for_maps: layers whose head-averaged attention maps are saved (negative counts from the
            end); None = four evenly spaced layers.
        output: the stats CSV; a relative path is under the trainer's log dir.
        eps: Gu et al.'s ε for the Sink^ε rate.
        short_len: second, shorter probe length for the Sink^ε rate (Gu et al. use 64 tokens).
        """
        super().__init__()
        if every_n_steps < 1 or num_sequences < 1 or seq_len < 2:
            raise ValueError("SinkMonitor: every_n_steps and num_sequences must be >= 1 and seq_len >= 2, got "
                             f"{every_n_steps}, {num_sequences}, {seq_len}")
        self.every_n_steps, self.num_sequences, self.seq_len = every_n_steps, num_sequences, seq_len
        self.layers_for_maps, self.output, self.eps, self.short_len = layers_for_maps, output, eps, short_len
        self.path: Path | None = None
        self._ids: ProbeInputs | None = None
        self._last_step: int | None = None
        self.probe_seconds = 0.0  # total wall time spent probing on this rank

    def setup(self, trainer, pl_module, stage: str) -> None:
        out = Path(self.output)
        root = trainer.log_dir or trainer.default_root_dir
        self.path = out if out.is_absolute() else Path(root) / out

    def _probe_ids(self, trainer, device) -> ProbeInputs:
        """This rank's share of the fixed probe batch (fetched once from the datamodule): ids, or the
        model's keyword inputs from `pl_module.probe_inputs(batch)` when the task defines it."""
        if self._ids is None:
            dm = trainer.datamodule
            if dm is None or not hasattr(dm, "probe_batch"):
                raise ValueError("SinkMonitor needs a datamodule with probe_batch(num_sequences, seq_len) "
                                 "(sinkfree.data.TextDataModule, SyntheticVideoDataModule and "
                                 "FolderDataModule have one)")
            task = trainer.lightning_module
            # A probe longer than the model's context cannot run; cap it (tiny models have short contexts).
            limit = getattr(getattr(task.model, "config", None), "block_size", self.seq_len)
            batch = dm.probe_batch(self.num_sequences, min(self.seq_len, limit))
            if hasattr(task, "probe_inputs"):  # e.g. noise clean samples at a fixed flow time
                batch = task.probe_inputs(batch)
            rank, world, n = trainer.global_rank, trainer.world_size, num_sequences(batch)
            # Fewer sequences than ranks: the extra ranks repeat one (all ranks must run the forward).
            index = slice(rank, None, world) if n >= world else slice(rank % n, rank % n + 1)
            self._ids = slice_inputs(batch, index)
        return inputs_to(self._ids, device)

    def probe(self, trainer, pl_module) -> None:
        """Run one probe now and record it at the current global step (all ranks must call it)."""
        start = time.perf_counter()
        step = trainer.global_step
        model = pl_module.model
        map_layers = self.layers_for_maps
        if map_layers is None:
            map_layers = default_map_layers(len(model.layers))
        ids = self._probe_ids(trainer, pl_module.device)
        probe, short = probe_model(model, ids, map_layers, self.short_len)
        stats = SinkStats(probe, map_layers=map_layers, eps=self.eps).to(pl_module.device)
        stats.update(probe, short)
        del probe, short
        results = stats.compute()
        self._last_step = step
        if trainer.is_global_zero:
            rows = stats.rows(results, step)
            append_rows(self.path, rows)
            save_arrays(self.path.with_name("last_probe.npz"), stats.arrays(results, step))
        self.probe_seconds += time.perf_counter() - start
        if trainer.is_global_zero:
            scalars = {name: r.value for r in rows if (name := scalar_name(r)) is not None}
            scalars["sink/probe_seconds"] = time.perf_counter() - start
            for logger in trainer.loggers:
                logger.log_metrics(scalars, step=step)

    def on_train_start(self, trainer, pl_module) -> None:
        self.probe(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step  # with gradient accumulation several batches share a step: probe once
        if step % self.every_n_steps == 0 and step != self._last_step:
            self.probe(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step != self._last_step:
            self.probe(trainer, pl_module)
