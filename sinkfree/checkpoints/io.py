"""Shared checkpoint I/O: the error type, atomic folder writes, safetensors shard discovery and headers."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from safetensors import SafetensorError, safe_open


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or converted; the message names the file and what is wrong."""


@dataclass(frozen=True)
class TensorInfo:
    """Where a stored tensor lives and what it is, read from a safetensors header only."""

    file: Path
    shape: tuple[int, ...]
    dtype: str


def read_json(path: Path) -> dict:
    """Parse a JSON file, turning a syntax error into a `CheckpointError` that names the file."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a folder: from `model.safetensors.index.json` if present, else `*.safetensors`."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no 'weight_map'")
        files = sorted({folder / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index} lists shards that do not exist: {missing}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors weights in {folder}")
    return files


def read_headers(files: list[Path]) -> dict[str, TensorInfo]:
    """Key -> `TensorInfo` over all shards, reading headers only; truncated files and duplicates are errors."""
    infos: dict[str, TensorInfo] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                for key in sf.keys():
                    sl = sf.get_slice(key)
                    if key in infos:
                        raise CheckpointError(f"tensor {key!r} appears in both {infos[key].file.name} and {f.name}")
                    infos[key] = TensorInfo(f, tuple(sl.get_shape()), sl.get_dtype())
        except SafetensorError as e:
            raise CheckpointError(f"{f} is not a complete safetensors file (truncated or corrupt?): {e}") from e
    return infos


def safetensors_metadata(file: Path) -> dict[str, str]:
    """The string metadata of a safetensors file (empty dict if none)."""
    try:
        with safe_open(str(file), framework="pt") as sf:
            return sf.metadata() or {}
    except SafetensorError as e:
        raise CheckpointError(f"{file} is not a complete safetensors file (truncated or corrupt?): {e}") from e


@contextlib.contextmanager
def atomic_output_dir(dst: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `dst` in one rename, on error it vanishes.

    `dst` must not exist unless `force`; with `force` the old folder is removed only after the new one
    is complete, so an error leaves the old one as it was.
    """
    dst = Path(dst).absolute()
    if dst.exists() and not force:
        raise CheckpointError(f"output {dst} already exists; pass --force to replace it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        yield tmp
        _chmod_by_umask(tmp)
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _chmod_by_umask(folder: Path) -> None:
    """mkdtemp makes 0700 folders and some writers 0600 files; give them the usual umask-based modes."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for p in folder.rglob("*"):
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def write_json(path: Path, obj: dict) -> None:
    """Write `obj` as indented JSON (callers write inside an `atomic_output_dir`)."""
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
