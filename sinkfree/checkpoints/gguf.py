"""Import llama-architecture GGUF files: dequantize tensors, undo llama.cpp's q/k permutation, rebuild the tokenizer.

Needs the `gguf` package (`pip install sinkfree[gguf]`): it is only imported here, so the rest of sinkfree
works without it. Tested types: F32, F16, BF16, Q8_0, Q4_0, Q4_1; other types `gguf` can dequantize
(K-quants, Q5_*) convert with a warning that they are untested.
"""
from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from sinkfree.checkpoints.io import CheckpointError
from sinkfree.checkpoints.source import Source

TESTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")

# GGUF tensor name -> sinkfree parameter name ({} = layer index).
_TENSOR_MAP = {
    "token_embd.weight": "embed.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{}.attn_norm.weight": "layers.{}.attn_norm.weight",
    "blk.{}.attn_q.weight": "layers.{}.attn.q_proj.weight",
    "blk.{}.attn_k.weight": "layers.{}.attn.k_proj.weight",
    "blk.{}.attn_v.weight": "layers.{}.attn.v_proj.weight",
    "blk.{}.attn_output.weight": "layers.{}.attn.o_proj.weight",
    "blk.{}.ffn_norm.weight": "layers.{}.mlp_norm.weight",
    "blk.{}.ffn_gate.weight": "layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "layers.{}.mlp.down_proj.weight",
}

# llama.cpp pre-tokenizer names (`tokenizer.ggml.pre`) -> the split regex in front of the byte-level step.
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    "default": "gpt2", "gpt-2": "gpt2", "gpt2": "gpt2", "phi-2": "gpt2", "olmo": "gpt2", "roberta-bpe": "gpt2",
    "smollm": "digits+gpt2", "starcoder": "digits+gpt2", "refact": "digits+gpt2",
    "llama3": "llama3", "llama-v3": "llama3", "llama-bpe": "llama3", "falcon3": "llama3",
    "qwen2": "qwen2", "deepseek-r1-qwen": "qwen2",
}


