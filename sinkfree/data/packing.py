"""Tokenize documents into an on-disk token stream, pack it into fixed-length windows, and sample resumably.

Token stream layout: every document's tokens followed by EOS, concatenated; no BOS is stored. BOS enters
only as the first token of a window in BOS-aligned packing, so the two packing modes read the same cache
and differ in exactly one thing: whether position 0 is a BOS at a document start.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from torch.utils.data import Dataset, DistributedSampler
from tqdm import tqdm

from .sources import Document, is_val_document, stable_hash

CACHE_FORMAT = "tokens-v1"  # bump to invalidate token caches when the layout changes
_ENCODE_BATCH = 256  # documents per encode_batch call: enough to keep the Rust threads busy


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every token id."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def token_cache_key(train_spec: dict, val_spec: dict | None, tok: Tokenizer, val_fraction: float) -> str:
    """Hash of everything the token cache depends on."""
    return stable_hash({"format": CACHE_FORMAT, "train": train_spec, "val": val_spec, "val_fraction": val_fraction,
                        "tokenizer": stable_hash(tok.to_str())})


def _batched(docs: Iterator[Document], n: int) -> Iterator[list[Document]]:
    """Lists of up to `n` documents."""
    batch = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


class _StreamWriter:
    """Appends token ids to `<split>.bin` and records where each document starts."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype):
        self.folder, self.split, self.dtype = folder, split, dtype
        self.file = open(folder / f"{split}.bin", "wb")
        self.n_tokens = 0
        self.doc_starts: list[int] = []

    def add(self, ids: list[int]) -> None:
        """Append one document (its ids already end with EOS)."""
        self.doc_starts.append(self.n_tokens)
        self.file.write(np.asarray(ids, dtype=self.dtype).tobytes())
        self.n_tokens += len(ids)

    def close(self) -> None:
        """Flush tokens and write the document offsets."""
        self.file.close()
        np.save(self.folder / f"{self.split}_docs.npy", np.asarray(self.doc_starts, dtype=np.int64))


def _split_tail_as_val(folder: Path, train: _StreamWriter, val_fraction: float) -> _StreamWriter:
    """Move the last `val_fraction` of the train tokens into a new val stream (for data with very few documents)."""
    tokens = np.fromfile(folder / "train.bin", dtype=train.dtype)
    cut = int(len(tokens) * (1 - val_fraction))
    val = _StreamWriter(folder, "val", train.dtype)
    if 0 < cut < len(tokens) - 1:
        val.file.write(tokens[cut:].tobytes())
        val.n_tokens = len(tokens) - cut
        starts = np.asarray(train.doc_starts, dtype=np.int64)
        val.doc_starts = [0] + [int(s - cut) for s in starts[starts > cut]]  # val begins mid-document
        with open(folder / "train.bin", "r+b") as f:
            f.truncate(cut * train.dtype.itemsize)
        train.n_tokens = cut
        train.doc_starts = [int(s) for s in starts[starts < cut]]
        np.save(folder / "train_docs.npy", np.asarray(train.doc_starts, dtype=np.int64))
    val.close()
    return val


