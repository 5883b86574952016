"""Data: offline text corpora, BPE tokenizers, the language-modelling `TextDataModule`, and images/videos for
diffusion (`SyntheticVideoDataModule`, `FolderDataModule`)."""

from .packing import PackedTextDataset, ResumableShuffleSampler, TokenStream, bos_window_starts
from .sources import FileSource, HFDatasetSource, StdlibCorpus, resolve_source
from .text import TextDataModule
from .video import FolderDataModule, SyntheticVideoDataModule
from .tokenizer import (
                        BOS,
                        EOS,
                        PAD,
                        get_or_train_tokenizer,
                        load_tokenizer,
                        special_token_ids,
                        tokenizer_main,
                        train_tokenizer,
)

__all__ = ["BOS", "EOS", "PAD", "FileSource", "FolderDataModule", "SyntheticVideoDataModule", "HFDatasetSource", "PackedTextDataset", "ResumableShuffleSampler",
           "StdlibCorpus", "TextDataModule", "TokenStream", "bos_window_starts", "get_or_train_tokenizer",
           "load_tokenizer", "resolve_source", "special_token_ids", "tokenizer_main", "train_tokenizer"]
