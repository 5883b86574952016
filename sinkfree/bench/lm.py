"""`sinkfree bench lm`: training throughput and MFU of LLM recipes, side by side in one process."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any, Optional

import lightning as L
import torch

from sinkfree.bench.profiling import format_kernels, kernel_table


def matmul_peak_tflops(n: int = 8192, dtype: torch.dtype = torch.bfloat16) -> float:
    """Measured dense matmul rate of this GPU in TFLOP/s (median of triton's do_bench)."""
    from triton.testing import do_bench

    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = do_bench(lambda: a @ b, warmup=100, rep=500, return_mode="median")
    return 2 * n**3 / (ms * 1e-3) / 1e12


class StepTimer(L.Callback):
    """Wall time of each optimizer step after `skip` warm-up steps (synchronised on CUDA)."""

    def __init__(self, skip: int) -> None:
        self.skip = skip
        self.times: list[float] = []
        self.tokens: list[int] = []
        self._t0: Optional[float] = None

    def _sync(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step >= self.skip:
            self._sync()
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._t0 is not None:
            self._sync()
            self.times.append(time.perf_counter() - self._t0)
            ids = batch["input_ids"]
            self.tokens.append(ids.shape[0] * (ids.shape[1] - 1))
            self._t0 = None


class ProfileSteps(L.Callback):
    """torch.profiler over `n` optimizer steps starting at step `start`: the GPU kernels' time per step,
    summed by kernel name (top `top`), and a Chrome trace written to `trace` when given."""

    def __init__(self, start: int, n: int, top: int = 80, trace: Optional[str] = None) -> None:
        self.start, self.n, self.top, self.trace = start, n, top, trace
        self.prof: Any = None
        self.kernels: list[dict] = []

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.start and self.prof is None:
            from torch.profiler import ProfilerActivity, profile

            torch.cuda.synchronize()
            self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            self.prof.__enter__()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.prof is None or self.kernels or trainer.global_step < self.start + self.n:
            return
        torch.cuda.synchronize()
        self.prof.__exit__(None, None, None)
        if self.trace:
            self.prof.export_chrome_trace(self.trace)
        self.kernels = kernel_table(self.prof, self.n, self.top)


def bench_recipe(recipe: str, steps: int, skip: int, overrides: list[str], monitor_every: int = 0,
                 profile_steps: int = 0, profile_dir: Optional[str] = None) -> dict:
    """Train `recipe` for `steps` steps and report step time, tokens/s and model FLOPs/token; with
    `monitor_every` > 0 a SinkMonitor probes every that many steps and its cost is reported; with
    `profile_steps` > 0 the last that many steps run under torch.profiler (kernel table in the result)."""
    from sinkfree.cli_lightning import SinkfreeCLI

    args = ["--config", recipe, f"--trainer.max_steps={steps}", "--trainer.limit_val_batches=0",
            "--trainer.callbacks=[]", "--trainer.enable_checkpointing=false", "--trainer.logger=false", *overrides]
    cli = SinkfreeCLI(args=args, run=False, subclass_mode_model=True, subclass_mode_data=True,
                      auto_configure_optimizers=False, save_config_callback=None)
    timer = StepTimer(skip)
    monitor = None
    if monitor_every:
        from sinkfree.diagnostics.monitor import SinkMonitor

        monitor = SinkMonitor(every_n_steps=monitor_every, output=os.path.abspath("bench-sinks/stats.csv"))
        cli.trainer.callbacks.append(monitor)
    cli.trainer.callbacks.append(timer)  # after the monitor, so a step's time includes its probe
    prof = None
    if profile_steps:
        if steps - profile_steps <= skip:
            raise ValueError(f"--profile-steps {profile_steps} must leave timed steps: steps {steps} - skip {skip}")
        trace = None
        if profile_dir:
            os.makedirs(profile_dir, exist_ok=True)
            trace = os.path.join(profile_dir, os.path.splitext(os.path.basename(recipe))[0] + ".trace.json")
        prof = ProfileSteps(steps - profile_steps, profile_steps, trace=trace)
        cli.trainer.callbacks.append(prof)
    cli.trainer.fit(cli.model, cli.datamodule)
    times = timer.times[: len(timer.times) - profile_steps] if profile_steps else timer.times
    step_s = statistics.median(times)
    tokens = timer.tokens[-1]
    seq = cli.datamodule.hparams.get("seq_len") if hasattr(cli.datamodule, "hparams") else None
    seq = seq or cli.model.model.config.block_size
    fpt = cli.model.model.flops_per_token(seq)
    probes = {}
    if monitor is not None:
        n = 2 + steps // monitor_every  # at start, every N steps, at the end
        probes = {"monitor_every": monitor_every, "probe_s_each": monitor.probe_seconds / n}
    return {
        **probes,
        "recipe": recipe + (f" + SinkMonitor/{monitor_every}" if monitor_every else ""),
        "step_ms_mean": statistics.mean(times) * 1e3,
        "params": cli.model.model.num_params(),
        "step_ms": step_s * 1e3,
        "tokens_per_s": tokens / step_s,
        "flops_per_token": fpt,
        "tflops": tokens * fpt / step_s / 1e12,
        "steps_timed": len(times),
        "final_train_loss": float(cli.trainer.callback_metrics.get("train/loss", float("nan"))),
        **({"profile": prof.kernels} if prof is not None else {}),
    }


def lm_main(argv: list[str]) -> int:
    """Entry point of `sinkfree bench lm`."""
    p = argparse.ArgumentParser(
        prog="sinkfree bench lm",
        description="Train each recipe for a few hundred steps on this GPU and compare tokens/s and MFU "
        "(model FLOPs = 6 x parameters + attention, per token, over the measured bf16 matmul peak).",
    )
    p.add_argument("recipes", nargs="+", help="recipe YAML files; the first is the baseline of the ratios")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per recipe (default 200)")
    p.add_argument("--skip", type=int, default=30, help="warm-up steps left out of the timing (default 30)")
    p.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE",
                   help="extra LightningCLI override for every recipe, e.g. --set=--model.compile=true")
    p.add_argument("--monitor-every", type=int, default=0, metavar="N",
                   help="also train the first recipe with a SinkMonitor probing every N steps and report its "
                   "overhead (mean step time against the plain run, and per probe)")
    p.add_argument("--profile-steps", type=int, default=0, metavar="N",
                   help="run each recipe's last N steps under torch.profiler (left out of the timing) and print "
                   "its top GPU kernels in ms per step")
    p.add_argument("--profile-dir", default=None, metavar="DIR",
                   help="with --profile-steps, also write a Chrome trace per recipe into DIR (open in "
                   "chrome://tracing or Perfetto)")
    p.add_argument("--json", default=None, help="write the results as JSON to this file")
    a = p.parse_args(argv)
    if a.profile_steps < 0 or (a.profile_steps and a.steps - a.profile_steps <= a.skip):
        p.error(f"--profile-steps must be >= 0 and leave timed steps: --steps {a.steps} - --profile-steps "
                f"{a.profile_steps} must exceed --skip {a.skip}")
    if not torch.cuda.is_available():
        p.error("bench lm needs a CUDA GPU")
    card = torch.cuda.get_device_name()
    peak = matmul_peak_tflops()
    rows = [bench_recipe(r, a.steps, a.skip, a.set, profile_steps=a.profile_steps, profile_dir=a.profile_dir)
            for r in a.recipes]
    if a.monitor_every:
        mon = bench_recipe(a.recipes[0], a.steps, a.skip, a.set, a.monitor_every)
        mon["monitor_overhead_measured"] = mon["step_ms_mean"] / rows[0]["step_ms_mean"] - 1
        mon["monitor_overhead_at_250"] = mon["probe_s_each"] * 1e3 / (250 * rows[0]["step_ms"])
        rows.append(mon)
    base = rows[0]["tokens_per_s"]
    print(f"\ncard: {card}   measured bf16 matmul peak: {peak:.0f} TFLOP/s")
    print(f"{'recipe':40s} {'params':>8s} {'ms/step':>8s} {'tok/s':>10s} {'TFLOP/s':>8s} {'MFU':>6s} {'vs 1st':>6s}")
    for r in rows:
        r["mfu"] = r["tflops"] / peak
        r["ratio_to_first"] = r["tokens_per_s"] / base
        print(f"{r['recipe']:40s} {r['params'] / 1e6:7.1f}M {r['step_ms']:8.1f} {r['tokens_per_s']:10.0f} "
              f"{r['tflops']:8.1f} {r['mfu']:6.1%} {r['ratio_to_first']:6.3f}")
    for r in rows:
        if "probe_s_each" in r:
            print(f"SinkMonitor: {r['probe_s_each']:.3f} s per probe; mean step time +"
                  f"{r['monitor_overhead_measured']:.2%} probing every {r['monitor_every']} steps; "
                  f"{r['monitor_overhead_at_250']:.2%} projected at every 250 steps")
    for r in rows:
        if "profile" in r:
            print(f"\nGPU kernels of {r['recipe']} (ms per step, profiled over {a.profile_steps} steps):")
            print("\n".join(format_kernels(r["profile"])))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"card": card, "matmul_peak_tflops": peak, "rows": rows}, f, indent=2)
    return 0
