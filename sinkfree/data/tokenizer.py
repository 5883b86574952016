"""Byte-level BPE tokenizers: train with `tokenizers`, cache by (source, vocab size), or load a `tokenizer.json`.

Also the `sinkfree tokenizer train` verb (`tokenizer_main`).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .sources import DEFAULT_CORPUS_BYTES, resolve_source, stable_hash

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = (BOS, EOS, PAD)
# Names other tokenizers use for the same roles, tried in order when loading a foreign tokenizer.json.
_BOS_ALIASES = (BOS, "<|begin_of_text|>", "<s>", "<|endoftext|>", "<|im_start|>")
_EOS_ALIASES = (EOS, "<|end_of_text|>", "</s>", "<|endoftext|>", "<|im_end|>")
_PAD_ALIASES = (PAD, "<pad>", "<|finetune_right_pad_id|>")
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # every byte plus our specials
TOKENIZER_FORMAT = "bytelevel-bpe-v1"  # bump to invalidate cached tokenizers when training changes


def default_cache_dir() -> Path:
    """`$SINKFREE_CACHE` if set, else `~/.cache/sinkfree`."""
    return Path(os.environ.get("SINKFREE_CACHE") or "~/.cache/sinkfree").expanduser()


def train_tokenizer(texts: Iterable[str], vocab_size: int, length: int | None = None,
                    show_progress: bool = True) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style pre-tokenization, no normalizer, so decode(encode(s)) == s)."""
    if vocab_size < MIN_VOCAB:
        raise ValueError(f"vocab_size: must be at least {MIN_VOCAB} (256 bytes + {len(SPECIAL_TOKENS)} "
                         f"special tokens), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=show_progress)
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    return tok


def load_tokenizer(path: str | os.PathLike, option: str = "data.tokenizer") -> Tokenizer:
    """Load a `tokenizer.json`, with an error naming `option` when it is missing or unreadable."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{option}: tokenizer file {str(path)!r} does not exist")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise ValueError(f"{option}: cannot read tokenizer {str(path)!r}: {e}") from e


def special_token_ids(tok: Tokenizer) -> dict[str, int | None]:
    """Ids of BOS, EOS and PAD (PAD may be None); raises if the tokenizer has no BOS or EOS token."""
    def first(aliases):
        for name in aliases:
            i = tok.token_to_id(name)
            if i is not None:
                return i
        return None

    ids = {"bos": first(_BOS_ALIASES), "eos": first(_EOS_ALIASES), "pad": first(_PAD_ALIASES)}
    for role, aliases in (("bos", _BOS_ALIASES), ("eos", _EOS_ALIASES)):
        if ids[role] is None:
            raise ValueError(f"data.tokenizer: no {role.upper()} token found (looked for {', '.join(aliases)})")
    return ids


def save_atomic(tok: Tokenizer, path: str | os.PathLike) -> Path:
    """Write `tokenizer.json` through a temporary file and a rename, so readers never see half a file."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tokenizer-", suffix=".json.tmp")
    os.close(fd)
    try:
        tok.save(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def cached_tokenizer_path(source_spec: dict, vocab_size: int, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the tokenizer trained on `source_spec` with `vocab_size` lives in the cache."""
    key = stable_hash({"format": TOKENIZER_FORMAT, "source": source_spec, "vocab_size": vocab_size})
    return Path(cache_dir or default_cache_dir()) / "tokenizers" / key / "tokenizer.json"


def get_or_train_tokenizer(source, vocab_size: int, cache_dir: str | os.PathLike | None = None,
                           show_progress: bool = True) -> tuple[Tokenizer, Path]:
    """Load the cached tokenizer for (source, vocab size), training and caching it on first use."""
    path = cached_tokenizer_path(source.spec(), vocab_size, cache_dir)
    if path.is_file():
        return Tokenizer.from_file(str(path)), path
    tok = train_tokenizer((text for _, text in source.documents()), vocab_size, show_progress=show_progress)
    return tok, save_atomic(tok, path)


def _build_parser() -> argparse.ArgumentParser:
    """Parser of `sinkfree tokenizer`."""
    parser = argparse.ArgumentParser(prog="sinkfree tokenizer", description="Tokenizer tools.")
    verbs = parser.add_subparsers(dest="verb", required=True)
    train = verbs.add_parser(
        "train", help="train a byte-level BPE tokenizer and write tokenizer.json",
        description="Train a byte-level BPE tokenizer (special tokens <|bos|>, <|eos|>, <|pad|>) on local files, "
                    "a `datasets` name, or, without --data, the Python standard library shipped with this "
                    "interpreter (no download).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    train.add_argument("--data", nargs="+", default=None, metavar="PATH_OR_NAME",
                       help="files, folders or globs (recursive **) of plain text or source code (.txt .md .py .h ...) or "
                            ".json/.jsonl/.parquet, or one `datasets` name "
                            "(name or name:config); omit for the embedded stdlib corpus")
    train.add_argument("--vocab-size", type=int, default=8192,
                       help=f"vocabulary size including the 3 special tokens (at least {MIN_VOCAB})")
    train.add_argument("--output", required=True, help="path of the tokenizer.json to write (folders are created)")
    train.add_argument("--text-field", default="text", help="column holding the text in json/jsonl/parquet/datasets")
    train.add_argument("--split", default="train", help="split of a `datasets` name to train on")
    train.add_argument("--streaming", action="store_true", help="stream a `datasets` name instead of downloading it whole")
    train.add_argument("--max-documents", type=int, default=None, help="train on at most this many documents")
    train.add_argument("--max-bytes", type=int, default=None,
                       help=f"train on at most about this many bytes of text (stdlib corpus default: {DEFAULT_CORPUS_BYTES})")
    return parser


def tokenizer_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `sinkfree tokenizer ...`; returns the exit code."""
    args = _build_parser().parse_args(argv)
    data = args.data[0] if args.data and len(args.data) == 1 else args.data
    try:
        source = resolve_source(data, args.text_field, args.split, args.streaming, args.max_documents,
                                args.max_bytes)
        from tqdm import tqdm

        # tqdm shows documents read; the tokenizers trainer then shows its own merge progress.
        docs = tqdm(source.documents(), desc="reading documents", unit="doc", file=sys.stderr)
        tok = train_tokenizer((text for _, text in docs), args.vocab_size)
        path = save_atomic(tok, args.output)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path} (vocab size {tok.get_vocab_size()})")
    return 0
