"""GPU kernel tables from torch.profiler, shared by `bench lm --profile-steps` and `bench vsa --profile-steps`."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch


def kernel_table(prof: Any, n_steps: int, top: int = 80) -> list[dict]:
    """The GPU kernels of a finished profiler summed by name, in ms and calls per step (`n_steps` profiled),
    slowest first: a first row "(all GPU kernels)" with the totals, then the `top` slowest kernels. User
    annotations (e.g. `Optimizer.step#AdamW.step`) are not kernels and are left out."""
    rows = []
    for e in prof.key_averages():
        dev_us = getattr(e, "self_device_time_total", None)
        if dev_us is None:
            dev_us = getattr(e, "self_cuda_time_total", 0)
        annotation = getattr(e, "is_user_annotation", False) or "#" in e.key
        if dev_us > 0 and e.device_type.name == "CUDA" and not annotation:
            rows.append({"kernel": e.key, "ms_per_step": dev_us / 1e3 / n_steps, "calls_per_step": e.count / n_steps})
    rows.sort(key=lambda r: -r["ms_per_step"])
    total = {"kernel": "(all GPU kernels)", "ms_per_step": sum(r["ms_per_step"] for r in rows),
             "calls_per_step": sum(r["calls_per_step"] for r in rows)}
    return [total] + rows[:top]


def profile_calls(fn: Callable[[], Any], n: int, top: int = 80, trace: Optional[str] = None) -> list[dict]:
    """Run `fn` `n` times under torch.profiler (CPU and CUDA activity) and return `kernel_table`; a Chrome trace
    goes to `trace` when given."""
    from torch.profiler import ProfilerActivity, profile

    if n < 1:
        raise ValueError(f"profile_calls: n must be >= 1, got {n}")
    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        for _ in range(n):
            fn()
        if cuda:
            torch.cuda.synchronize()
    if trace:
        prof.export_chrome_trace(trace)
    return kernel_table(prof, n, top)


def format_kernels(rows: list[dict], n: int = 26) -> list[str]:
    """Printable lines of a kernel table: ms per step, calls per step, name (cut at 110 characters)."""
    return [f"  {r['ms_per_step']:9.3f} ms {r['calls_per_step']:7.1f}x  {r['kernel'][:110]}" for r in rows[:n]]
