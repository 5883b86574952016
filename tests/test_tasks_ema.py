"""`sinkfree.tasks.EMA`: Lightning's EMA weights, but the current weights until the average is first updated
(Lightning's own callback validates, checkpoints and ends on the untouched initial weights before then)."""
import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from sinkfree.tasks import EMA

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.seen: list[tuple[int, torch.Tensor]] = []  # (global step, weights) at each validation

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return (self.layer(x) - 3.0).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        if batch_idx == 0:
            self.seen.append((self.trainer.global_step, self.layer.weight.detach().clone()))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader():
    return DataLoader(TensorDataset(torch.randn(64, 4, generator=torch.Generator().manual_seed(0))), batch_size=4)


def _fit(tmp_path, ema, max_steps, **trainer_kw):
    torch.manual_seed(0)
    model = Tiny()
    init = model.layer.weight.detach().clone()
    trainer = L.Trainer(max_steps=max_steps, val_check_interval=2, check_val_every_n_epoch=None, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[ema], num_sanity_val_steps=0,
                        default_root_dir=tmp_path, **trainer_kw)
    trainer.fit(model, _loader(), _loader())
    return model, init, trainer


def test_before_the_first_update_everything_uses_the_current_weights(tmp_path):
    ema = EMA(decay=0.5, update_starting_at_step=4)
    model, init, _ = _fit(tmp_path, ema, max_steps=8, enable_checkpointing=False)
    (s2, w2), (s4, w4), (s6, w6), (s8, w8) = model.seen
    assert (s2, s4, s6, s8) == (2, 4, 6, 8)
    assert not torch.equal(w2, init)  # trained weights, not the initial copy Lightning's callback would show
    assert ema.has_average() and int(ema._average_model.n_averaged) == 4  # updates after steps 5..8 (index 4..7)
    final_avg = ema._average_model.module.layer.weight.detach()
    assert torch.equal(w8, final_avg) and torch.equal(model.layer.weight.detach(), final_avg)  # averaged from then


def test_a_run_that_ends_before_the_start_keeps_its_trained_weights_and_checkpoints(tmp_path):
    ema = EMA(decay=0.5, update_starting_at_step=100)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=3)
    model = Tiny()
    torch.manual_seed(0)
    trainer = L.Trainer(max_steps=6, val_check_interval=2, check_val_every_n_epoch=None, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[ema, ckpt], num_sanity_val_steps=0,
                        default_root_dir=tmp_path)
    init = model.layer.weight.detach().clone()
    trainer.fit(model, _loader(), _loader())
    trained = model.layer.weight.detach().clone()
    assert not ema.has_average() and not torch.equal(trained, init)
    assert torch.equal(model.seen[-1][1], trained)
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert torch.equal(state["state_dict"]["layer.weight"], trained)
    assert int(state["averaging_state"]["n_averaged"]) == 0

    # resuming from it restores the trained weights and starts the average later, as planned
    ema2 = EMA(decay=0.5, update_starting_at_step=7)
    model2 = Tiny()
    trainer2 = L.Trainer(max_steps=10, val_check_interval=2, check_val_every_n_epoch=None, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[ema2], num_sanity_val_steps=0,
                         enable_checkpointing=False, default_root_dir=tmp_path)
    trainer2.fit(model2, _loader(), _loader(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert [step for step, _ in model2.seen] == [8, 10]
    assert int(ema2._average_model.n_averaged) == 3  # steps 8, 9, 10 (index 7..9)


def test_lightnings_own_callback_shows_the_initial_weights_before_its_start(tmp_path):
    """Why `EMA` exists: the same run with Lightning's callback validates the untouched initial copy."""
    model, init, _ = _fit(tmp_path, L.pytorch.callbacks.EMAWeightAveraging(decay=0.5, update_starting_at_step=4),
                          max_steps=4, enable_checkpointing=False)
    assert all(torch.equal(w, init) for _, w in model.seen)
    ours, init2, _ = _fit(tmp_path, EMA(decay=0.5, update_starting_at_step=4), max_steps=4, enable_checkpointing=False)
    assert torch.equal(init, init2) and not any(torch.equal(w, init) for _, w in ours.seen)
