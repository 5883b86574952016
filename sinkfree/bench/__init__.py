"""`sinkfree bench`: GPU benchmarks, side by side in one process, as ratios to the best alternative."""

from __future__ import annotations

import importlib
import sys
from typing import Optional

BENCHES = {
    "attention": ("sinkfree.bench.attention", "bench_main", "attention kernels vs SDPA cuDNN/flash, FlexAttention, peers"),
    "lm": ("sinkfree.bench.lm", "lm_main", "training tokens/s and MFU of LLM recipes"),
    "vsa": ("sinkfree.bench.vsa", "vsa_main", "video sparse attention and a DiT training step vs dense cuDNN"),
    "accuracy": ("sinkfree.bench.accuracy", "accuracy_main",
                 "attention error vs an fp64 reference (issue 7 targets), bf16 cuDNN as the floor"),
}


def bench_main(argv: Optional[list[str]] = None) -> int:
    """Entry point of `sinkfree bench <name> ...`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: sinkfree bench {" + ",".join(BENCHES) + "} [options]\n")
        for name, (_, _, what) in BENCHES.items():
            print(f"  {name:10s} {what}")
        print("\n`sinkfree bench <name> --help` explains every option.")
        return 0 if argv else 2
    if argv[0] not in BENCHES:
        print(f"sinkfree bench: error: unknown benchmark {argv[0]!r}; allowed: {', '.join(BENCHES)}", file=sys.stderr)
        return 2
    module, func, _ = BENCHES[argv[0]]
    return getattr(importlib.import_module(module), func)(argv[1:]) or 0
