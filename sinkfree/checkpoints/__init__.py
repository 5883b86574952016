"""Checkpoint import/export: HF Llama/Qwen2/Qwen3 folders, GGUF, sinkfree folders and Lightning `.ckpt`.

`load_for_init` is what `--model.init_from` calls; `convert_main` is `sinkfree convert`.
"""
from sinkfree.checkpoints.hf import InitFrom, load_for_init, load_pretrained, open_checkpoint
from sinkfree.checkpoints.io import CheckpointError
from sinkfree.checkpoints.retrofit import calibrated_sink_init, retrofit_report

__all__ = ["CheckpointError", "InitFrom", "calibrated_sink_init", "load_for_init", "load_pretrained",
           "open_checkpoint", "retrofit_report"]
