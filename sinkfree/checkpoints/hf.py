"""Import checkpoints: HF folders (Llama / Qwen2 / Qwen3), sinkfree folders and files, Lightning `.ckpt`, GGUF.

Public API (what `--model.init_from` and `sinkfree convert from-hf` call):

    src = open_checkpoint(path)                    # any supported format -> Source (headers only)
    init = load_for_init(path, arch_overrides)     # -> InitFrom(config, state_dict, new_keys)
    model = load_pretrained(path, overrides)       # -> LLM with the checkpoint's weights and the new switches
    convert_from_hf(src_folder, out_folder)        # -> a sinkfree folder (sinkfree.json + model.safetensors)

Tensors are streamed one shard at a time, so converting never holds more than the largest shard plus the
final model.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import NamedTuple

import torch

from sinkfree.checkpoints.hf_map import IGNORED_HF_KEYS, arch_from_hf_config, from_hf_key
from sinkfree.checkpoints.io import (
    CheckpointError,
    atomic_output_dir,
    read_headers,
    read_json,
    safetensors_files,
    write_files,
    write_json,
    write_safetensors,
)
from sinkfree.checkpoints.retrofit import calibrated_sink_init, explicit_fields, merge_arch, retrofit_report
from sinkfree.checkpoints.source import (
    SINKFREE_CONFIG,
    SINKFREE_WEIGHTS,
    Source,
    _stream_safetensors,
    _tokenizers_beside,
    check_keys,
    make_config,
    open_lightning_ckpt,
    open_sinkfree_folder,
    open_sinkfree_safetensors,
)
from sinkfree.models.llm import LLM, LLMConfig

DTYPES = {"keep": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def open_hf_folder(folder: Path) -> Source:
    """An HF folder: config.json + model.safetensors (or a sharded index) (+ tokenizer.json)."""
    hf_config = read_json(folder / "config.json")
    arch = arch_from_hf_config(hf_config)
    files = safetensors_files(folder)
    names: dict[str, str] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, torch.dtype] = {}
    unknown = []
    for key, info in read_headers(files).items():
        if IGNORED_HF_KEYS.fullmatch(key) or (key == "lm_head.weight" and arch["tie_embeddings"]):
            continue  # a tied checkpoint may still store the (identical) output matrix
        name = from_hf_key(key)
        if name is None:
            unknown.append(key)
            continue
        names[key], shapes[name], dtypes[name] = name, info.shape, info.dtype
    if unknown:
        raise CheckpointError(f"{folder}: {len(unknown)} tensors outside the Llama layout (e.g. {unknown[:4]})")
    return Source(folder, "hf", arch, shapes, dtypes, lambda: _stream_safetensors(files, names.get), hf_config,
                  _tokenizers_beside(folder))


def open_checkpoint(path: str | Path) -> Source:
    """Open any supported checkpoint by its layout: HF folder, sinkfree folder/file, `.ckpt`, `.gguf`."""
    path = Path(path).expanduser()
    if path.is_dir():
        if (path / SINKFREE_CONFIG).is_file():
            return open_sinkfree_folder(path)
        if (path / "config.json").is_file():
            return open_hf_folder(path)
        raise CheckpointError(f"{path} has neither config.json (HF) nor {SINKFREE_CONFIG} (sinkfree)")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix == ".gguf":
        from sinkfree.checkpoints.gguf import open_gguf

        return open_gguf(path)
    if path.suffix == ".safetensors":
        return open_sinkfree_safetensors(path)
    if path.suffix in (".ckpt", ".pt", ".pth"):
        return open_lightning_ckpt(path)
    raise CheckpointError(f"{path}: unknown checkpoint format (expected a folder, .safetensors, .ckpt or .gguf)")


def _copy_into(model: LLM, source: Source) -> set[str]:
    """Stream the source's tensors into the model's parameters in place; returns the names filled."""
    state = model.state_dict()
    filled = set()
    with torch.no_grad():
        for name, tensor in source.tensors():
            state[name].copy_(tensor)
            filled.add(name)
    return filled


class InitFrom(NamedTuple):
    """What `--model.init_from` needs: the resolved config, the checkpoint's weights, the parameters it lacks."""

    config: LLMConfig
    state_dict: dict[str, torch.Tensor]
    new_keys: list[str]


