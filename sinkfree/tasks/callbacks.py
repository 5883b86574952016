"""Lightning callbacks of the tasks: token throughput and model FLOP utilisation."""

from __future__ import annotations

from typing import Any, Optional

from lightning.pytorch.callbacks import ThroughputMonitor


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
