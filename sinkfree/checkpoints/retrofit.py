"""Retrofit sink switches onto a pretrained architecture: merge a recipe's `model.arch` with a checkpoint's.

The checkpoint owns every field that fixes a weight's shape or meaning (sizes, RoPE, eps, biases,
qk-norm, tied embeddings, norm kind). A recipe may add `attn_gate`, `attn_sink` and `residual_sink`;
they start as an exact identity (gates: 2·σ(0) with zero weights; GatedNorm: 2·σ(W_up·…) with W_up = 0;
PreAffine: λ = 1). A learnable sink logit starts finite (−∞ would get no gradient) and low enough that
its mass on a probe batch is ≤ 1e-3: `calibrated_sink_init` picks one logit per (layer, head), each
close to that bound, so every head's sink gets a usable gradient.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import warnings

import torch

from sinkfree.checkpoints.io import CheckpointError
from sinkfree.models.llm import LLM, LLMConfig

log = logging.getLogger(__name__)

# Fields a recipe may set freely on top of a checkpoint (they change no weight).
FREE_FIELDS = ("block_size", "attn_backend", "init_std", "outlier_clip", "attn_softmax", "sink_init")
# Switches a recipe may add to a checkpoint that lacks them: (field, its "off" value, identity-init flag).
RETROFIT_SWITCHES = {"attn_gate": ("none", "attn_gate_identity_init"),
                     "attn_sink": ("none", None),
                     "residual_sink": ("none", "gatednorm_identity_init")}
MAX_SINK_MASS = 1e-3


def explicit_fields(overrides: dict) -> dict:
    """The fields of `overrides` that differ from `LLMConfig()`'s defaults (what a recipe actually set).

    A full `dataclasses.asdict(LLMConfig(...))` may be passed: fields left at their defaults are ignored, so
    a recipe that sets a field to its default value cannot be told from one that does not set it.
    """
    defaults = dataclasses.asdict(LLMConfig())
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise CheckpointError(f"unknown model.arch fields {unknown}")
    return {k: v for k, v in overrides.items() if v != defaults[k]}


def _norm_scaling(s: dict | None) -> dict | None:
    if not s:
        return None
    s = dict(s)
    kind = s.pop("rope_type", None) or s.pop("type", None)
    return None if kind in (None, "default") else {"type": kind, **s}


def merge_arch(ckpt: dict, overrides: dict, where: str) -> dict:
    """The checkpoint's architecture with the recipe's switches on top; contradictions are a `CheckpointError`."""
    arch = dict(ckpt)
    conflicts = []
    for key, value in explicit_fields(overrides).items():
        have = ckpt.get(key)
        if key in FREE_FIELDS:
            arch[key] = value
        elif key in RETROFIT_SWITCHES:
            if have not in (None, RETROFIT_SWITCHES[key][0], value):
                conflicts.append(f"{key}: recipe {value!r}, checkpoint {have!r}")
            arch[key] = value
        elif key == "rope_scaling" and _norm_scaling(value) == _norm_scaling(have):
            continue
        elif key == "gatednorm_rank" and ckpt.get("residual_sink", "none") != "gatednorm":
            arch[key] = value  # a GatedNorm added now may pick its rank
        elif value != have and not (key in ("n_kv_head", "head_dim") and value is None):
            conflicts.append(f"{key}: recipe {value!r}, checkpoint {have!r}")
    if conflicts:
        raise CheckpointError(
            f"model.init_from={where}: the recipe's model.arch contradicts the checkpoint ({'; '.join(conflicts)}). "
            f"The architecture comes from the checkpoint: remove these fields from the recipe "
            f"(it may add only attn_gate, attn_sink, residual_sink and set {', '.join(FREE_FIELDS)}).")
    for key, (off, flag) in RETROFIT_SWITCHES.items():
        added = arch.get(key, off) != off and ckpt.get(key, off) == off
        if added and flag is not None:
            arch[flag] = True  # a retrofit starts as an exact identity
    if arch.get("attn_sink") == "off_by_one" and ckpt.get("attn_sink", "none") == "none":
        warnings.warn("attn_sink=off_by_one adds e^0 to every softmax denominator: the pretrained model's "
                      "outputs change at step 0 (use attn_sink=learnable for a calibrated, near-identity start)")
    if arch.get("attn_softmax", "softmax") != ckpt.get("attn_softmax", "softmax"):
        warnings.warn(f"attn_softmax={arch['attn_softmax']!r} differs from the checkpoint's: outputs change at step 0")
    return arch


# -- probe batch and sink calibration ------------------------------------------------------------------
def probe_ids(vocab_size: int, tokenizer_json: str | None, batch: int = 2, length: int = 128) -> torch.Tensor:
    """A fixed (batch, length) probe: Python's pydoc topics text through the checkpoint's tokenizer, else random ids."""
    n = batch * length
    if tokenizer_json is not None:
        from pydoc_data.topics import topics

        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(tokenizer_json)
        ids = tok.encode("\n".join(topics[k] for k in sorted(topics))[: 40 * n]).ids[:n]
        if len(ids) == n and max(ids) < vocab_size:
            return torch.tensor(ids).view(batch, length)
    return torch.randint(0, vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))


def _tokenizer_text(source) -> str | None:
    file = (source.tokenizer_files or {}).get("tokenizer.json") if source is not None else None
    return file if file is None or isinstance(file, str) else file.read_text()


def _sink_masses(model: LLM, idx: torch.Tensor, values: float | torch.Tensor) -> torch.Tensor:
    """Set the learnable sinks to `values` (a scalar, or (L, H) per layer and head); the max sink mass of
    each (layer, head) over the probe's rows and queries, (L, H)."""
    attns = [b.attn for b in model.layers if b.attn.sink_kind == "learnable"]
    values = torch.as_tensor(values, dtype=torch.float32).expand(len(attns), attns[0].n_head)
    with torch.no_grad():
        for a, v in zip(attns, values):
            a.sink.copy_(v.to(a.sink.device))
            a.capture = {}
        try:
            model(idx)
            masses = torch.stack([a.capture["sink_mass"].float().amax(dim=(0, 2)) for a in attns])  # (L, H)
        finally:
            for a in attns:
                a.capture = None
    return masses


