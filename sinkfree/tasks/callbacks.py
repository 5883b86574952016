"""Lightning callbacks of the tasks: token throughput and model FLOP utilisation, and EMA weights that start late."""

from __future__ import annotations

from typing import Any, Optional

from lightning.pytorch.callbacks import EMAWeightAveraging, ThroughputMonitor


def _batch_size(batch: Any) -> int:
    return batch["input_ids"].shape[0]


def _tokens(batch: Any) -> int:
    ids = batch["input_ids"]  # (B, S + 1): inputs and shifted targets
    return ids.shape[0] * (ids.shape[1] - 1)


class TokenThroughput(ThroughputMonitor):
    """Logs tokens/s, TFLOP/s and MFU for `input_ids` batches; MFU against `peak_tflops` when given."""

    def __init__(self, window_size: int = 20, peak_tflops: Optional[float] = None) -> None:
        """Args:
        window_size: batches averaged for each throughput figure.
        peak_tflops: the card's bf16 matmul peak in TFLOP/s for MFU (None: Lightning's datasheet figure).
        """
        super().__init__(batch_size_fn=_batch_size, length_fn=_tokens, window_size=window_size)
        self.peak_tflops = peak_tflops

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.peak_tflops:
            self.available_flops = int(self.peak_tflops * 1e12)


class EMA(EMAWeightAveraging):
    """Lightning's `EMAWeightAveraging` (same arguments) that uses the current weights until its first update.

    With `update_starting_at_step` Lightning's callback validates, checkpoints and finishes training on its
    averaged copy even before that copy was ever updated, i.e. on the initial weights. This one keeps the current
    weights in all three places until the average holds something; afterwards it behaves the same. The video
    recipes start it after the VSA sparsity ramp, so the average never mixes weights trained at other sparsities.
    """

    _swapped = False

    def has_average(self) -> bool:
        """Whether the averaged copy has been updated at least once."""
        return self._average_model is not None and int(self._average_model.n_averaged) > 0

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._swapped = self.has_average()
        if self._swapped:
            super().on_validation_epoch_start(trainer, pl_module)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self._swapped:
            super().on_validation_epoch_end(trainer, pl_module)
            self._swapped = False

    def on_train_end(self, trainer, pl_module) -> None:
        if self.has_average():
            super().on_train_end(trainer, pl_module)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self._average_model is None or self.has_average():
            return super().on_save_checkpoint(trainer, pl_module, checkpoint)
        # Not started: the weights stay the current ones; the averaging state (n_averaged = 0) is kept so that a
        # resumed run starts the average at the same step.
        checkpoint["current_model_state"] = checkpoint["state_dict"]
        checkpoint["averaging_state"] = {name: value for name, value in self._average_model.state_dict().items()
                                         if not name.startswith("module.")}
