"""A checkpoint opened for reading: its architecture, tensor names/shapes, and a streamed tensor iterator.

Every format we read (HF folder, sinkfree folder or safetensors file, Lightning `.ckpt`, GGUF) becomes a
`Source` whose tensor names are already sinkfree parameter names, so validation and loading are shared.
"""
from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sinkfree.checkpoints.io import CheckpointError, read_headers, read_json, safetensors_metadata
from sinkfree.models.llm import LLM, LLMConfig

SINKFREE_CONFIG = "sinkfree.json"  # a sinkfree folder: this + model.safetensors (+ tokenizer.json)
SINKFREE_WEIGHTS = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


@dataclass
class Source:
    """A readable checkpoint: `arch` (LLMConfig fields), `shapes` by sinkfree name, and `tensors()` to stream them."""

    path: Path
    kind: str  # "hf" | "sinkfree" | "lightning" | "gguf"
    arch: dict
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    tensors: Callable[[], Iterator[tuple[str, torch.Tensor]]]
    hf_config: dict | None = None  # the original config.json, kept so export can restore ids and extras
    tokenizer_files: dict[str, Path | str] = field(default_factory=dict)  # file name -> path or JSON text

    def layout(self, cast: torch.dtype | None = None, rename: Callable[[str], str] = str,
               keep_fp32: Callable[[str], bool] = lambda name: False) -> dict:
        """Output name -> (dtype, shape) for writing: floating tensors cast to `cast` unless `keep_fp32(name)`."""
        def dtype(name: str) -> torch.dtype:
            d = self.dtypes[name]
            if cast is None or not d.is_floating_point:
                return d
            return torch.float32 if keep_fp32(name) else cast
        return {rename(n): (dtype(n), self.shapes[n]) for n in self.shapes}

    def config(self) -> LLMConfig:
        """The `LLMConfig` this checkpoint was saved with; unknown fields are a clear error."""
        return make_config(self.arch, f"{self.path}")


def make_config(arch: dict, where: str) -> LLMConfig:
    """`LLMConfig(**arch)` with an error that names the checkpoint instead of a bare TypeError."""
    try:
        return LLMConfig(**arch)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: architecture {arch} is not a valid LLMConfig: {e}") from e


def expected_shapes(config: LLMConfig) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """(name -> shape of every state-dict entry, names that are parameters) of `LLM(config)`, built on meta."""
    with torch.device("meta"):
        model = LLM(config)
    params = {n for n, _ in model.named_parameters()}
    return {n: tuple(t.shape) for n, t in model.state_dict().items()}, params


def check_keys(shapes: dict[str, tuple[int, ...]], config: LLMConfig, where: str) -> None:
    """Raise a `CheckpointError` listing missing parameters, unexpected keys and shape mismatches."""
    want, params = expected_shapes(config)
    missing = sorted(n for n in params if n not in shapes)
    extra = sorted(n for n in shapes if n not in want)
    wrong = [f"{n}: checkpoint {list(shapes[n])} vs model {list(want[n])}"
             for n in sorted(shapes) if n in want and tuple(shapes[n]) != want[n]]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {missing[:4]})")
    if extra:
        problems.append(f"{len(extra)} unexpected (e.g. {extra[:4]})")
    if wrong:
        problems.append(f"{len(wrong)} with the wrong shape (e.g. {wrong[:3]})")
    if problems:
        raise CheckpointError(f"{where} does not match its architecture: " + "; ".join(problems))


