"""The `sinkfree` command: LightningCLI for fit/validate/test/predict, a thin dispatcher for the rest."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Callable, Optional

USAGE = """usage: sinkfree <verb> [options]

Train and inspect transformers without attention sinks or residual sinks.

Training (LightningCLI: --config FILE, --print_config, dotted overrides such as --trainer.max_steps 100):
  fit         train a model from a recipe:  sinkfree fit --config recipes/llm/tiny.yaml
              fine-tune:                    ... --model.init_from <checkpoint or HF folder>
              resume:                       ... --ckpt_path last
  validate    run the validation loop once
  test        run the test loop once
  predict     generate text from prompts:   sinkfree predict --config <run>/config.yaml --ckpt_path <ckpt>

Other verbs:
  sinks       sink diagnostics: `sinks plot RUN_DIR`, `sinks probe --checkpoint X --data Y`
  convert     checkpoints: `convert from-hf`, `convert from-gguf`, `convert to-hf`
  tokenizer   `tokenizer train`: train a byte-level BPE tokenizer on local or embedded text
  bench       on a GPU: `bench attention` (kernels), `bench accuracy` (error vs fp64), `bench lm` (tokens/s, MFU),
              `bench vsa` (VSA and a DiT training step)
  compare     A/B of runs' metrics.csv: `compare runs/a runs/a2 runs/b --seed-pair 0 1` -> table,
              PASS/FAIL against max(0.5%, 2 x seed gap), figure (val/loss and train loss vs step)

`sinkfree <verb> --help` explains every option of a verb.
"""

LIGHTNING_VERBS = ("fit", "validate", "test", "predict")

# verb -> (module, function taking argv); imported lazily so `sinkfree --help` stays fast.
OTHER_VERBS: dict[str, tuple[str, str]] = {
    "sinks": ("sinkfree.diagnostics.cli", "sinks_main"),
    "convert": ("sinkfree.checkpoints.cli", "convert_main"),
    "tokenizer": ("sinkfree.data.tokenizer", "tokenizer_main"),
    "bench": ("sinkfree.bench", "bench_main"),
    "compare": ("sinkfree.compare", "compare_main"),
}


def _lightning_cli(argv: list[str]) -> None:
    from sinkfree.cli_lightning import run_lightning_cli

    run_lightning_cli(argv)


def _resolve(verb: str) -> Callable[[list[str]], Optional[int]]:
    module, func = OTHER_VERBS[verb]
    return getattr(importlib.import_module(module), func)


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of the `sinkfree` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        sys.exit(0 if argv else 2)
    verb, rest = argv[0], argv[1:]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if verb in LIGHTNING_VERBS:
        _lightning_cli(argv)
        return
    if verb in OTHER_VERBS:
        code = _resolve(verb)(rest)
        sys.exit(code or 0)
    allowed = ", ".join(LIGHTNING_VERBS + tuple(OTHER_VERBS))
    print(f"sinkfree: error: unknown verb {verb!r}; allowed: {allowed}\n", file=sys.stderr)
    print(USAGE, file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