def _gguf():
    try:
        import gguf
    except ImportError as e:
        raise CheckpointError("reading GGUF files needs the `gguf` package: pip install 'sinkfree[gguf]'") from e
    return gguf


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's `permute` of a q/k weight (out, in): interleaved RoPE pairs -> HF half-split rows."""
    out, inp = w.shape
    return w.reshape(n_head, out // n_head // 2, 2, inp).transpose(1, 2).reshape(out, inp)


def _arch(reader, tensor_names: set[str]) -> dict:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise CheckpointError(f"GGUF architecture {arch!r} is not supported (only 'llama')")
    if "rope_freqs.weight" in tensor_names:
        raise CheckpointError("GGUF with a rope_freqs tensor (llama3 RoPE scaling) is not supported")
    def get(key: str):
        return _field(reader, f"llama.{key}")

    n_embd, n_head = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(get("attention.key_length") or get("rope.dimension_count") or n_embd // n_head)
    tokens = _field(reader, "tokenizer.ggml.tokens")
    scaling = None
    kind = get("rope.scaling.type")
    if kind not in (None, "none"):
        if kind != "linear":
            raise CheckpointError(f"GGUF rope scaling {kind!r} is not supported (only linear)")
        scaling = {"type": "linear", "factor": float(get("rope.scaling.factor"))}
    return {
        "vocab_size": int(get("vocab_size") or len(tokens)),
        "n_layer": int(get("block_count")),
        "n_embd": n_embd,
        "n_head": n_head,
        "n_kv_head": int(get("attention.head_count_kv") or n_head),
        "head_dim": head_dim,
        "intermediate_size": int(get("feed_forward_length")),
        "block_size": int(get("context_length") or 2048),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon") or 1e-5),
        "rope_theta": float(get("rope.freq_base") or 10000.0),
        "rope_scaling": scaling,
        "tie_embeddings": "output.weight" not in tensor_names,
    }


def _sinkfree_name(gguf_name: str) -> str | None:
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    if m:
        name = _TENSOR_MAP.get(f"blk.{{}}.{m.group(2)}")
        return name.format(m.group(1)) if name else None
    return _TENSOR_MAP.get(gguf_name)


def open_gguf(file: Path) -> Source:
    """A llama GGUF as a `Source`: tensors dequantized to fp32 one at a time, q/k in the HF layout."""
    gguf = _gguf()
    try:
        reader = gguf.GGUFReader(str(file))
    except Exception as e:  # the reader raises ValueError/IndexError/struct errors on truncated files
        raise CheckpointError(f"{file} is not a complete GGUF file (truncated or corrupt?): {e}") from e
    tensors = {t.name: t for t in reader.tensors}
    arch = _arch(reader, set(tensors))
    names, shapes, unknown = {}, {}, []
    for t in reader.tensors:
        name = _sinkfree_name(t.name)
        if name is None:
            unknown.append(t.name)
            continue
        if t.tensor_type.name not in TESTED_TYPES:
            warnings.warn(f"{file}: tensor {t.name} has type {t.tensor_type.name}, dequantized by `gguf` but "
                          f"untested here (tested: {', '.join(TESTED_TYPES)})")
        names[t.name] = name
        shapes[name] = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists dims innermost first
    if unknown:
        raise CheckpointError(f"{file}: tensors outside the llama layout: {unknown[:4]}")

    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        for gname, name in names.items():
            t = tensors[gname]
            data = np.asarray(gguf.dequantize(t.data, t.tensor_type), dtype=np.float32)
            w = torch.from_numpy(data.reshape(shapes[name]).copy())
            if name.endswith("attn.q_proj.weight"):
                w = unpermute_qk(w, arch["n_head"])
            elif name.endswith("attn.k_proj.weight"):
                w = unpermute_qk(w, arch["n_kv_head"])
            yield name, w

    hf_config = {"bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
                 "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id")}
    tokenizer = {}
    if "tokenizer.ggml.tokens" in reader.fields:
        tok_json, tok_config = tokenizer_from_gguf(reader)
        tokenizer = {"tokenizer.json": tok_json, "tokenizer_config.json": tok_config}
    return Source(file, "gguf", arch, shapes, {n: torch.float32 for n in shapes}, stream, hf_config, tokenizer)


def _pre_tokenizer(name: str | None):
    from tokenizers import Regex, pre_tokenizers

    kind = PRE_TOKENIZERS.get(name or "default")
    if kind is None:
        warnings.warn(f"GGUF pre-tokenizer {name!r} is unknown; falling back to GPT-2 byte-level splitting "
                      f"(known: {sorted(PRE_TOKENIZERS)})")
        kind = "gpt2"
    if kind in ("gpt2", "digits+gpt2"):
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if kind == "gpt2":
            return byte_level
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    regex = {"llama3": _LLAMA3_REGEX, "qwen2": _QWEN2_REGEX}[kind]
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def tokenizer_from_gguf(reader) -> tuple[str, str]:
    """(tokenizer.json text, tokenizer_config.json text) rebuilt from a GGUF's `tokenizer.ggml.*` metadata.

    Only byte-level BPE (`tokenizer.ggml.model == "gpt2"`) is rebuilt; control tokens become special
    added tokens, user-defined ones plain added tokens.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise CheckpointError(f"GGUF tokenizer model {model!r} is not supported (only 'gpt2' byte-level BPE)")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = _pre_tokenizer(_field(reader, "tokenizer.ggml.pre"))
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    bos_id = _field(reader, "tokenizer.ggml.bos_token_id")
    if _field(reader, "tokenizer.ggml.add_bos_token", False) and bos_id is not None:
        bos = tokens[int(bos_id)]
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                          special_tokens=[(bos, int(bos_id))])])
    control = [AddedToken(tokens[i], special=True, normalized=False) for i, k in enumerate(types) if k == 3]
    user = [AddedToken(tokens[i], special=False, normalized=False) for i, k in enumerate(types) if k == 4]
    tok.add_special_tokens(control)
    tok.add_tokens(user)

    def token(key: str) -> str | None:
        i = _field(reader, f"tokenizer.ggml.{key}_token_id")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "bos_token": token("bos"), "eos_token": token("eos"), "unk_token": token("unknown"),
              "pad_token": token("padding"), "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
              "model_max_length": int(_field(reader, "llama.context_length") or 2048)}
    template = _field(reader, "tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    return tok.to_str(), json.dumps({k: v for k, v in config.items() if v is not None}, indent=2) + "\n"


def convert_from_gguf(file: str | Path, dst: str | Path, dtype: str = "float32", force: bool = False) -> Path:
    """`sinkfree convert from-gguf`: a llama GGUF -> a sinkfree folder (weights dequantized to `dtype`)."""
    from sinkfree.checkpoints.hf import DTYPES, write_sinkfree_folder

    file = Path(file).expanduser()
    if not file.is_file():
        raise CheckpointError(f"GGUF file {file} does not exist")
    return write_sinkfree_folder(Path(dst), open_gguf(file), DTYPES[dtype], force)
