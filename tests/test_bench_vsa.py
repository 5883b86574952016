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