def _build(path: str | Path, overrides: dict | None) -> tuple[LLM, list[str], set[str]]:
    source = open_checkpoint(path)
    check_keys(source.shapes, source.config(), str(source.path))
    arch = merge_arch(source.arch, overrides or {}, str(source.path))
    config = make_config(arch, str(source.path))
    model = LLM(config)
    filled = _copy_into(model, source)
    new_keys = sorted(n for n, _ in model.named_parameters() if n not in filled)
    sinks_added = [k for k in new_keys if k.endswith("attn.sink")]
    calibrated: set[str] = set()
    if sinks_added and "sink_init" not in explicit_fields(overrides or {}):
        logits = calibrated_sink_init(model, source)  # (L, H), left in the model's sinks
        # sink_init (what reset_parameters would fill) is the lowest of them: within the bound for every head.
        config = dataclasses.replace(config, sink_init=float(logits.min()))
        model.config = config
        calibrated = set(sinks_added)
    retrofit_report(model, source)
    return model, new_keys, calibrated


def load_pretrained(path: str | Path, overrides: dict | None = None) -> LLM:
    """An `LLM` with the checkpoint's architecture and weights, plus the sink switches in `overrides`.

    `overrides` holds `LLMConfig` fields (a recipe's `model.arch`); shape-defining fields that differ from
    the checkpoint are an error, retrofit switches (attn_gate, attn_sink, residual_sink) are added with an
    identity initialisation, and a learnable sink logit is calibrated to a mass <= 1e-3 on a probe batch.
    """
    return _build(path, overrides)[0]


def load_for_init(path: str | Path, arch_overrides: dict | None = None) -> InitFrom:
    """`--model.init_from`: (config, state_dict of the checkpoint's weights, names of the new parameters).

    The state dict holds what the checkpoint provides plus the per-head calibrated sink logits
    (`layers.{i}.attn.sink`, when a learnable sink is added without an explicit `sink_init`); `LLM(config)`
    initialises the other new parameters as an identity (config carries the identity-init flags). So
    `model.load_state_dict(state_dict, strict=False)` reports the new parameters *except* the calibrated
    sinks as missing: use `new_keys` to know which parameters are new.
    """
    model, new_keys, calibrated = _build(path, arch_overrides)
    skip = set(new_keys) - calibrated
    state = {k: v for k, v in model.state_dict().items() if k not in skip}
    return InitFrom(model.config, state, new_keys)


def write_sinkfree_folder(dst: Path, source: Source, dtype: torch.dtype | None, force: bool = False) -> Path:
    """Validate `source`, then stream it into a sinkfree folder at `dst` (atomically; nothing on error)."""
    check_keys(source.shapes, source.config(), str(source.path))
    arch = dataclasses.asdict(source.config())
    with atomic_output_dir(dst, force=force) as tmp:
        write_safetensors(tmp / SINKFREE_WEIGHTS, source.layout(dtype), source.tensors(),
                          metadata={"format": "pt", "sinkfree.arch": json.dumps(arch)})
        write_json(tmp / SINKFREE_CONFIG, {"arch": arch, "source": {"kind": source.kind, "path": str(source.path)},
                                           "hf_config": source.hf_config})
        write_files(tmp, source.tokenizer_files)
    return Path(dst)


def convert_from_hf(src: str | Path, dst: str | Path, dtype: str = "keep", force: bool = False) -> Path:
    """`sinkfree convert from-hf`: an HF folder -> a sinkfree folder (sinkfree.json, model.safetensors, tokenizer)."""
    src = Path(src).expanduser()
    if not (src / "config.json").is_file():
        raise CheckpointError(f"{src} is not an HF folder (no config.json)")
    return write_sinkfree_folder(Path(dst), open_hf_folder(src), DTYPES[dtype], force)