def build_token_cache(folder: Path, train_docs: Iterator[Document], val_docs: Iterator[Document] | None,
                      tok: Tokenizer, eos_id: int, val_fraction: float, show_progress: bool = True) -> Path:
    """Tokenize documents into `folder/{train,val}.bin` + `{train,val}_docs.npy` + `meta.json`, atomically.

    With `val_docs` None, documents go to val by hashing their names with `val_fraction`.
    An existing complete cache (one with `meta.json`) is reused as is.
    """
    folder = Path(folder)
    if (folder / "meta.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    try:
        dtype = token_dtype(tok.get_vocab_size())
        writers = {s: _StreamWriter(tmp, s, dtype) for s in ("train", "val")}
        streams = [(train_docs, None)] + ([(val_docs, "val")] if val_docs is not None else [])
        for docs, forced_split in streams:
            bar = tqdm(docs, desc=f"tokenizing {forced_split or 'documents'}", unit="doc", file=sys.stderr,
                       disable=not show_progress, mininterval=1.0)
            for batch in _batched(iter(bar), _ENCODE_BATCH):
                encodings = tok.encode_batch([text for _, text in batch], add_special_tokens=False)
                for (name, _), enc in zip(batch, encodings):
                    split = forced_split or ("val" if val_docs is None and is_val_document(name, val_fraction)
                                             else "train")
                    writers[split].add(enc.ids + [eos_id])
        for w in writers.values():
            w.close()
        if val_docs is None and val_fraction > 0 and 0 in (writers["train"].n_tokens, writers["val"].n_tokens):
            # Hashing sent every document to one side (say, a single .txt file): split by tokens instead.
            if writers["train"].n_tokens == 0:
                for suffix in (".bin", "_docs.npy"):
                    os.replace(tmp / f"val{suffix}", tmp / f"train{suffix}")
                writers["train"], writers["train"].split = writers["val"], "train"
            writers["val"] = _split_tail_as_val(tmp, writers["train"], val_fraction)
        meta = {"format": CACHE_FORMAT, "dtype": dtype.name, "vocab_size": tok.get_vocab_size(),
                "train_tokens": writers["train"].n_tokens, "val_tokens": writers["val"].n_tokens,
                "train_documents": len(writers["train"].doc_starts), "val_documents": len(writers["val"].doc_starts)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished the same cache first; theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


class TokenStream:
    """One split of a token cache: a memory-mapped token array and its document start offsets."""

    def __init__(self, folder: Path, split: str):
        self.folder, self.split = Path(folder), split
        meta = json.loads((self.folder / "meta.json").read_text())
        self.dtype = np.dtype(meta["dtype"])
        self.n_tokens = int(meta[f"{split}_tokens"])
        self.doc_starts = np.load(self.folder / f"{split}_docs.npy")
        self._tokens: np.ndarray | None = None

    @property
    def tokens(self) -> np.ndarray:
        """The memmap, opened lazily so that pickling to DataLoader workers stays cheap."""
        if self._tokens is None:
            self._tokens = (np.memmap(self.folder / f"{self.split}.bin", dtype=self.dtype, mode="r")
                            if self.n_tokens else np.zeros(0, dtype=self.dtype))
        return self._tokens

    def __getstate__(self):
        return {**self.__dict__, "_tokens": None}


def bos_window_starts(doc_starts: np.ndarray, n_tokens: int, seq_len: int) -> np.ndarray:
    """Start offsets of BOS-aligned windows, each consuming `seq_len` stream tokens after its BOS.

    Segments start at every document start and, inside documents longer than `seq_len`, every `seq_len`
    tokens (so long documents are not thrown away). Windows are greedy and non-overlapping: the next one
    starts at the first segment at or after the end of the previous one; the cut-off tail of a short
    document that began inside a window is skipped rather than started mid-document.
    """
    if len(doc_starts) == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.append(doc_starts[1:], n_tokens)
    counts = -(-(ends - doc_starts) // seq_len)  # segments per document (ceil)
    first = np.cumsum(counts) - counts  # index of each document's first segment
    k = np.arange(counts.sum()) - np.repeat(first, counts)  # segment number within its document
    segments = np.repeat(doc_starts, counts) + seq_len * k
    starts, i = [], 0
    while i < len(segments) and segments[i] + seq_len <= n_tokens:
        starts.append(segments[i])
        i = int(np.searchsorted(segments, segments[i] + seq_len, side="left"))
    return np.asarray(starts, dtype=np.int64)


class PackedTextDataset(Dataset):
    """Fixed windows of `seq_len + 1` tokens from a `TokenStream`, as `{"input_ids": LongTensor}`.

    `bos_id` None: plain packing, window i = stream[i*seq_len : i*seq_len + seq_len + 1].
    `bos_id` set: window = [BOS] + stream[s : s + seq_len] for each start s of `bos_window_starts`.
    """

    def __init__(self, stream: TokenStream, seq_len: int, bos_id: int | None = None):
        self.stream, self.seq_len, self.bos_id = stream, seq_len, bos_id
        if bos_id is None:
            self.starts = None
            self._len = max(0, (stream.n_tokens - 1) // seq_len)
        else:
            self.starts = bos_window_starts(stream.doc_starts, stream.n_tokens, seq_len)
            self._len = len(self.starts)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self._len:
            raise IndexError(f"window {i} out of range for {self._len} windows")
        L, tokens = self.seq_len, self.stream.tokens
        if self.starts is None:
            ids = tokens[i * L: i * L + L + 1].astype(np.int64)
        else:
            s = int(self.starts[i])
            ids = np.concatenate([np.asarray([self.bos_id], dtype=np.int64), tokens[s: s + L].astype(np.int64)])
        return {"input_ids": torch.from_numpy(ids)}


class ResumableShuffleSampler(DistributedSampler):
    """Seeded shuffle whose order depends only on (seed, epoch), with its position in `state_dict()`.

    A `DistributedSampler` so that Lightning shards nothing itself and keeps this sampler under DDP;
    `StatefulDataLoader` saves `state_dict()` with the loader state (also with workers), and a fresh
    sampler that loads it continues with exactly the indices an uninterrupted one would yield.
    The epoch advances by itself after a full pass; Lightning's `set_epoch` agrees with it.
    """

    def __init__(self, dataset, seed: int = 0, num_replicas: int = 1, rank: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.yielded = 0  # indices handed out in the current epoch
        self._resume_at = 0  # indices to skip on the next pass, set by load_state_dict

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of `epoch`; a resume offset only survives if the epoch is unchanged."""
        if epoch != self.epoch:
            self._resume_at = 0
        super().set_epoch(epoch)

    def __iter__(self):
        start, self._resume_at = self._resume_at, 0
        indices = list(super().__iter__())
        self.yielded = start
        for idx in indices[start:]:
            self.yielded += 1
            yield idx
        self.epoch += 1
        self.yielded = 0

    def state_dict(self) -> dict:
        """Epoch and position within it."""
        return {"epoch": self.epoch, "yielded": self.yielded, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a `state_dict()`; the next pass skips what was already yielded."""
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"data.seed: checkpoint was made with seed {state['seed']}, this run has {self.seed}")
        self.epoch = int(state["epoch"])
        self._resume_at = int(state["yielded"])
        self.yielded = self._resume_at
