"""The tasks' `compile` / `compile_mode` options: one check and one place that calls torch.compile."""
from __future__ import annotations

from typing import Optional

from torch import nn

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_compile_mode(compile: bool, mode: Optional[str]) -> None:
    """ValueError naming the option for an unknown mode, or a mode without `model.compile: true`."""
    if mode is None:
        return
    if mode not in COMPILE_MODES:
        raise ValueError(f"model.compile_mode={mode!r} is not a torch.compile mode; allowed: {list(COMPILE_MODES)}")
    if not compile:
        raise ValueError(f"model.compile_mode={mode!r} needs model.compile: true")


def compile_in_place(model: nn.Module, compile: bool, mode: Optional[str]) -> None:
    """torch.compile the module in place (checkpoint keys stay plain) when `compile` is set."""
    if compile:
        model.compile(mode=mode)
