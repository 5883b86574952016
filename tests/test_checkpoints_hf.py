"""HF import/export: logits match `transformers` on tiny random models, round trips are bit-exact, streaming."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from sinkfree.checkpoints import CheckpointError, load_for_init, load_pretrained
from sinkfree.checkpoints.cli import convert_main
from sinkfree.checkpoints.export import save_hf
from sinkfree.models.llm import LLM, LLMConfig

transformers = pytest.importorskip("transformers", reason="transformers (the `test` extra) is not installed")

SIZES = {"vocab_size": 97, "hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 6,
         "num_key_value_heads": 2, "intermediate_size": 80, "max_position_embeddings": 64, "rms_norm_eps": 1e-6}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
CASES = {
    "llama": ("Llama", {}),
    "llama-tied-llama3": ("Llama", {"tie_word_embeddings": True, "rope_scaling": LLAMA3}),
    "llama-yarn": ("Llama", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                              "original_max_position_embeddings": 16}}),
    "llama-linear": ("Llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}, "rope_theta": 500.0}),
    "qwen2": ("Qwen2", {}),
    "qwen3": ("Qwen3", {"head_dim": 16}),
}


def make_hf(family: str, extra: dict, seed: int = 0):
    """A random tiny HF model, with norms and biases moved off their init so they are tested too."""
    torch.manual_seed(seed)
    config = getattr(transformers, f"{family}Config")(**SIZES, **extra)
    model = getattr(transformers, f"{family}ForCausalLM")(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path, case):
    family, extra = CASES[case]
    hf = make_hf(family, extra)
    hf.save_pretrained(tmp_path / "hf")
    model = load_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, SIZES["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (hf(idx).logits - model(idx)).abs().max().item()
    assert diff <= 1e-4, f"{case}: max |Δ logit| = {diff}"


def test_v4_style_rope_theta_config(tmp_path):
    hf = make_hf("Llama", {"rope_theta": 1234.0})
    hf.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config.pop("rope_parameters", None)
    config.update(rope_theta=1234.0, rope_scaling=None)  # how transformers 4.x wrote it
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    assert load_pretrained(tmp_path / "hf").config.rope_theta == 1234.0


@pytest.mark.parametrize("case", ["llama-tied-llama3", "qwen2", "qwen3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_bit_exact(tmp_path, case, dtype):
    family, extra = CASES[case]
    make_hf(family, extra).to(dtype).save_pretrained(tmp_path / "hf")
    assert convert_main(["from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "sf")]) == 0
    assert convert_main(["to-hf", str(tmp_path / "sf"), "--out", str(tmp_path / "back"), "--no-tokenizer"]) == 0
    a, b = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    # and through an fp32 model in memory back to the stored dtype
    save_hf(load_pretrained(tmp_path / "hf"), tmp_path / "mem", dtype=str(dtype).removeprefix("torch."))
    c = load_file(tmp_path / "mem" / "model.safetensors")
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_exported_folder_loads_in_transformers(tmp_path):
    """A sinkfree-trained (plain) model exports to a folder transformers reproduces."""
    config = LLMConfig(vocab_size=64, n_layer=2, n_embd=32, n_head=4, n_kv_head=2, intermediate_size=48,
                       block_size=32, qk_norm=True, tie_embeddings=True, rope_theta=777.0)
    model = LLM(config).eval()
    save_hf(model, tmp_path / "out")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    idx = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        assert (hf(idx).logits - model(idx)).abs().max() <= 1e-4


def test_lightning_ckpt_import_and_export(tmp_path):
    config = LLMConfig(vocab_size=64, n_layer=2, n_embd=32, n_head=4, intermediate_size=48, block_size=32,
                       attn_gate="elementwise", attn_sink="learnable", residual_sink="gatednorm")
    model = LLM(config)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"arch": config.__dict__.copy(), "lr": 1e-3}},
               tmp_path / "last.ckpt")
    loaded = load_pretrained(tmp_path / "last.ckpt")
    idx = torch.randint(0, 64, (1, 16))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))
    # to-hf keeps the switches: new parameters under their documented names, read back exactly
    with pytest.warns(UserWarning, match="transformers"):
        assert convert_main(["to-hf", str(tmp_path / "last.ckpt"), "--out", str(tmp_path / "hf"),
                             "--no-tokenizer"]) == 0
    keys = load_file(tmp_path / "hf" / "model.safetensors")
    assert "model.layers.0.self_attn.sinks" in keys and "model.layers.1.self_attn.gate_proj.weight" in keys
    assert "model.layers.0.input_layernorm.gate_up.weight" in keys
    again = load_pretrained(tmp_path / "hf")
    with torch.no_grad():
        assert torch.equal(again(idx), model(idx))


def test_to_hf_needs_a_tokenizer_or_the_flag(tmp_path):
    model = LLM(LLMConfig(vocab_size=64, n_layer=1, n_embd=32, n_head=4, block_size=16))
    save_file(model.state_dict(), tmp_path / "w.safetensors",
              metadata={"sinkfree.arch": json.dumps(model.config.__dict__)})
    assert convert_main(["to-hf", str(tmp_path / "w.safetensors"), "--out", str(tmp_path / "o")]) == 1
    assert not (tmp_path / "o").exists()


def test_recipe_contradicting_the_checkpoint_is_an_error(tmp_path):
    make_hf("Llama", {}).save_pretrained(tmp_path / "hf")
    full = {**LLMConfig().__dict__, "n_embd": 64, "attn_gate": "elementwise"}  # what the task passes
    with pytest.raises(CheckpointError, match="n_embd: recipe 64, checkpoint 48"):
        load_for_init(tmp_path / "hf", full)
    # defaults (n_embd 768 etc.) are not contradictions; switches and free fields are added on top
    config, state, new = load_for_init(tmp_path / "hf", {**LLMConfig().__dict__, "block_size": 128,
                                                          "attn_gate": "headwise"})
    assert (config.n_embd, config.block_size, config.attn_gate) == (48, 128, "headwise")
    model = LLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert sorted(missing) == new == [f"layers.{i}.attn.gate_proj.weight" for i in range(2)] and not unexpected


MEMORY_SCRIPT = textwrap.dedent("""
    import sys, torch
    from sinkfree.checkpoints.hf import convert_from_hf
    from sinkfree.models.llm import LLM, LLMConfig

    with torch.device("meta"):
        LLM(LLMConfig(n_layer=1))  # first use imports the attention backends: not part of the bound

    def status(key):
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
    base = status("VmRSS:")
    convert_from_hf(sys.argv[1], sys.argv[2])
    print(status("VmHWM:") - base)
""")


def test_sharded_import_streams(tmp_path):
    """Peak memory while converting 4 shards stays under the largest shard + the model + 20%."""
    if not sys.platform.startswith("linux"):
        pytest.skip("peak RSS is read from /proc (Linux only)")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=4096, hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                                      intermediate_size=1024, max_position_embeddings=64)
    hf = transformers.LlamaForCausalLM(config)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="10MB")
    shards = sorted((tmp_path / "hf").glob("*.safetensors"))
    assert len(shards) >= 3 and (tmp_path / "hf" / "model.safetensors.index.json").exists()
    del hf
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path / "hf"), str(tmp_path / "sf")],
                         check=True, capture_output=True, text=True)
    peak = int(out.stdout.strip().splitlines()[-1])
    model_bytes = sum(f.stat().st_size for f in shards)
    bound = 1.2 * (max(f.stat().st_size for f in shards) + model_bytes)
    print(f"peak {peak / 2**20:.1f} MiB, bound {bound / 2**20:.1f} MiB")
    assert peak <= bound, f"peak {peak / 2**20:.1f} MiB > bound {bound / 2**20:.1f} MiB"
    a = load_pretrained(tmp_path / "sf")
    b = load_pretrained(tmp_path / "hf")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
