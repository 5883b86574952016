"""Where documents come from: the embedded stdlib corpus, local files, or a `datasets` name.

A source yields `(name, text)` documents in a deterministic order and describes itself with a
JSON-able `spec()` that cache keys hash, so a changed file or option rebuilds the caches.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

Document = tuple[str, str]

# Plain-text files are one document each (prose, markup and source code: a folder of code is a corpus);
# row files hold one document per row in `text_field`.
TEXT_EXTENSIONS = (".txt", ".md", ".rst", ".tex", ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".cu", ".cuh",
                   ".rs", ".go", ".java", ".js", ".ts")
ROW_EXTENSIONS = (".json", ".jsonl", ".parquet")
ALLOWED_EXTENSIONS = TEXT_EXTENSIONS + ROW_EXTENSIONS
# Without a cap the stdlib corpus is ~12 MB; 4 MB keeps tokenizer training and tokenization at seconds.
DEFAULT_CORPUS_BYTES = 4_000_000
# Folders of the stdlib that hold tests, installed packages or build artefacts rather than library prose/code.
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib-dynload"}


def stable_hash(obj) -> str:
    """Hex digest of a JSON-able object, stable across runs and machines."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def is_val_document(name: str, val_fraction: float) -> bool:
    """Whether a document belongs to the validation split, decided by hashing its name only."""
    if val_fraction <= 0:
        return False
    h = int(hashlib.sha1(name.encode()).hexdigest()[:8], 16)
    return h / 2**32 < val_fraction


def _capped(docs: Iterator[Document], max_documents: int | None, max_bytes: int | None) -> Iterator[Document]:
    """Stop after `max_documents` documents or once `max_bytes` of text have been yielded."""
    total = 0
    for i, (name, text) in enumerate(docs):
        if max_documents is not None and i >= max_documents:
            return
        if max_bytes is not None and total >= max_bytes:
            return
        total += len(text.encode("utf-8", errors="replace"))
        yield name, text


@dataclass
class StdlibCorpus:
    """Python's own `pydoc_data` topics (English prose) then its stdlib `.py` sources, sorted by path."""

    max_documents: int | None = None
    max_bytes: int | None = DEFAULT_CORPUS_BYTES

    def spec(self) -> dict:
        """What identifies this corpus for cache keys."""
        return {"kind": "stdlib", "python": sys.version.split()[0], "max_documents": self.max_documents,
                "max_bytes": self.max_bytes}

    def documents(self) -> Iterator[Document]:
        """Topics first (so a small cap still has prose), then source files in sorted path order."""
        return _capped(self._all(), self.max_documents, self.max_bytes)

    def _all(self) -> Iterator[Document]:
        from pydoc_data.topics import topics

        for key in sorted(topics):
            yield f"pydoc_topics/{key}", topics[key]
        root = Path(sysconfig.get_paths()["stdlib"])
        for path in stdlib_source_files(root):
            yield f"stdlib/{path.relative_to(root).as_posix()}", path.read_text(encoding="utf-8", errors="replace")


