"""Rectified-flow (flow-matching) diffusion: the LightningModule that trains and samples a `DiT`, the VSA
sparsity-ramp callback, and the writers of sample grids (PNG for images, GIF for videos)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Optional

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics.aggregation import MeanMetric

from sinkfree.attention.vsa import vsa_topk
from sinkfree.models.dit import DiT, DiTConfig
from sinkfree.tasks._compile import check_compile_mode, compile_in_place
from sinkfree.tasks.lm import warmup_cosine


PROBE_T = 0.5  # flow time of the sink probe's noisy inputs (mid-way between data and noise)
PROBE_SEED = 4321  # seed of the sink probe's noise


class RectifiedFlow(L.LightningModule):
    """Rectified flow: x_t = (1 − t)·x0 + t·ε, the DiT predicts the velocity ε − x0 (MSE), t ~ logit-normal.
    Validation uses fixed seeded (clean sample, noise, t) triples; `predict` runs an Euler sampler from t = 1
    and writes PNG grids (images) or GIFs (videos) into the run folder's `samples/`."""

    def __init__(
        self,
        arch: Optional[DiTConfig] = None,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        warmup_steps: int = 0,
        min_lr_ratio: float = 1.0,
        t_logit_mean: float = 0.0,
        t_logit_std: float = 1.0,
        class_dropout: float = 0.1,
        val_seed: int = 1234,
        sample_steps: int = 32,
        cfg_scale: float = 1.0,
        val_samples: int = 0,
        sample_dir: Optional[str] = None,
        fps: int = 8,
        compile: bool = False,
        compile_mode: Optional[str] = None,
    ):
        """Build the task.

        Args:
            arch: model architecture (DiTConfig fields): size, patching, the sink switches and VSA options.
            lr: peak learning rate of AdamW.
            weight_decay: AdamW weight decay on matrices (never on norms, biases, sinks).
            betas: AdamW betas.
            eps: AdamW epsilon.
            warmup_steps: linear warmup steps before the cosine decay.
            min_lr_ratio: final learning rate as a fraction of `lr` (1.0 = constant after warmup).
            t_logit_mean: mean of the logit-normal timestep distribution (t = sigmoid(N(mean, std))).
            t_logit_std: std of the logit-normal timestep distribution.
            class_dropout: probability of replacing a label by the null class (for classifier-free guidance).
            val_seed: seed of the fixed validation noise and timesteps (the same triples every validation).
            sample_steps: Euler steps of the sampler.
            cfg_scale: classifier-free guidance scale for class-conditional models (1.0 = none).
            val_samples: also sample this many items after every validation into `samples/` (0 = off).
            sample_dir: where samples go; None = the run folder's `samples/` (beside the checkpoint for predict).
            fps: frames per second of the written GIFs.
            compile: compile the model with torch.compile (in place, so checkpoint keys stay plain).
            compile_mode: torch.compile mode when `compile` is on: default, reduce-overhead, max-autotune or
                max-autotune-no-cudagraphs. None = default.
        """
        super().__init__()
        if isinstance(arch, dict):
            arch = DiTConfig(**arch)
        arch = arch if arch is not None else DiTConfig()
        if not 0.0 <= class_dropout < 1.0:
            raise ValueError(f"model.class_dropout={class_dropout} must be in [0, 1)")
        if t_logit_std <= 0:
            raise ValueError(f"model.t_logit_std={t_logit_std} must be positive")
        check_compile_mode(compile, compile_mode)
        if sample_steps < 1:
            raise ValueError(f"model.sample_steps={sample_steps} must be at least 1")
        self.arch = arch
        self.save_hyperparameters(ignore=["arch"])
        self.hparams["arch"] = dataclasses.asdict(arch)
        self.model: Optional[DiT] = None
        self.val_loss = MeanMetric()

    def configure_model(self) -> None:
        """Build the model once."""
        if self.model is not None:
            return
        self.model = DiT(self.arch)
        compile_in_place(self.model, self.hparams.compile, self.hparams.get("compile_mode"))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Velocity (B, C, T, H, W) at x (B, C, T, H, W), t (B,)."""
        return self.model(x, t, y)

    # -- training -----------------------------------------------------------------------------------
    def _labels(self, batch: dict) -> Optional[torch.Tensor]:
        """Labels of a class-conditional model (-1, no label, becomes the null class); None otherwise."""
        y = batch.get("y") if self.arch.num_classes else None
        if y is None:
            return None
        if int(y.max()) >= self.arch.num_classes:
            raise ValueError(f"a label is {int(y.max())} but model.arch.num_classes={self.arch.num_classes}")
        return torch.where(y < 0, torch.full_like(y, self.model.null_class), y)

    def flow_loss(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, y) -> torch.Tensor:
        """MSE between the predicted and the true velocity ε − x0 at x_t = (1 − t)·x0 + t·ε."""
        tb = t.view(-1, *([1] * (x0.dim() - 1)))
        xt = (1 - tb) * x0 + tb * noise
        return F.mse_loss(self.model(xt, t, y).float(), (noise - x0).float())

    def sample_t(self, n: int, generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
        """n logit-normal timesteps sigmoid(N(t_logit_mean, t_logit_std))."""
        z = torch.randn(n, generator=generator, device=device)
        return torch.sigmoid(z * self.hparams.t_logit_std + self.hparams.t_logit_mean)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x0 = batch["x"]
        y = self._labels(batch)
        if y is not None and self.hparams.class_dropout > 0:
            drop = torch.rand(y.shape, device=y.device) < self.hparams.class_dropout
            y = torch.where(drop, torch.full_like(y, self.model.null_class), y)
        loss = self.flow_loss(x0, torch.randn_like(x0), self.sample_t(x0.shape[0], device=x0.device), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _fixed_triples(self, x0: torch.Tensor, batch_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Seeded on the CPU by batch index: every validation (and every device) sees the same noise and t.
        g = torch.Generator().manual_seed(self.hparams.val_seed * 100003 + batch_idx)
        noise = torch.randn(x0.shape, generator=g).to(x0.device, x0.dtype)
        return noise, self.sample_t(x0.shape[0], generator=g).to(x0.device)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x0 = batch["x"]
        noise, t = self._fixed_triples(x0, batch_idx)
        loss = self.flow_loss(x0, noise, t, self._labels(batch))
        self.val_loss.update(loss, weight=x0.shape[0])
        self.log("val/loss", self.val_loss, prog_bar=True)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        x0 = batch["x"]
        noise, t = self._fixed_triples(x0, batch_idx)
        self.log("test/loss", self.flow_loss(x0, noise, t, self._labels(batch)))

    def on_validation_epoch_end(self) -> None:
        n = self.hparams.val_samples
        if n <= 0 or self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        shape = getattr(self.trainer.datamodule, "sample_shape", None)
        if shape is None:
            return
        labels = None
        if self.arch.num_classes:
            labels = torch.arange(n, device=self.device) % self.arch.num_classes
        x = self.sample(n, shape, labels, torch.Generator().manual_seed(self.hparams.val_seed))
        write_samples(x, self._sample_dir() / f"step_{self.global_step:07d}", self.hparams.fps)

    @torch.no_grad()
    def probe_inputs(self, batch: dict, t: float = PROBE_T) -> dict:
        """SinkMonitor's model inputs from a clean probe batch {"x", "y"}: x_t = (1 − t)·x0 + t·ε with seeded
        noise (the same at every probe), the fixed time t, and the labels of a class-conditional model."""
        x0 = batch["x"]
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(PROBE_SEED)).to(x0.device, x0.dtype)
        inputs = {"x": (1 - t) * x0 + t * noise, "t": torch.full((x0.shape[0],), float(t), device=x0.device)}
        y = self._labels(batch) if self.model is not None else None
        if y is not None:
            inputs["y"] = y
        return inputs

    def configure_optimizers(self) -> dict:
        groups = [g for g in self.model.param_groups(self.hparams.weight_decay) if g["params"]]
        opt = torch.optim.AdamW(groups, lr=self.hparams.lr, betas=tuple(self.hparams.betas), eps=self.hparams.eps)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = min(self.hparams.warmup_steps, total)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_cosine(s, warmup, total, self.hparams.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- sampling -----------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, shape, labels: Optional[torch.Tensor] = None,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Euler integration of dx/dt = v from t = 1 (noise) to t = 0: n samples (n, C, T, H, W)."""
        x = torch.randn((n, *shape), generator=generator).to(self.device)
        ts = torch.linspace(1.0, 0.0, self.hparams.sample_steps + 1, device=self.device)
        guided = labels is not None and self.hparams.cfg_scale != 1.0
        null = None if labels is None else torch.full_like(labels, self.model.null_class)
        for i in range(self.hparams.sample_steps):
            t = ts[i].expand(n)
            if guided:
                v_c, v_u = self.model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null])).chunk(2)
                v = v_u + self.hparams.cfg_scale * (v_c - v_u)
            else:
                v = self.model(x, t, labels)
            x = x + (ts[i + 1] - ts[i]) * v
        return x

    def _sample_dir(self) -> Path:
        if self.hparams.sample_dir:
            return Path(self.hparams.sample_dir)
        ckpt = getattr(self.trainer, "ckpt_path", None)
        if ckpt and self.trainer.state.fn == "predict":
            return Path(ckpt).resolve().parent.parent / "samples"  # <run>/checkpoints/x.ckpt -> <run>/samples
        return Path(self.trainer.log_dir or self.trainer.default_root_dir) / "samples"

    def predict_step(self, batch: dict, batch_idx: int) -> str:
        """Sample one grid per batch ({"y": labels (n,), "seed": (n,)}) and write it; returns the file path."""
        shape = getattr(self.trainer.datamodule, "sample_shape", None)
        if shape is None:
            raise ValueError("predict needs the sample shape: use a data module with `sample_shape` "
                             "(sinkfree.data.SyntheticVideoDataModule or FolderDataModule)")
        y = batch["y"].to(self.device)
        labels = y if self.arch.num_classes else None
        g = torch.Generator().manual_seed(int(batch["seed"][0]))
        x = self.sample(y.shape[0], shape, labels, g)
        path = write_samples(x, self._sample_dir() / f"predict_{batch_idx:03d}", self.hparams.fps)
        print(f"sinkfree predict: wrote {path}", flush=True)
        return str(path)


