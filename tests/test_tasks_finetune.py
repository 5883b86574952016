"""CausalLM fine-tune options: `trainable: new` from load_for_init's new_keys, and the sink logits' own LR."""
from types import SimpleNamespace

import pytest
import torch

from sinkfree.checkpoints.export import save_hf
from sinkfree.models.llm import LLM, LLMConfig
from sinkfree.tasks import CausalLM

BASE = LLMConfig(vocab_size=128, n_layer=2, n_embd=32, n_head=4, n_kv_head=2, intermediate_size=64, block_size=64)


def optimizer_of(task: CausalLM, total_steps: int = 10):
    task._trainer = SimpleNamespace(estimated_stepping_batches=total_steps)  # all configure_optimizers reads
    conf = task.configure_optimizers()
    return conf["optimizer"], conf["lr_scheduler"]["scheduler"]


def test_sink_logits_get_their_own_scaled_lr_without_weight_decay():
    task = CausalLM(arch=LLMConfig(**{**BASE.__dict__, "attn_sink": "learnable"}), lr=1e-3, sink_lr_scale=50.0,
                    weight_decay=0.1, warmup_steps=0)
    task.configure_model()
    opt, sched = optimizer_of(task)
    sinks = [g for g in opt.param_groups if g.get("name") == "sinks"]
    assert len(sinks) == 1
    assert {id(p) for p in sinks[0]["params"]} == {id(b.attn.sink) for b in task.model.layers}
    assert sinks[0]["lr"] == pytest.approx(5e-2) and sinks[0]["weight_decay"] == 0.0
    others = [g for g in opt.param_groups if g is not sinks[0]]
    assert all(g["lr"] == pytest.approx(1e-3) for g in others)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(task.model.parameters()))
    for _ in range(5):  # the schedule scales every group alike: the ratio stays sink_lr_scale
        opt.step()
        sched.step()
    assert sinks[0]["lr"] / others[0]["lr"] == pytest.approx(50.0)


def test_no_sink_group_without_learnable_sinks_and_bad_scale_rejected():
    task = CausalLM(arch=BASE, sink_lr_scale=100.0)
    task.configure_model()
    opt, _ = optimizer_of(task)
    assert all(g.get("name") != "sinks" for g in opt.param_groups)
    with pytest.raises(ValueError, match="sink_lr_scale"):
        CausalLM(arch=BASE, sink_lr_scale=0.0)


@pytest.mark.parametrize("compile,mode,match", [(True, "fastest", "compile_mode='fastest'.*allowed"),
                                                 (False, "max-autotune", "needs model.compile: true")])
def test_compile_mode_checked(compile, mode, match):
    with pytest.raises(ValueError, match=match):
        CausalLM(arch=BASE, compile=compile, compile_mode=mode)
    from sinkfree.tasks.flow import RectifiedFlow

    with pytest.raises(ValueError, match=match):
        RectifiedFlow(compile=compile, compile_mode=mode)


def test_compile_mode_reaches_torch_compile(monkeypatch):
    seen = {}
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: seen.update(kw))
    task = CausalLM(arch=BASE, compile=True, compile_mode="max-autotune-no-cudagraphs")
    task.configure_model()
    assert seen == {"mode": "max-autotune-no-cudagraphs"}


def test_trainable_new_trains_the_calibrated_sinks(tmp_path):
    torch.manual_seed(0)
    save_hf(LLM(BASE), tmp_path / "hf")
    task = CausalLM(arch=LLMConfig(attn_sink="learnable"), init_from=str(tmp_path / "hf"), trainable="new",
                    lr=1e-4, sink_lr_scale=100.0)
    task.configure_model()
    names = [f"layers.{i}.attn.sink" for i in range(BASE.n_layer)]
    # the calibrated sinks come in the state dict (load_state_dict does not report them missing): still new
    assert task.new_parameter_names == names
    assert [n for n, p in task.model.named_parameters() if p.requires_grad] == names
    logits = torch.stack([task.model.layers[i].attn.sink for i in range(BASE.n_layer)])
    assert logits.unique().numel() > 1 and (logits < 0).all()  # per head, not one shared value
    opt, _ = optimizer_of(task)
    assert [g["name"] for g in opt.param_groups] == ["sinks"] and opt.param_groups[0]["initial_lr"] == pytest.approx(1e-2)
