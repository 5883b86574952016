"""Export any sinkfree-readable checkpoint as an HF folder: model.safetensors, config.json, tokenizer.json.

A model with every switch off becomes a plain Llama / Qwen2 / Qwen3 folder that `transformers` loads with
the same logits, and an imported HF checkpoint round-trips bit-exactly (`dtype="keep"`). Retrofit
parameters are written under the names documented in `hf_map` and the switches in config.json's
`"sinkfree"` block: sinkfree reads such a folder back exactly; `transformers` ignores those weights.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from sinkfree.checkpoints.hf import DTYPES, open_checkpoint
from sinkfree.checkpoints.hf_map import hf_config_from_arch, to_hf_key
from sinkfree.checkpoints.io import (
    CheckpointError,
    atomic_output_dir,
    write_files,
    write_json,
    write_safetensors,
)
from sinkfree.checkpoints.source import TOKENIZER_FILES, Source, check_keys, source_from_model
from sinkfree.models.llm import LLM

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# Switch values under which `transformers` computes exactly what sinkfree does.
_HF_EQUIVALENT = {"attn_gate": "none", "attn_sink": "none", "residual_sink": "none", "norm": "rmsnorm",
                  "attn_softmax": "softmax", "outlier_clip": None}


def _tokenizer_files(given: str | Path | None, found: dict) -> dict[str, Path | str]:
    if given is None:
        return found
    given = Path(given).expanduser()
    folder = given if given.is_dir() else given.parent
    files = {n: folder / n for n in TOKENIZER_FILES if (folder / n).is_file()}
    if not given.is_dir():
        files["tokenizer.json"] = given
    if "tokenizer.json" not in files:
        raise CheckpointError(f"--tokenizer {given}: no tokenizer.json there")
    return files


def _check_tokenizer(files: dict) -> None:
    from tokenizers import Tokenizer

    tok = files["tokenizer.json"]
    try:
        Tokenizer.from_str(tok) if isinstance(tok, str) else Tokenizer.from_file(str(tok))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise CheckpointError(f"tokenizer {tok if isinstance(tok, Path) else '(from the checkpoint)'} "
                              f"is unreadable: {e}") from e


def convert_to_hf(ckpt: str | Path, dst: str | Path, dtype: str = "keep", tokenizer: str | Path | None = None,
                  no_tokenizer: bool = False, force: bool = False) -> Path:
    """`sinkfree convert to-hf`: checkpoint (.ckpt, sinkfree folder/file, HF folder, GGUF) -> HF folder at `dst`.

    Everything is validated before the first byte is written, and the folder appears in one rename.
    """
    return export_source(open_checkpoint(ckpt), dst, dtype, tokenizer, no_tokenizer, force)


def save_hf(model: LLM, dst: str | Path, dtype: str = "keep", tokenizer: str | Path | None = None,
            force: bool = False) -> Path:
    """Export an in-memory `LLM` as an HF folder (with `tokenizer`'s files, or none when it is None)."""
    return export_source(source_from_model(model), dst, dtype, tokenizer, tokenizer is None, force)


def export_source(source: Source, dst: str | Path, dtype: str = "keep", tokenizer: str | Path | None = None,
                  no_tokenizer: bool = False, force: bool = False) -> Path:
    """Write an opened checkpoint as an HF folder; see `convert_to_hf`."""
    config = source.config()
    check_keys(source.shapes, config, str(source.path))
    arch = {k: getattr(config, k) for k in config.__dataclass_fields__}
    hf_config = hf_config_from_arch(arch, source.hf_config)
    tok_files = {} if no_tokenizer else _tokenizer_files(tokenizer, source.tokenizer_files)
    if not no_tokenizer and "tokenizer.json" not in tok_files:
        raise CheckpointError(f"no tokenizer.json found beside {source.path}; pass --tokenizer PATH "
                              f"(or --no-tokenizer to export the weights alone)")
    if tok_files:
        _check_tokenizer(tok_files)
    changed = {k: arch[k] for k, v in _HF_EQUIVALENT.items() if arch.get(k) != v}
    if changed:
        warnings.warn(f"exporting a model with {changed}: `transformers` will ignore these (its outputs differ); "
                      f"sinkfree reads the folder back exactly")
    cast = DTYPES[dtype]
    layout = source.layout(cast, to_hf_key, keep_fp32=lambda name: name.endswith("attn.sink"))  # sinks stay fp32
    dtypes = [d for d, _ in layout.values()]
    main = max(set(dtypes), key=dtypes.count)
    hf_config["dtype"] = hf_config["torch_dtype"] = _DTYPE_NAMES.get(main, str(main).removeprefix("torch."))
    with atomic_output_dir(Path(dst), force=force) as tmp:
        write_safetensors(tmp / "model.safetensors", layout,
                          ((to_hf_key(n), t) for n, t in source.tensors()), metadata={"format": "pt"})
        write_json(tmp / "config.json", hf_config)
        write_files(tmp, tok_files)
        ids = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id") if hf_config.get(k) is not None}
        if ids and "generation_config.json" not in tok_files:
            write_json(tmp / "generation_config.json", ids)
    return Path(dst)
