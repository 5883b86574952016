"""`sinkfree bench vsa --model`: the training-step timing runs forward, backward and an optimizer step for the
dense and the VSA model (on the CPU here, with triton's do_bench replaced: it needs a GPU)."""
import pytest
import torch
import triton.testing


from sinkfree.bench.vsa import bench_model, build_parser

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array:DeprecationWarning")


def test_model_step_rows_and_optimizer(monkeypatch):
    steps = []

    def fake_do_bench(fn, **kw):
        fn()
        fn()  # do_bench calls the step many times: nothing in it may be single-use
        steps.append(1)
        return 2.0

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    seen = []
    real_step = torch.optim.AdamW.step

    def counting_step(self, *a, **kw):
        seen.append(sum(p.grad is not None for g in self.param_groups for p in g["params"]))
        return real_step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", counting_step)
    args = build_parser().parse_args(["--model", "dit-tiny", "--grid", "4,8,8", "--sparsity", "0.5"])
    rows = bench_model(args, None, device="cpu")
    assert [r["name"] for r in rows] == ["dit-tiny sdpa", "dit-tiny vsa"]
    assert all(r["ms"] == 2.0 and r["S"] == 256 for r in rows)
    assert rows[1]["params"] > rows[0]["params"]  # VSA adds the coarse gate projection
    assert len(steps) == 2 and len(seen) == 6 and min(seen) > 0  # every timed step ran AdamW on gradients
    args = build_parser().parse_args(["--model", "dit-tiny", "--grid", "4,8,8", "--proj", "both"])
    rows = bench_model(args, None, device="cpu")
    assert [r["name"] for r in rows] == ["dit-tiny sdpa", "dit-tiny sdpa fused", "dit-tiny vsa",
                                         "dit-tiny vsa fused"]
    assert [r["fused_proj"] for r in rows] == [False, True, False, True]
    from sinkfree.bench.vsa import dense_baselines

    rows[0]["ms"], rows[1]["ms"] = 3.0, 2.5  # the faster dense layout is the baseline
    assert dense_baselines(rows) == {"model": 2.5}


def test_profile_steps_profiles_each_arm_and_validates(monkeypatch, capsys):
    from sinkfree.bench import profiling
    from sinkfree.bench.vsa import vsa_main

    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: (fn(), 2.0)[1])
    calls = []

    def fake_profile(fn, n, **kw):
        for _ in range(n):
            fn()
        calls.append(n)
        return [{"kernel": "(all GPU kernels)", "ms_per_step": 1.5, "calls_per_step": 3.0}]

    monkeypatch.setattr(profiling, "profile_calls", fake_profile)
    args = build_parser().parse_args(["--model", "dit-tiny", "--grid", "4,8,8", "--profile-steps", "2"])
    rows = bench_model(args, None, device="cpu")
    assert calls == [2, 2] and all(r["profile"][0]["ms_per_step"] == 1.5 for r in rows)
    with pytest.raises(SystemExit):
        vsa_main(["--profile-steps", "2"])  # without --model
    assert "--profile-steps 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        vsa_main(["--proj", "both"])  # without --model
    assert "--proj both: only with --model" in capsys.readouterr().err


def test_kernel_table_sums_gpu_kernels_per_step():
    from types import SimpleNamespace as NS

    from sinkfree.bench.profiling import format_kernels, kernel_table

    cuda, cpu = NS(name="CUDA"), NS(name="CPU")
    events = [NS(key="gemm", self_device_time_total=6000.0, count=6, device_type=cuda),
              NS(key="softmax", self_device_time_total=3000.0, count=3, device_type=cuda),
              NS(key="Optimizer.step#AdamW.step", self_device_time_total=9000.0, count=3, device_type=cuda),
              NS(key="aten::mm", self_device_time_total=0.0, count=6, device_type=cpu)]
    rows = kernel_table(NS(key_averages=lambda: events), n_steps=3, top=1)
    assert rows[0] == {"kernel": "(all GPU kernels)", "ms_per_step": 3.0, "calls_per_step": 3.0}
    assert rows[1:] == [{"kernel": "gemm", "ms_per_step": 2.0, "calls_per_step": 2.0}]
    assert "gemm" in format_kernels(rows)[1]


def test_dense_arm_attention_context_can_be_entered_every_step():
    """The CUDA context factory gives a fresh sdpa_kernel context each step (one shared context raised on its
    second use, which stopped the GPU bench); entering it only sets backend flags, so it runs on CPU too."""
    from sinkfree.bench.vsa import attention_context

    for device in ("cuda", "cpu"):
        make = attention_context(device)
        for _ in range(3):
            with make():
                pass
