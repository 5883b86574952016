"""`TextDataModule`: documents → cached BPE tokens → packed windows, with a resumable shuffled train loader."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from .packing import (
    PackedTextDataset,
    ResumableShuffleSampler,
    TokenStream,
    build_token_cache,
    token_cache_key,
)
from .sources import HFDatasetSource, resolve_source
from .tokenizer import MIN_VOCAB, default_cache_dir, get_or_train_tokenizer, load_tokenizer, special_token_ids


class TextDataModule(L.LightningDataModule):
    """Language-modelling batches `{"input_ids": LongTensor (batch_size, seq_len + 1)}`; the task shifts them.

    Args:
        data: None = the Python stdlib sources and pydoc topics shipped with this interpreter (no download); or local files, folders or globs (recursive `**`) of plain text (.txt .md .rst .tex and source code: .py .c .h .cpp .cu .rs .go .java .js .ts ...; one document per file) or .json/.jsonl/.parquet (one document per row); or a `datasets` name (`name` or `name:config`).
        text_field: Column holding the text in json/jsonl/parquet rows and `datasets` rows.
        tokenizer: Path to a tokenizer.json to use; None = train a byte-level BPE on the data and cache it.
        vocab_size: Vocabulary size when training a tokenizer (ignored with `tokenizer`); read the real size from the `vocab_size` attribute.
        seq_len: Tokens the model sees per sequence; batches hold seq_len + 1 ids so inputs and targets can be shifted.
        batch_size: Sequences per batch (per device).
        num_workers: DataLoader worker processes (0 = load in the main process).
        bos_at_doc_start: True = every sequence starts at a document start with BOS at position 0; False = plain concatenation of EOS-separated documents cut every seq_len tokens (no BOS).
        val_fraction: Fraction of documents (chosen by hashing their names) held out for validation.
        val_split: For a `datasets` name, the split to validate on instead of holding out `val_fraction` of the train split.
        streaming: Stream a `datasets` name instead of downloading and converting it whole.
        cache_dir: Where tokenizers and token arrays are cached; None = $SINKFREE_CACHE or ~/.cache/sinkfree.
        seed: Seed of the train shuffle (the order depends only on seed and epoch, so resumed runs see the same batches).
        max_documents: Use at most this many documents (None = all).
        max_bytes: Use at most about this many bytes of text (None = all; the embedded stdlib corpus defaults to 4 MB).
        progress: Show progress bars while training the tokenizer and tokenizing.
        prompts: `predict` only: the texts to continue (None = one short Python prompt).
    """

    def __init__(
        self,
        data: str | list[str] | None = None,
        text_field: str = "text",
        tokenizer: str | None = None,
        vocab_size: int = 8192,
        seq_len: int = 512,
        batch_size: int = 8,
        num_workers: int = 0,
        bos_at_doc_start: bool = False,
        val_fraction: float = 0.05,
        val_split: str | None = None,
        streaming: bool = False,
        cache_dir: str | None = None,
        seed: int = 0,
        max_documents: int | None = None,
        max_bytes: int | None = None,
        progress: bool = True,
        prompts: list[str] | None = None,
    ):
        super().__init__()
        _check(seq_len >= 2, f"data.seq_len: must be at least 2, got {seq_len}")
        _check(batch_size >= 1, f"data.batch_size: must be at least 1, got {batch_size}")
        _check(num_workers >= 0, f"data.num_workers: must be >= 0, got {num_workers}")
        _check(0.0 <= val_fraction < 1.0, f"data.val_fraction: must be in [0, 1), got {val_fraction}")
        _check(tokenizer is not None or vocab_size >= MIN_VOCAB,
               f"data.vocab_size: must be at least {MIN_VOCAB} to train a tokenizer, got {vocab_size}")
        for name, cap in (("max_documents", max_documents), ("max_bytes", max_bytes)):
            _check(cap is None or cap >= 1, f"data.{name}: must be positive or null, got {cap}")
        self.save_hyperparameters()
        self.data, self.text_field, self.tokenizer_path = data, text_field, tokenizer
        self.train_vocab_size, self.seq_len, self.batch_size = vocab_size, seq_len, batch_size
        self.num_workers, self.bos_at_doc_start, self.val_fraction = num_workers, bos_at_doc_start, val_fraction
        self.seed, self.progress = seed, progress
        self.prompts = list(prompts) if prompts else ["def fibonacci(n):\n"]
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        # Resolving now makes a missing file fail at config time, before any training starts.
        self.source = resolve_source(data, text_field, "train", streaming, max_documents, max_bytes)
        self.val_source = None
        if val_split is not None:
            _check(isinstance(self.source, HFDatasetSource),
                   f"data.val_split: only applies to a `datasets` name, not to data={data!r}")
            self.val_source = HFDatasetSource(self.source.name, val_split, text_field, streaming,
                                              max_documents, max_bytes)
        self._tokenizer: Tokenizer | None = None
        self._cache_folder: Path | None = None
        self.train_dataset: PackedTextDataset | None = None
        self.val_dataset: PackedTextDataset | None = None

    @property
    def tokenizer(self) -> Tokenizer:
        """The `tokenizers.Tokenizer`, loaded, or trained and cached on first access."""
        if self._tokenizer is None:
            if self.tokenizer_path is not None:
                self._tokenizer = load_tokenizer(self.tokenizer_path)
            else:
                self._tokenizer, _ = get_or_train_tokenizer(self.source, self.train_vocab_size, self._cache_root(),
                                                            show_progress=self.progress)
            self.special_ids = special_token_ids(self._tokenizer)
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """Vocabulary size of the tokenizer (model embeddings need at least this many rows)."""
        return self.tokenizer.get_vocab_size()

    def _cache_root(self) -> Path:
        """Cache root, read at use time so that $SINKFREE_CACHE set after construction still counts."""
        return self.cache_dir or default_cache_dir()

    def _token_cache(self) -> Path:
        """Folder of the tokenized train/val streams, built on first use."""
        if self._cache_folder is None:
            tok = self.tokenizer
            val_spec = self.val_source.spec() if self.val_source is not None else None
            key = token_cache_key(self.source.spec(), val_spec, tok, self.val_fraction)
            folder = self._cache_root() / "tokens" / key
            val_docs = self.val_source.documents() if self.val_source is not None else None
            self._cache_folder = build_token_cache(folder, self.source.documents(), val_docs, tok,
                                                   self.special_ids["eos"], self.val_fraction, self.progress)
        return self._cache_folder

    def prepare_data(self) -> None:
        """Train or load the tokenizer and tokenize the data into the cache (once, on the first process)."""
        self._token_cache()

    def setup(self, stage: str | None = None) -> None:
        """Open the cached token streams and pack them into windows."""
        if self.train_dataset is not None:
            return
        folder = self._token_cache()
        bos = self.special_ids["bos"] if self.bos_at_doc_start else None
        self.train_dataset = PackedTextDataset(TokenStream(folder, "train"), self.seq_len, bos)
        self.val_dataset = PackedTextDataset(TokenStream(folder, "val"), self.seq_len, bos)
        _check(len(self.train_dataset) >= self.batch_size,
               f"data.batch_size: {self.batch_size} is more than the {len(self.train_dataset)} train sequences of "
               f"seq_len {self.seq_len}; use more data or a smaller data.seq_len / data.batch_size")
        self._warn_if_repeated()

    def _warn_if_repeated(self, limit: float = 4.0) -> None:
        """Warn when trainer.max_steps would pass over the train split more than `limit` times: the validation loss
        then measures memorisation (the embedded stdlib corpus is ~1-3M tokens)."""
        trainer = self.trainer
        steps = getattr(trainer, "max_steps", -1) if trainer is not None else -1
        if steps is None or steps <= 0:
            return
        world = getattr(trainer, "world_size", 1) or 1
        accumulate = getattr(trainer, "accumulate_grad_batches", 1) or 1
        epochs = steps * accumulate * self.batch_size * world / max(1, len(self.train_dataset))
        if epochs > limit:
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(f"trainer.max_steps={steps} passes over the {len(self.train_dataset)} train sequences "
                           f"(seq_len {self.seq_len}) about {epochs:.0f} times: the model will memorise them and the "
                           f"validation loss will rise. Point data.data at a larger corpus for runs of this length.")

    def train_dataloader(self) -> StatefulDataLoader:
        """Shuffled (seeded) train batches whose position Lightning checkpoints, so resumes are exact."""
        self.setup()
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)
        sampler = ResumableShuffleSampler(self.train_dataset, seed=self.seed, num_replicas=world, rank=rank)
        return StatefulDataLoader(self.train_dataset, batch_size=self.batch_size, sampler=sampler, drop_last=True,
                                  num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches in order; an empty list when validation is off (val_fraction 0, no val_split)."""
        self.setup()
        if len(self.val_dataset) == 0:
            _check(self.val_fraction == 0 and self.val_source is None,
                   f"data.val_fraction: the validation split has {self.val_dataset.stream.n_tokens} tokens, fewer "
                   f"than seq_len + 1 = {self.seq_len + 1}; raise data.val_fraction or lower data.seq_len")
            return []
        return DataLoader(self.val_dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader | list:
        """The validation batches (there is no separate test split)."""
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        """The `prompts`, one string per batch; the task tokenizes and continues them."""
        return DataLoader(self.prompts, batch_size=1, collate_fn=_first)

    def probe_batch(self, num_sequences: int = 8, seq_len: int = 512) -> torch.Tensor:
        """Fixed (num_sequences, seq_len) ids cut from validation document starts, BOS first; deterministic."""
        self.setup()
        candidates = []
        for stream in (self.val_dataset.stream, self.train_dataset.stream):
            starts = stream.doc_starts[stream.doc_starts + seq_len - 1 <= stream.n_tokens]
            candidates += [(stream, int(s)) for s in starts]
            if len(candidates) >= num_sequences:
                break
        _check(len(candidates) >= num_sequences,
               f"probe_batch: only {len(candidates)} documents have room for seq_len {seq_len}; lower seq_len")
        # Evenly spaced picks spread the probe over many documents rather than the first few.
        picks = np.linspace(0, len(candidates) - 1, num_sequences).round().astype(int)
        rows = []
        for p in picks:
            stream, s = candidates[p]
            rows.append(np.concatenate([[self.special_ids["bos"]], stream.tokens[s: s + seq_len - 1].astype(np.int64)]))
        return torch.from_numpy(np.stack(rows).astype(np.int64))


def _first(batch: list) -> object:
    return batch[0]


def _check(ok: bool, message: str) -> None:
    """Raise a one-line `ValueError` when a condition on the options fails."""
    if not ok:
        raise ValueError(message)
