"""Bad input — unknown architecture, missing/extra keys, wrong shapes, truncated files — is a clear error
that writes nothing (and leaves an existing output untouched)."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from sinkfree.checkpoints import CheckpointError, load_for_init
from sinkfree.checkpoints.cli import convert_main
from sinkfree.checkpoints.export import save_hf
from sinkfree.models.llm import LLM, LLMConfig

CONFIG = LLMConfig(vocab_size=64, n_layer=2, n_embd=32, n_head=4, intermediate_size=48, block_size=32)


@pytest.fixture
def hf(tmp_path):
    torch.manual_seed(0)
    save_hf(LLM(CONFIG), tmp_path / "hf")
    return tmp_path / "hf"


def edit_weights(folder, fn):
    tensors = load_file(folder / "model.safetensors")
    fn(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def edit_config(folder, fn):
    config = json.loads((folder / "config.json").read_text())
    fn(config)
    (folder / "config.json").write_text(json.dumps(config))


def from_hf_fails(src, out, match, capsys):
    """Both entry points refuse with a message matching `match`; the CLI leaves no output folder."""
    with pytest.raises(CheckpointError, match=match):
        load_for_init(src, {})
    assert convert_main(["from-hf", str(src), "--out", str(out)]) == 1
    assert "sinkfree convert from-hf: error:" in capsys.readouterr().err
    assert not out.exists()
    assert not any(p.name.startswith(f".{out.name}.tmp") for p in out.parent.iterdir())


def test_unknown_architecture(hf, tmp_path, capsys):
    edit_config(hf, lambda c: c.update(architectures=["GPT2LMHeadModel"], model_type="gpt2"))
    from_hf_fails(hf, tmp_path / "out", "unsupported architecture", capsys)


def test_unsupported_variant(hf, tmp_path, capsys):
    edit_config(hf, lambda c: c.update(hidden_act="gelu"))
    from_hf_fails(hf, tmp_path / "out", "hidden_act", capsys)


def test_missing_key(hf, tmp_path, capsys):
    edit_weights(hf, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    from_hf_fails(hf, tmp_path / "out", r"1 missing \(e.g. \['layers.1.mlp.up_proj.weight'\]\)", capsys)


def test_extra_key(hf, tmp_path, capsys):
    edit_weights(hf, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(32)}))
    from_hf_fails(hf, tmp_path / "out", r"1 unexpected \(e.g. \['layers.0.attn.q_proj.bias'\]\)", capsys)


def test_key_outside_the_layout(hf, tmp_path, capsys):
    edit_weights(hf, lambda t: t.update({"transformer.wte.weight": torch.zeros(2)}))
    from_hf_fails(hf, tmp_path / "out", "outside the Llama layout", capsys)


def test_shape_mismatch(hf, tmp_path, capsys):
    edit_config(hf, lambda c: c.update(intermediate_size=40))
    from_hf_fails(hf, tmp_path / "out", r"wrong shape .*mlp.*checkpoint \[48, 32\] vs model \[40, 32\]", capsys)


def test_truncated_safetensors(hf, tmp_path, capsys):
    data = (hf / "model.safetensors").read_bytes()
    (hf / "model.safetensors").write_bytes(data[: len(data) - 1000])
    from_hf_fails(hf, tmp_path / "out", "truncated or corrupt", capsys)


def test_malformed_config(hf, tmp_path, capsys):
    (hf / "config.json").write_text("{not json")
    from_hf_fails(hf, tmp_path / "out", "cannot read .*config.json", capsys)


def test_missing_shard(hf, tmp_path, capsys):
    (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-2.safetensors"}}))
    from_hf_fails(hf, tmp_path / "out", "shards that do not exist", capsys)


def test_truncated_lightning_ckpt(tmp_path):
    model = LLM(CONFIG)
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": {"arch": CONFIG.__dict__}}, tmp_path / "a.ckpt")
    data = (tmp_path / "a.ckpt").read_bytes()
    (tmp_path / "b.ckpt").write_bytes(data[: len(data) // 2])
    assert convert_main(["to-hf", str(tmp_path / "b.ckpt"), "--out", str(tmp_path / "out"), "--no-tokenizer"]) == 1
    assert not (tmp_path / "out").exists()
    torch.save({"state_dict": {}}, tmp_path / "c.ckpt")
    with pytest.raises(CheckpointError, match="not a sinkfree Lightning checkpoint"):
        load_for_init(tmp_path / "c.ckpt", {})


def test_failed_force_leaves_the_old_output(hf, tmp_path):
    assert convert_main(["from-hf", str(hf), "--out", str(tmp_path / "out")]) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    assert convert_main(["from-hf", str(hf), "--out", str(tmp_path / "out")]) == 1  # exists, no --force
    edit_weights(hf, lambda t: t.pop("model.norm.weight"))
    assert convert_main(["from-hf", str(hf), "--out", str(tmp_path / "out"), "--force"]) == 1
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before


def test_error_while_writing_leaves_nothing(hf, tmp_path, monkeypatch):
    """A failure half-way through the tensor stream (e.g. a disk error) removes the partial folder."""
    from sinkfree.checkpoints import io

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(io, "write_json", broken)
    monkeypatch.setattr("sinkfree.checkpoints.hf.write_json", broken)
    with pytest.raises(OSError, match="disk full"):
        convert_main(["from-hf", str(hf), "--out", str(tmp_path / "out")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