def calibrated_sink_init(model: LLM, source=None, probe: torch.Tensor | None = None,
                         max_mass: float = MAX_SINK_MASS) -> torch.Tensor:
    """Per-(layer, head) sink logits (L, H) such that each head's sink mass on the probe batch is ≈ `max_mass`
    at its worst query, and never above it.

    With the sink at s and a row's partition function Z, the mass is e^s / (Z + e^s), so one forward at
    s = 0 gives log Z = log((1 - m) / m) per row; each head's s starts from its smallest log Z, aimed at
    0.7·`max_mass`. Later layers see slightly changed inputs, so the masses are re-measured and every head's
    logit is moved by log(target / mass) until all lie in [0.35, 1]·`max_mass` (a head above the bound is
    always corrected). One logit for all heads (calibrated to the worst head) would leave most heads at
    ~1e-9 mass, where the gradient, ∝ mass, cannot move them. Leaves the model's sinks at the result.
    """
    c = model.config
    idx = probe if probe is not None else probe_ids(c.vocab_size, _tokenizer_text(source),
                                                     length=min(128, c.block_size))
    target = 0.7 * max_mass
    m = _sink_masses(model, idx, 0.0).clamp(1e-30, 1 - 1e-7)
    log_z = torch.log1p(-m) - torch.log(m)  # smallest log Z of each head (its largest mass)
    s = log_z + math.log(target / (1 - target))
    best = None  # the last logits that kept every head within the bound
    for _ in range(12):
        masses = _sink_masses(model, idx, s)
        worst = float(masses.max())
        if worst <= max_mass:
            best = (s, masses)
            if float(masses.min()) >= 0.35 * max_mass:
                break
        s = s + torch.log(target / masses.clamp_min(1e-30)).clamp(-30.0, 30.0)
    else:
        if best is None:
            raise CheckpointError(f"could not calibrate the sink logits below mass {max_mass} (last {worst:.2e})")
        s, masses = best
        worst = float(_sink_masses(model, idx, s).max())
    log.info("calibrated learnable sink logits per head: %.2f .. %.2f (mean %.2f); sink mass per head "
             "%.2e .. %.2e on a %s probe", float(s.min()), float(s.max()), float(s.mean()),
             float(masses.min()), worst, tuple(idx.shape))
    return s


def retrofit_report(model: LLM, source=None, probe: torch.Tensor | None = None) -> dict:
    """Largest |Δ logit| at step 0 against the same model with its sinks removed, and the max sink mass.

    Gates, GatedNorm and PreAffine start as exact identities, so the learnable sink is the only source of
    change; with no learnable sink the report is zeros.
    """
    c = model.config
    attns = [b.attn for b in model.layers if b.attn.sink_kind == "learnable"]
    if not attns:
        return {"max_logit_change": 0.0, "max_sink_mass": 0.0}
    idx = probe if probe is not None else probe_ids(c.vocab_size, _tokenizer_text(source),
                                                     length=min(128, c.block_size))
    saved = [a.sink.detach().clone() for a in attns]
    with torch.no_grad():
        for a in attns:
            a.capture = {}
        try:
            logits = model(idx)
            mass = max(float(a.capture["sink_mass"].max()) for a in attns)
        finally:
            for a in attns:
                a.capture = None
        for a in attns:
            a.sink.fill_(-math.inf)
        plain = model(idx)
        for a, s in zip(attns, saved):
            a.sink.copy_(s)
    report = {"max_logit_change": float((logits - plain).abs().max()), "max_sink_mass": mass}
    log.info("retrofit at step 0: max |Δ logit| %.3e, max sink mass %.2e", report["max_logit_change"], mass)
    return report