def stdlib_source_files(root: Path) -> list[Path]:
    """Sorted `.py` files of the stdlib, without test folders, installed packages or generated config."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("config-"))
        rel = Path(dirpath).relative_to(root).parts
        for f in sorted(filenames):
            # pydoc_data/topics.py is read as a dict of topics; _sysconfigdata differs per machine.
            if f.endswith(".py") and not f.startswith("_sysconfigdata") and rel != ("pydoc_data",):
                files.append(Path(dirpath) / f)
    return sorted(files)


@dataclass
class FileSource:
    """Local plain-text files (`TEXT_EXTENSIONS`, one document per file) and .json/.jsonl/.parquet files (one
    document per row)."""

    paths: list[str]
    text_field: str = "text"
    max_documents: int | None = None
    max_bytes: int | None = None

    def spec(self) -> dict:
        """Paths with size and mtime, so editing a file rebuilds the caches."""
        files = [{"path": p, "size": os.path.getsize(p), "mtime": os.path.getmtime(p)} for p in self.paths]
        return {"kind": "files", "files": files, "text_field": self.text_field,
                "max_documents": self.max_documents, "max_bytes": self.max_bytes}

    def documents(self) -> Iterator[Document]:
        """Documents of every file in order; rows are named `path#row`."""
        return _capped(self._all(), self.max_documents, self.max_bytes)

    def _all(self) -> Iterator[Document]:
        for path in self.paths:
            if path.endswith(TEXT_EXTENSIONS):
                yield path, Path(path).read_text(encoding="utf-8", errors="replace")
                continue
            import datasets

            builder = "parquet" if path.endswith(".parquet") else "json"
            # streaming=True reads the file lazily and writes no Arrow cache next to the user's data.
            rows = datasets.load_dataset(builder, data_files=path, split="train", streaming=True)
            for i, row in enumerate(rows):
                yield f"{path}#{i}", _text_of(row, self.text_field, path)


@dataclass
class HFDatasetSource:
    """A `datasets` name (optionally `name:config`), read with `datasets.load_dataset`."""

    name: str
    split: str = "train"
    text_field: str = "text"
    streaming: bool = False
    max_documents: int | None = None
    max_bytes: int | None = None

    def spec(self) -> dict:
        """Name, config, split and field (the hub revision is not known offline)."""
        return {"kind": "datasets", "name": self.name, "split": self.split, "text_field": self.text_field,
                "max_documents": self.max_documents, "max_bytes": self.max_bytes}

    def documents(self) -> Iterator[Document]:
        """Rows of the split in dataset order, named `name/split#row`."""
        return _capped(self._all(), self.max_documents, self.max_bytes)

    def _all(self) -> Iterator[Document]:
        import datasets

        name, _, config = self.name.partition(":")
        rows = datasets.load_dataset(name, config or None, split=self.split, streaming=self.streaming)
        for i, row in enumerate(rows):
            yield f"{self.name}/{self.split}#{i}", _text_of(row, self.text_field, self.name)


def _text_of(row: dict, field: str, where: str) -> str:
    """The text column of a row, with an error naming the option when it is missing."""
    if field not in row:
        raise ValueError(f"data.text_field: column {field!r} not in {where} (columns: {sorted(row)})")
    return row[field] or ""


def _looks_like_path(s: str) -> bool:
    """A string is a path (not a `datasets` name) if it exists, is a glob, or has a file extension."""
    return os.path.exists(s) or glob.has_magic(s) or os.path.splitext(s)[1] != "" or s.startswith((".", "/", "~"))


def expand_files(patterns: Sequence[str], option: str = "data.data") -> list[str]:
    """Expand files, folders and globs into a list of supported files (each pattern's matches sorted, a file named
    twice kept once, at its first place), or raise naming `option`."""
    files: list[str] = []
    seen: set[str] = set()
    for pattern in patterns:
        pattern = os.path.expanduser(str(pattern))
        if os.path.isdir(pattern):
            found = sorted(str(p) for p in Path(pattern).rglob("*") if p.suffix in ALLOWED_EXTENSIONS)
            if not found:
                raise FileNotFoundError(f"{option}: folder {pattern!r} has no {'/'.join(ALLOWED_EXTENSIONS)} files")
        elif glob.has_magic(pattern):
            found = sorted(f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f))
            if not found:
                raise FileNotFoundError(f"{option}: no file matches {pattern!r}")
        elif os.path.isfile(pattern):
            found = [pattern]
        else:
            raise FileNotFoundError(f"{option}: file {pattern!r} does not exist")
        for f in found:
            if os.path.splitext(f)[1] not in ALLOWED_EXTENSIONS:
                raise ValueError(f"{option}: unsupported file type {f!r}; allowed: {', '.join(ALLOWED_EXTENSIONS)}")
        for f in found:
            key = os.path.realpath(f)
            if key not in seen:
                seen.add(key)
                files.append(f)
    return files


def resolve_source(data: str | Sequence[str] | None, text_field: str = "text", split: str = "train",
                   streaming: bool = False, max_documents: int | None = None, max_bytes: int | None = None):
    """Turn the user's `data` option into a source: None = stdlib corpus, paths/globs = files, else a name."""
    if data is None:
        return StdlibCorpus(max_documents, DEFAULT_CORPUS_BYTES if max_bytes is None else max_bytes)
    if isinstance(data, str) and not _looks_like_path(data):
        return HFDatasetSource(data, split, text_field, streaming, max_documents, max_bytes)
    patterns = [data] if isinstance(data, str) else list(data)
    if not patterns:
        raise ValueError("data.data: empty list of files; give files/globs, a datasets name, or null for the "
                         "embedded stdlib corpus")
    return FileSource(expand_files(patterns), text_field, max_documents, max_bytes)