def to_grid(x: torch.Tensor, nrow: Optional[int] = None) -> np.ndarray:
    """Samples (N, C, T, H, W) in [-1, 1] with C 1 or 3 -> uint8 frames (T, rows·(H+1)+1, cols·(W+1)+1, 3)."""
    n, c, t, h, w = x.shape
    if c not in (1, 3):
        raise ValueError(f"only 1- or 3-channel samples can be drawn, got {c} channels (latents: decode them)")
    cols = nrow or int(np.ceil(np.sqrt(n)))
    rows = -(-n // cols)
    img = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).expand(n, 3, t, h, w).cpu()
    grid = torch.full((t, rows * (h + 1) + 1, cols * (w + 1) + 1, 3), 255, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, cols)
        top, left = 1 + r * (h + 1), 1 + col * (w + 1)
        grid[:, top:top + h, left:left + w] = img[i].permute(1, 2, 3, 0)
    return grid.numpy()


def write_samples(x: torch.Tensor, stem: Path, fps: int = 8) -> Path:
    """Write samples (N, C, T, H, W): a PNG grid when T = 1, else an animated GIF; latents (C not 1 or 3) as
    `.pt`. Written to a temporary name and renamed, so a reader never sees half a file. Returns the path."""
    from PIL import Image

    stem.parent.mkdir(parents=True, exist_ok=True)
    if x.shape[1] not in (1, 3):
        path = stem.with_suffix(".pt")
        torch.save(x.cpu(), str(path) + ".tmp")
    else:
        frames = [Image.fromarray(f) for f in to_grid(x)]
        scale = max(1, 256 // max(frames[0].size))  # small samples are enlarged so people can see them
        frames = [f.resize((f.width * scale, f.height * scale), Image.NEAREST) for f in frames]
        path = stem.with_suffix(".png" if len(frames) == 1 else ".gif")
        if len(frames) == 1:
            frames[0].save(str(path) + ".tmp", format="PNG")
        else:
            frames[0].save(str(path) + ".tmp", format="GIF", save_all=True, append_images=frames[1:],
                           duration=int(1000 / fps), loop=0)
    os.replace(str(path) + ".tmp", path)
    return path


class VSASparsityRamp(L.Callback):
    """Raise the VSA sparsity by `rate` every `every_n_steps` optimizer steps, from `start` up to `target`
    (FastVideo's schedule: 0.03 every 50 steps to 0.9); logs `vsa/sparsity`."""

    def __init__(self, target: Optional[float] = None, rate: float = 0.03, every_n_steps: int = 50,
                 start: float = 0.0) -> None:
        """Args:
        target: final sparsity (None = the model's `arch.vsa_sparsity`).
        rate: sparsity added at each increase.
        every_n_steps: optimizer steps between increases.
        start: sparsity of the first steps.
        """
        if every_n_steps < 1 or rate < 0:
            raise ValueError(f"VSASparsityRamp: every_n_steps={every_n_steps} must be >= 1 and rate={rate} >= 0")
        for name, value in (("target", target), ("start", start)):
            if value is not None:
                vsa_topk(1, value)
        self.target, self.rate, self.every, self.start = target, rate, every_n_steps, start

    def sparsity_at(self, step: int, target: float) -> float:
        """Sparsity used at optimizer step `step`."""
        return min(self.start + (step // self.every) * self.rate, target)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        model = pl_module.model
        if model.config.attn_backend != "vsa":
            raise ValueError("VSASparsityRamp needs model.arch.attn_backend: vsa")
        target = self.target if self.target is not None else model.config.vsa_sparsity
        s = self.sparsity_at(trainer.global_step, target)
        model.set_vsa_sparsity(s)
        pl_module.log("vsa/sparsity", s)
