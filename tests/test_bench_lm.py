"""`sinkfree bench lm` option checks (the benchmark itself needs a GPU)."""
import pytest

from sinkfree.bench.lm import ProfileSteps, lm_main


@pytest.mark.parametrize("argv", [["r.yaml", "--steps", "100", "--skip", "30", "--profile-steps", "70"],
                                  ["r.yaml", "--profile-steps", "-1"]])
def test_profile_steps_must_leave_timed_steps(argv, capsys):
    with pytest.raises(SystemExit) as e:
        lm_main(argv)
    assert e.value.code == 2
    assert "--profile-steps" in capsys.readouterr().err


def test_profile_callback_waits_for_its_window():
    prof = ProfileSteps(start=10, n=3)

    class Trainer:
        global_step = 5

    prof.on_train_batch_start(Trainer(), None, None, 0)  # before the window: nothing starts
    prof.on_train_batch_end(Trainer(), None, None, None, 0)
    assert prof.prof is None and prof.kernels == []
