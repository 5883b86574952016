"""`sinkfree convert from-hf | from-gguf | to-hf`: checkpoint conversion verbs (`convert_main`)."""
from __future__ import annotations

import argparse
import sys

from sinkfree.checkpoints.io import CheckpointError

_DTYPE_HELP = "weight dtype to write: keep (as stored), float32, bfloat16 or float16 (default: %(default)s)"
_OUTPUTS = """
A sinkfree folder holds sinkfree.json (the LLMConfig as `arch`, plus the source's config.json),
model.safetensors (sinkfree parameter names) and the tokenizer files; `--model.init_from` and
`convert to-hf` read it. Output folders are written to a temporary sibling and renamed into place:
an error leaves nothing behind, and an existing folder is replaced only with --force.
"""
_TO_HF = """
Input: a Lightning .ckpt of the CausalLM task, a sinkfree folder or .safetensors file, an HF folder or a
GGUF file. A model with every switch off becomes a plain LlamaForCausalLM / Qwen2ForCausalLM (q/k/v
biases) / Qwen3ForCausalLM (q/k norms) folder; an imported HF checkpoint round-trips bit-exactly with
--dtype keep. Retrofit parameters keep documented HF-style names (transformers ignores them):
  model.layers.{i}.self_attn.gate_proj.weight          attention output gate
  model.layers.{i}.self_attn.sinks                     learnable sink logits (n_head,), fp32
  model.layers.{i}.*_layernorm.{gate_down,gate_up}.weight, .pre_scale   GatedNorm / PreAffine
and config.json's "sinkfree" block records every LLMConfig field, so sinkfree reads the folder back exactly.
"""


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of `sinkfree convert`."""
    p = argparse.ArgumentParser(prog="sinkfree convert", description="Convert checkpoints to and from sinkfree.",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_OUTPUTS)
    sub = p.add_subparsers(dest="command", required=True, metavar="{from-hf,from-gguf,to-hf}")

    hf = sub.add_parser("from-hf", help="HF Llama/Qwen2/Qwen3 folder -> sinkfree folder",
                        description="Import an HF folder (config.json, model.safetensors or a sharded index, "
                                    "tokenizer.json) of LlamaForCausalLM, Qwen2ForCausalLM or Qwen3ForCausalLM, "
                                    "streaming one shard at a time.",
                        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_OUTPUTS)
    hf.add_argument("src", help="the HF folder")
    hf.add_argument("--out", required=True, help="the sinkfree folder to create")
    hf.add_argument("--dtype", default="keep", choices=["keep", "float32", "bfloat16", "float16"], help=_DTYPE_HELP)
    hf.add_argument("--force", action="store_true", help="replace --out if it exists (only once the new one is complete)")

    gg = sub.add_parser("from-gguf", help="llama GGUF file -> sinkfree folder",
                        description="Import a llama-architecture GGUF: tensors dequantized with the `gguf` package "
                                    "(F32, F16, BF16, Q8_0, Q4_0, Q4_1 tested), q/k un-permuted to the HF layout, "
                                    "tokenizer.json rebuilt from the GGUF metadata. Needs `pip install sinkfree[gguf]`.",
                        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_OUTPUTS)
    gg.add_argument("file", help="the .gguf file")
    gg.add_argument("--out", required=True, help="the sinkfree folder to create")
    gg.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="dtype of the dequantized weights (default: %(default)s)")
    gg.add_argument("--force", action="store_true", help="replace --out if it exists (only once the new one is complete)")

    th = sub.add_parser("to-hf", help="sinkfree checkpoint -> HF folder",
                        description="Export a checkpoint as an HF folder (model.safetensors, config.json, "
                                    "tokenizer.json).", formatter_class=argparse.RawDescriptionHelpFormatter,
                        epilog=_TO_HF + _OUTPUTS)
    th.add_argument("ckpt", help="the checkpoint: .ckpt, sinkfree folder or .safetensors, HF folder, .gguf")
    th.add_argument("--out", required=True, help="the HF folder to create")
    th.add_argument("--dtype", default="keep", choices=["keep", "float32", "bfloat16", "float16"], help=_DTYPE_HELP)
    th.add_argument("--tokenizer", default=None,
                    help="tokenizer.json (or its folder) to include; default: the one beside the checkpoint "
                         "(for a .ckpt, its folder or the run folder above it)")
    th.add_argument("--no-tokenizer", action="store_true", help="export the weights and config without a tokenizer")
    th.add_argument("--force", action="store_true", help="replace --out if it exists (only once the new one is complete)")
    return p


def convert_main(argv: list[str] | None = None) -> int:
    """Entry point of `sinkfree convert`; returns 0, or 1 after printing a `CheckpointError`."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.command == "from-hf":
            from sinkfree.checkpoints.hf import convert_from_hf

            out = convert_from_hf(args.src, args.out, args.dtype, args.force)
        elif args.command == "from-gguf":
            from sinkfree.checkpoints.gguf import convert_from_gguf

            out = convert_from_gguf(args.file, args.out, args.dtype, args.force)
        else:
            from sinkfree.checkpoints.export import convert_to_hf

            out = convert_to_hf(args.ckpt, args.out, args.dtype, args.tokenizer, args.no_tokenizer, args.force)
    except CheckpointError as e:
        print(f"sinkfree convert {args.command}: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0