# -- sinkfree formats ---------------------------------------------------------------------------------
def _stream_safetensors(files: list[Path], rename: Callable[[str], str | None]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for f in files:  # one shard open at a time: peak memory is one shard's pages plus what the caller keeps
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():  # noqa: SIM118 (safe_open is not a dict)
                name = rename(key)
                if name is not None:
                    yield name, sf.get_tensor(key)


def _tokenizers_beside(folder: Path) -> dict[str, Path | str]:
    return {n: folder / n for n in TOKENIZER_FILES if (folder / n).is_file()}


def open_sinkfree_folder(folder: Path) -> Source:
    """A folder written by `convert from-hf/from-gguf`: sinkfree.json + model.safetensors (+ tokenizer)."""
    meta = read_json(folder / SINKFREE_CONFIG)
    if "arch" not in meta:
        raise CheckpointError(f"{folder / SINKFREE_CONFIG} has no 'arch'")
    weights = folder / SINKFREE_WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{folder} has {SINKFREE_CONFIG} but no {SINKFREE_WEIGHTS}")
    infos = read_headers([weights])
    return Source(folder, "sinkfree", dict(meta["arch"]), {k: v.shape for k, v in infos.items()},
                  {k: v.dtype for k, v in infos.items()}, lambda: _stream_safetensors([weights], lambda k: k), meta.get("hf_config"),
                  _tokenizers_beside(folder))


def open_sinkfree_safetensors(file: Path) -> Source:
    """A bare safetensors file with sinkfree names and the architecture in its `sinkfree.arch` metadata."""
    meta = safetensors_metadata(file)
    if "sinkfree.arch" not in meta:
        raise CheckpointError(f"{file} has no 'sinkfree.arch' metadata; for an HF checkpoint pass its folder")
    infos = read_headers([file])
    arch = json.loads(meta["sinkfree.arch"])
    hf_config = json.loads(meta["sinkfree.hf_config"]) if "sinkfree.hf_config" in meta else None
    return Source(file, "sinkfree", arch, {k: v.shape for k, v in infos.items()},
                  {k: v.dtype for k, v in infos.items()}, lambda: _stream_safetensors([file], lambda k: k), hf_config, _tokenizers_beside(file.parent))


def _torch_load(file: Path) -> dict:
    try:
        return torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError as e:
        if "zip archive" in str(e) or "failed finding central directory" in str(e):
            raise CheckpointError(f"{file} is not a complete torch checkpoint (truncated or corrupt?): {e}") from e
        # Lightning may pickle non-tensor hyper-parameters the safe loader refuses; the file is the user's own.
        warnings.warn(f"{file}: weights_only load failed ({str(e).splitlines()[0]}); loading with full unpickling")
        return torch.load(file, map_location="cpu", mmap=True, weights_only=False)
    except Exception as e:  # pickle errors, EOF on truncated files
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            warnings.warn(f"{file}: weights_only load refused a global; loading with full unpickling")
            return torch.load(file, map_location="cpu", mmap=True, weights_only=False)
        raise CheckpointError(f"cannot read {file} (truncated or corrupt?): {e}") from e


def open_lightning_ckpt(file: Path) -> Source:
    """A Lightning checkpoint of the `CausalLM` task: `hyper_parameters["arch"]` and `model.`-prefixed weights."""
    ckpt = _torch_load(file)
    arch = (ckpt.get("hyper_parameters") or {}).get("arch")
    state = ckpt.get("state_dict")
    if not isinstance(arch, dict) or not isinstance(state, dict):
        raise CheckpointError(f"{file} is not a sinkfree Lightning checkpoint (needs hyper_parameters['arch'] "
                              f"and state_dict)")
    weights = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    weights = {k.replace("_orig_mod.", ""): v for k, v in weights.items()}  # torch.compile wrappers
    if not weights:
        raise CheckpointError(f"{file}: state_dict has no 'model.'-prefixed weights")
    tok = _tokenizers_beside(file.parent)
    if not tok:
        tok = _tokenizers_beside(file.parent.parent)  # <run>/checkpoints/x.ckpt with the tokenizer in <run>
    return Source(file, "lightning", dict(arch), {k: tuple(v.shape) for k, v in weights.items()},
                  {k: v.dtype for k, v in weights.items()}, lambda: iter(weights.items()), None, tok)


def source_from_model(model: LLM, tokenizer_files: dict | None = None, hf_config: dict | None = None) -> Source:
    """An in-memory `LLM` as a `Source` (its current weights), e.g. to export it with `save_hf`."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    arch = {f: getattr(model.config, f) for f in model.config.__dataclass_fields__}
    return Source(Path("<in-memory model>"), "model", arch, {k: tuple(v.shape) for k, v in state.items()},
                  {k: v.dtype for k, v in state.items()}, lambda: iter(state.items()), hf_config, dict(tokenizer_files or {}))

