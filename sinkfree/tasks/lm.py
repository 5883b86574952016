"""Causal language modelling task: the LightningModule that trains and samples an `LLM`."""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from typing import Literal, Optional

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.aggregation import MeanMetric
from torchmetrics.text import Perplexity

from sinkfree.models.generate import generate
from sinkfree.models.llm import LLM, LLMConfig
from sinkfree.tasks._compile import check_compile_mode, compile_in_place


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, then cosine decay to `min_lr_ratio` at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class CausalLM(L.LightningModule):
    """Next-token prediction with AdamW, warmup + cosine, perplexity, and text generation for `predict`."""

    def __init__(
        self,
        arch: Optional[LLMConfig] = None,
        init_from: Optional[str] = None,
        trainable: Literal["all", "new"] = "all",
        lr: float = 3e-4,
        sink_lr_scale: float = 1.0,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        compile: bool = False,
        compile_mode: Optional[str] = None,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
    ):
        """Build the task.

        Args:
            arch: model architecture (LLMConfig fields); the sink switches live here.
            init_from: fine-tune: a sinkfree checkpoint (.ckpt / .safetensors folder) or an HF folder;
                the architecture comes from it and `arch`'s switches are added on top.
            trainable: which parameters train: `all`, or `new` (only parameters the checkpoint lacks, e.g.
                gates, sink logits, GatedNorm) when fine-tuning with `init_from`.
            lr: peak learning rate of AdamW.
            sink_lr_scale: learnable sink logits (`attn_sink: learnable`) train at `lr × sink_lr_scale`, in
                their own AdamW group (no weight decay; same warmup and cosine). A fine-tune's small `lr`
                barely moves a retrofitted sink logit (its gradient is ∝ its mass, ~1e-3 at the start), so
                fine-tune recipes use ~100.
            weight_decay: AdamW weight decay on matrices and embeddings (never on norms, biases, sinks).
            betas: AdamW betas.
            eps: AdamW epsilon.
            warmup_steps: linear warmup steps before the cosine decay.
            min_lr_ratio: final learning rate as a fraction of `lr` at the end of the cosine.
            compile: compile the model with torch.compile (in place, so checkpoint keys stay plain).
            compile_mode: torch.compile mode when `compile` is on: default, reduce-overhead, max-autotune or
                max-autotune-no-cudagraphs (Triton GEMM templates whose epilogues can absorb the elementwise
                work after small matmuls, e.g. GatedNorm's gate; slower to compile). None = default.
            max_new_tokens: `predict` only: tokens to generate per prompt.
            temperature: `predict` only: 0 for greedy decoding, > 0 for sampling.
            top_p: `predict` only: nucleus sampling threshold in (0, 1].
        """
        super().__init__()
        if isinstance(arch, dict):
            arch = LLMConfig(**arch)
        arch = arch if arch is not None else LLMConfig()
        if trainable not in ("all", "new"):
            raise ValueError(f"model.trainable={trainable!r} is not allowed; use 'all' or 'new'")
        if trainable == "new" and not init_from:
            raise ValueError("model.trainable='new' needs model.init_from (a checkpoint to add parameters to)")
        check_compile_mode(compile, compile_mode)
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"model.top_p={top_p} must be in (0, 1]")
        if not sink_lr_scale > 0:
            raise ValueError(f"model.sink_lr_scale={sink_lr_scale} must be > 0")
        if temperature < 0:
            raise ValueError(f"model.temperature={temperature} must be >= 0")
        self.arch = arch
        self._trainable = trainable  # kept apart: hparams are rewritten once init_from is loaded
        self.save_hyperparameters(ignore=["arch"])
        self.hparams["arch"] = dataclasses.asdict(arch)
        self.model: Optional[LLM] = None
        self.flops_per_batch = 0  # read by TokenThroughput: training FLOPs of the last batch
        self.new_parameter_names: list[str] = []
        self.val_loss = MeanMetric()
        self.val_ppl = Perplexity()

    # -- model construction -------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Build the model once: from `arch`, or from `init_from` with `arch`'s switches on top."""
        if self.model is not None:
            return
        if self.hparams.init_from:
            from sinkfree.checkpoints import load_for_init

            arch, state, new_names = load_for_init(self.hparams.init_from, dataclasses.asdict(self.arch))
            self.arch = arch
            self.model = LLM(arch)
            missing, unexpected = self.model.load_state_dict(state, strict=False)
            if unexpected:
                raise ValueError(f"model.init_from={self.hparams.init_from}: unexpected keys {unexpected[:5]}")
            # new_keys, not `missing`: the calibrated sink logits are new but come in the state dict.
            self.new_parameter_names = sorted(new_names)
            # The checkpoint's weights are now in; a reload (load_from_checkpoint, resume) must not need the
            # original file, so the saved hyper-parameters carry the resolved architecture instead.
            self.hparams["arch"] = dataclasses.asdict(arch)
            self.hparams["init_from"] = None
            self.hparams["trainable"] = "all"
            if self._trainable == "new":
                for name, p in self.model.named_parameters():
                    p.requires_grad_(name in new_names)
        else:
            self.model = LLM(self.arch)
        compile_in_place(self.model, self.hparams.compile, self.hparams.get("compile_mode"))

    def setup(self, stage: str) -> None:
        """Check that the tokenizer fits the embedding table."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        vocab = getattr(dm, "vocab_size", None)
        if vocab is not None and not self.hparams.init_from and vocab > self.arch.vocab_size:
            raise ValueError(
                f"the tokenizer has {vocab} tokens but model.arch.vocab_size={self.arch.vocab_size}; "
                f"set model.arch.vocab_size >= {vocab} (or data.vocab_size <= {self.arch.vocab_size})"
            )

    def on_fit_start(self) -> None:
        """Keep the tokenizer beside the run's checkpoints, so probes and exports find it later."""
        tok = getattr(self.trainer.datamodule, "tokenizer", None)
        log_dir = self.trainer.log_dir
        if tok is None or log_dir is None or not self.trainer.is_global_zero:
            return
        os.makedirs(log_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=log_dir, suffix=".json.tmp")
        os.close(fd)
        tok.save(tmp)
        os.replace(tmp, os.path.join(log_dir, "tokenizer.json"))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits (B, S, V) for token ids (B, S)."""
        return self.model(idx)

    # -- training -----------------------------------------------------------------------------------
    def _loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids = batch["input_ids"]  # (B, S + 1)
        x, y = ids[:, :-1], ids[:, 1:]
        logits = self.model(x)  # (B, S, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        return loss, logits, y

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, _, y = self._loss(batch)
        self.flops_per_batch = y.shape[0] * y.shape[1] * self.model.flops_per_token(y.shape[1])
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/ppl", torch.exp(loss.detach()))
        self.log("train/tokens", float(y.numel()), reduce_fx="sum")
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, logits, y = self._loss(batch)
        self.val_loss.update(loss, weight=y.numel())
        self.val_ppl.update(logits.float(), y)
        self.log("val/loss", self.val_loss, prog_bar=True)
        self.log("val/ppl", self.val_ppl)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        loss, _, y = self._loss(batch)
        self.log("test/loss", loss)
        self.log("test/ppl", torch.exp(loss))

    def configure_optimizers(self) -> dict:
        groups = self.model.param_groups(self.hparams.weight_decay)
        sinks = {id(b.attn.sink) for b in self.model.layers if b.attn.sink_kind == "learnable"}
        groups = [dict(g, params=[p for p in g["params"] if p.requires_grad and id(p) not in sinks]) for g in groups]
        groups.append({"params": [p for p in self.model.parameters() if id(p) in sinks and p.requires_grad],
                       "weight_decay": 0.0, "lr": self.hparams.lr * self.hparams.sink_lr_scale, "name": "sinks"})
        groups = [g for g in groups if g["params"]]
        # foreach, not fused: Lightning refuses gradient clipping with optimizers that unscale internally.
        opt = torch.optim.AdamW(groups, lr=self.hparams.lr, betas=tuple(self.hparams.betas), eps=self.hparams.eps)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = min(self.hparams.warmup_steps, total)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_cosine(s, warmup, total, self.hparams.min_lr_ratio)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- prediction: text generation ----------------------------------------------------------------
    def predict_step(self, prompt: str, batch_idx: int) -> str:
        tok = getattr(self.trainer.datamodule, "tokenizer", None)
        if tok is None:
            raise ValueError("predict needs a tokenizer: set data.tokenizer or use the run's config.yaml")
        ids = tok.encode(prompt).ids
        bos = tok.token_to_id("<|bos|>")
        if bos is not None:
            ids = [bos] + ids
        idx = torch.tensor([ids], device=self.device)
        gen = torch.Generator(device=self.device).manual_seed(batch_idx)
        out = generate(
            self.model,
            idx,
            self.hparams.max_new_tokens,
            temperature=self.hparams.temperature,
            top_p=self.hparams.top_p,
            eos_id=tok.token_to_id("<|eos|>"),
            generator=gen,
        )
        text = prompt + tok.decode(out[0, idx.shape[1] :].tolist())
        print(f"--- prompt {batch_idx} ---\n{text}\n", flush=True)
        return text
