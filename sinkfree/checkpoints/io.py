"""Shared checkpoint I/O: the error type, atomic folder writes, safetensors shard discovery and headers."""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}
TORCH_DTYPES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or converted; the message names the file and what is wrong."""


@dataclass(frozen=True)
class TensorInfo:
    """Where a stored tensor lives and what it is, read from a safetensors header only."""

    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype


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
                for key in sf.keys():  # noqa: SIM118 (safe_open is not a dict)
                    sl = sf.get_slice(key)
                    if key in infos:
                        raise CheckpointError(f"tensor {key!r} appears in both {infos[key].file.name} and {f.name}")
                    infos[key] = TensorInfo(f, tuple(sl.get_shape()), TORCH_DTYPES[sl.get_dtype()])
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


def write_safetensors(path: Path, layout: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                      tensors: Iterable[tuple[str, torch.Tensor]], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file one tensor at a time (any order), so it never holds more than one tensor.

    `layout` (name -> (dtype, shape)) fixes the header up front; each streamed tensor is cast to its
    dtype and written at its offset. A tensor missing from the stream, or of the wrong shape, is an error.
    """
    header, offset = {}, 0
    for name, (dtype, shape) in layout.items():
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format aligns the data to 8 bytes
    start, written = 8 + len(blob), set()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, t in tensors:
            dtype, shape = layout[name]
            if tuple(t.shape) != tuple(shape):
                raise CheckpointError(f"tensor {name} has shape {list(t.shape)}, expected {list(shape)}")
            f.seek(start + header[name]["data_offsets"][0])
            f.write(t.detach().to("cpu", dtype).contiguous().reshape(-1).view(torch.uint8).numpy().data)
            written.add(name)
    if set(layout) - written:
        raise CheckpointError(f"tensors never came from the source: {sorted(set(layout) - written)[:4]}")


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


def write_files(folder: Path, files: dict[str, Path | str]) -> None:
    """Copy `name -> path` entries into `folder`, or write `name -> text` ones (tokenizer files)."""
    for name, file in files.items():
        if isinstance(file, Path):
            shutil.copyfile(file, folder / name)
        else:
            (folder / name).write_text(file)

