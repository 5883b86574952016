"""Probe a model on a fixed batch: capture attention and the residual stream, turn them into tidy rows.

`collect` runs the model once (eval, no grad, fp32 eager attention through the modules' `capture`
hook) and reduces each layer's attention on the fly, so at most one layer's probabilities
(B, H, S, S) are alive at a time. `SinkStats` holds the torchmetrics that reduce across ranks;
`compute_stats` is the one-process shortcut.

Probe inputs are token ids (B, S) for an LLM (`model(ids)`) or a dict of model keyword inputs for other
models (a DiT: `model(**{"x": ..., "t": ..., "y": ...})`), batch first. A model whose attention modules
are all non-causal (`attn.spec.causal` False) is bidirectional: it has no first token, so the first-token
metrics (first-token mass, Sink^ε, value-norm ratio) are left out and the max-key mass, the share of
heads whose max-key mass exceeds ε and the high-norm tokens stand in for them.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sinkfree.diagnostics.metrics import (
    SINK_DIM_THRESHOLD,
    SINK_EPS,
    AttentionMaps,
    GateStats,
    HighNormTokens,
    PerHeadMean,
    ResidualMagnitude,
    ResidualSinkDims,
    SinkRate,
    first_token_mass,
    learned_sink_mass,
    max_key_mass,
    residual_sink_dims,
    value_norm_ratio,
)

SHORT_LEN = 64  # Gu et al. measure Sink^ε on 64-token sequences
MAP_MAX = 1024  # saved attention maps longer than this are average-pooled to MAP_MAX × MAP_MAX (video DiTs)
# Metrics whose `head` column holds a residual dimension instead of a head.
PER_DIM_METRICS = ("massive_dim", "resid_sink_dim", "resid_sink_dim_weight", "resid_sink_dim_prescale")


ProbeInputs = Union[Tensor, Mapping[str, Tensor]]
"""Token ids (B, S), or a dict of the model's keyword inputs whose tensors are batch first."""


def call_model(model: nn.Module, inputs: ProbeInputs):
    """`model(**inputs)` for a dict of keyword inputs, else `model(inputs)`."""
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


def slice_inputs(inputs: ProbeInputs, index) -> ProbeInputs:
    """The sequences `index` (a slice or indices) of probe inputs: every tensor of a dict along dim 0."""
    if isinstance(inputs, Mapping):
        return {k: v[index] if torch.is_tensor(v) and v.dim() > 0 else v for k, v in inputs.items()}
    return inputs[index]


def inputs_to(inputs: ProbeInputs, device) -> ProbeInputs:
    """Probe inputs on `device`."""
    if isinstance(inputs, Mapping):
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
    return inputs.to(device)


def num_sequences(inputs: ProbeInputs) -> int:
    """The batch size of probe inputs (the first tensor's for a dict)."""
    if isinstance(inputs, Mapping):
        return next(len(v) for v in inputs.values() if torch.is_tensor(v) and v.dim() > 0)
    return len(inputs)


def _device(inputs: ProbeInputs) -> torch.device:
    if isinstance(inputs, Mapping):
        return next(v.device for v in inputs.values() if torch.is_tensor(v))
    return inputs.device


def is_causal(model: nn.Module) -> bool:
    """False when every attention module of `model.layers` declares a non-causal spec (bidirectional DiTs);
    True otherwise, also for modules without a spec."""
    attns = [_capturing(block) for block in model.layers]
    specs = [getattr(a, "spec", None) for a in attns if a is not None]
    return not specs or any(getattr(spec, "causal", True) for spec in specs)


class Row(NamedTuple):
    """One tidy statistic: layer −1 = all layers; head −1 = all heads (a dim for PER_DIM_METRICS)."""

    step: int
    layer: int
    head: int
    metric: str
    value: float


@dataclass
class LayerProbe:
    """What one block showed on the probe batch, reduced per sequence where that is exact."""

    first_token: Tensor | None  # (B, H) attention on key 0, mean over queries
    max_key: Tensor | None  # (B, H) max over keys of the mean attention over queries
    sink_mass: Tensor | None  # (B, H) learned-sink probability, mean over queries
    value_ratio: Tensor | None  # (B, Hkv) ‖v_0‖ / mean_j ‖v_j‖
    gate: Tensor | None  # (B, S, H, D) post-sigmoid gate, D = 1 for headwise
    attn_map: Tensor | None  # (B, Sq, Sk) head-averaged attention (map layers only)
    resid: Tensor  # (B, S, C) fp32 residual stream after the block
    norm_weight: Tensor | None  # (C,) post-norm weight of the norm that reads this residual
    norm_pre_scale: Tensor | None = None  # (C,) that norm's PreAffine λ (residual_sink: preaffine)
    causal: bool = True  # False for a bidirectional model: first_token and value_ratio are then None


def _capturing(module: nn.Module) -> nn.Module | None:
    """The first module under `module` with a `capture` attribute (the attention probe hook)."""
    return next((m for m in module.modules() if hasattr(m, "capture")), None)


def _norm_weight(norm: nn.Module | None) -> Tensor | None:
    if norm is None:
        return None
    if hasattr(norm, "effective_weight"):
        return norm.effective_weight().detach().float().flatten()
    weight = getattr(norm, "weight", None)
    return weight.detach().float().flatten() if weight is not None else None


def _next_norms(model: nn.Module) -> list[nn.Module | None]:
    """The norm that reads the residual after block i: block i+1's `attn_norm`, the final `norm` last."""
    layers = list(model.layers)
    nxt = [getattr(b, "attn_norm", None) for b in layers[1:]]
    return nxt + [getattr(model, "norm", None)]


def _pooled_map(probs: Tensor, limit: int = MAP_MAX) -> Tensor:
    """Head-averaged map (B, Sq, Sk); longer than `limit`, average-pooled to at most limit × limit cells."""
    m = probs.mean(1)
    if max(m.shape[-2:]) <= limit:
        return m
    return F.adaptive_avg_pool2d(m, (min(limit, m.shape[-2]), min(limit, m.shape[-1])))


def _reduce_capture(cap: dict, with_map: bool, causal: bool = True) -> dict:
    probs = cap.get("probs")
    out = dict.fromkeys(("first_token", "max_key", "sink_mass", "value_ratio", "gate", "attn_map"))
    if probs is not None:
        probs = probs.float()
        if causal:  # a bidirectional model has no first token
            out["first_token"] = first_token_mass(probs)
        out["max_key"] = max_key_mass(probs)
        if with_map:
            out["attn_map"] = _pooled_map(probs)
    if cap.get("sink_mass") is not None:
        out["sink_mass"] = learned_sink_mass(cap["sink_mass"])
    if cap.get("v") is not None and causal:
        out["value_ratio"] = value_norm_ratio(cap["v"])
    if cap.get("gate") is not None:
        out["gate"] = cap["gate"].detach().float()
    return out


@torch.no_grad()
def collect(model: nn.Module, input_ids: ProbeInputs, map_layers: Sequence[int] = ()) -> list[LayerProbe]:
    """Run `model` on `input_ids` (B, S) — or on a dict of keyword inputs, `model(**inputs)` — in eval mode,
    no grad, fp32 probe attention; one LayerProbe per block of `model.layers`. `map_layers` also keep the
    head-averaged attention map (average-pooled to MAP_MAX × MAP_MAX when longer). The model's train
    modes, the attention `capture`s and the hooks are restored afterwards, even on error."""
    layers = list(model.layers)
    causal = is_causal(model)
    attns = [_capturing(block) for block in layers]
    norms = _next_norms(model)
    map_layers = {i % len(layers) for i in map_layers}
    modes = {m: m.training for m in model.modules()}
    probes: list[LayerProbe | None] = [None] * len(layers)

    def hook(i):
        def fn(_module, _inputs, output):
            h = output[0] if isinstance(output, (tuple, list)) else output
            cap = attns[i].capture if attns[i] is not None else None
            red = _reduce_capture(cap or {}, i in map_layers, causal)
            pre = getattr(norms[i], "pre_scale", None)
            probes[i] = LayerProbe(**red, resid=h.detach().float(), norm_weight=_norm_weight(norms[i]),
                                   norm_pre_scale=None if pre is None else pre.detach().float(), causal=causal)
            if attns[i] is not None:
                attns[i].capture = {}  # free this layer's probabilities before the next block runs
        return fn

    handles = []
    try:
        model.eval()
        for a in attns:
            if a is not None:
                a.capture = {}
        handles = [block.register_forward_hook(hook(i)) for i, block in enumerate(layers)]
        with torch.autocast(_device(input_ids).type, enabled=False):
            # A model compiled in place (`model.compile()`) runs eagerly here: the probe's hooks and
            # capture path would otherwise trigger a recompile at every probe.
            eager = getattr(model, "_compiled_call_impl", None) is not None
            call_model(model._call_impl if eager else model, input_ids)
    finally:
        for h in handles:
            h.remove()
        for a in attns:
            if a is not None:
                a.capture = None
        for m, mode in modes.items():
            m.training = mode
    return probes


def _stack(probes: Sequence[LayerProbe], field: str) -> Tensor | None:
    values = [getattr(p, field) for p in probes]
    return None if any(v is None for v in values) else torch.stack(values)


class SinkStats(nn.Module):
    """The torchmetrics for one probe: update with `collect`'s output (and the 64-token probe), then
    `compute()` — which reduces across ranks when torch.distributed is initialised — and `rows()`."""

    def __init__(self, probe: Sequence[LayerProbe], map_layers: Sequence[int] = (), eps: float = SINK_EPS,
                 sink_dim_threshold: float = SINK_DIM_THRESHOLD, gate_bins: int = 50):
        super().__init__()
        p0 = probe[0]
        n_layer, width = len(probe), p0.resid.shape[-1]
        self.n_layer = n_layer
        self.causal = p0.causal
        heads = p0.max_key.shape[1] if p0.max_key is not None else 0
        self.map_layers = sorted({i % n_layer for i in map_layers})
        self.sink_dim_threshold = sink_dim_threshold
        self.norm_weight = _stack(probe, "norm_weight")  # the same on every rank: not a metric state
        self.pre_scale = _stack(probe, "norm_pre_scale")
        m: dict[str, nn.Module] = {"resid": ResidualMagnitude(), "tokens": HighNormTokens(),
                                   "sink_dims": ResidualSinkDims(n_layer, width, skip_first=self.causal)}
        if heads:
            m["max_key_mass"] = PerHeadMean(n_layer, heads)
            if self.causal:
                m["first_token_mass"] = PerHeadMean(n_layer, heads)
                m["sink_rate"] = SinkRate(n_layer, heads, eps)
                m["sink_rate_64"] = SinkRate(n_layer, heads, eps)
            else:  # no first token: the share of heads whose max-key mass exceeds ε
                m["max_key_rate"] = SinkRate(n_layer, heads, eps)
        if p0.sink_mass is not None:
            m["learned_sink_mass"] = PerHeadMean(n_layer, heads)
        if p0.value_ratio is not None:
            m["value_norm_ratio"] = PerHeadMean(n_layer, p0.value_ratio.shape[1])
        if p0.gate is not None:
            m["gate"] = GateStats(n_layer, p0.gate.shape[2], bins=gate_bins)
        first_map = probe[self.map_layers[0]].attn_map if self.map_layers else None
        if first_map is not None:
            m["attn_maps"] = AttentionMaps(len(self.map_layers), *first_map.shape[-2:])
        self.metrics = nn.ModuleDict(m)

    def update(self, probe: Sequence[LayerProbe], probe_short: Sequence[LayerProbe] | None = None) -> None:
        """Add one probe batch; `probe_short` is the same model on the first 64 tokens (defaults to `probe`)."""
        m = self.metrics
        resid = _stack(probe, "resid")
        m["resid"].update(resid)
        m["tokens"].update(resid)
        m["sink_dims"].update(resid)
        del resid
        for name, field in (("first_token_mass", "first_token"), ("max_key_mass", "max_key"),
                            ("sink_rate", "first_token"), ("max_key_rate", "max_key"),
                            ("learned_sink_mass", "sink_mass"),
                            ("value_norm_ratio", "value_ratio"), ("gate", "gate")):
            if name in m:
                m[name].update(_stack(probe, field))
        if "sink_rate_64" in m:
            m["sink_rate_64"].update(_stack(probe_short if probe_short is not None else probe, "first_token"))
        if "attn_maps" in m:
            m["attn_maps"].update(torch.stack([probe[i].attn_map for i in self.map_layers]))

    def compute(self) -> dict:
        """Every metric's value, reduced across ranks (all ranks must call it)."""
        out = {name: metric.compute() for name, metric in self.metrics.items()}
        n = self.n_layer  # torchmetrics squeezes 1-element results: restore the layer dim
        for name, value in out.items():
            if name == "resid":
                value.update(top=value["top"].reshape(n, -1), median=value["median"].reshape(n),
                             massive_count=value["massive_count"].reshape(n))
            elif name == "tokens":
                value.update({k: v.reshape(n) for k, v in value.items()})
            elif name == "gate":
                value.update(mean=value["mean"].reshape(n, -1), below=value["below"].reshape(n, -1))
            elif name != "attn_maps":
                out[name] = value.reshape(n, -1)
        out["map_layers"] = torch.tensor(self.map_layers, dtype=torch.long)
        return out

    def reset(self) -> None:
        for metric in self.metrics.values():
            metric.reset()

    def rows(self, results: dict, step: int) -> list[Row]:
        """Tidy rows (step, layer, head, metric, value) from `compute()`'s results."""
        rows: list[Row] = []

        def add(layer, head, metric, value):
            rows.append(Row(step, layer, head, metric, float(value)))

        def per_head(metric, table):  # (L, H): per head, per layer (mean of heads), model (mean of layers)
            for layer, heads in enumerate(table.tolist()):
                for head, v in enumerate(heads):
                    add(layer, head, metric, v)
                add(layer, -1, metric, sum(heads) / len(heads))
            add(-1, -1, metric, table.mean())

        for name in ("first_token_mass", "sink_rate", "sink_rate_64", "max_key_mass", "max_key_rate",
                     "learned_sink_mass", "value_norm_ratio"):
            if name in results:
                per_head(name, results[name])
        if "gate" in results:
            per_head("gate_mean", results["gate"]["mean"])
            per_head("gate_below_0.1", results["gate"]["below"])

        r = results["resid"]
        for layer in range(r["top"].shape[0]):
            for k, name in enumerate(("resid_max", "resid_top2", "resid_top3")[: r["top"].shape[1]]):
                add(layer, -1, name, r["top"][layer, k])
            add(layer, -1, "resid_median", r["median"][layer])
            add(layer, -1, "massive_count", r["massive_count"][layer])
            for d in torch.nonzero(r["massive_dims"][layer]).flatten().tolist():
                add(layer, d, "massive_dim", r["massive_dims"][layer, d])
        add(-1, -1, "resid_max", r["top"][:, 0].max())
        add(-1, -1, "resid_mact", r["top"][:, 0].mean())  # M-Act: per-layer max |h|, mean over layers
        add(-1, -1, "massive_count", r["massive_count"].sum())

        tok = results["tokens"]
        for layer in range(self.n_layer):
            add(layer, -1, "high_norm_tokens", tok["count"][layer])
            add(layer, -1, "token_norm_ratio", tok["ratio"][layer])
        add(-1, -1, "high_norm_tokens", tok["count"].sum())
        add(-1, -1, "token_norm_ratio", tok["ratio"].max())

        dim_mean = results["sink_dims"]
        scores = []
        for layer, row in enumerate(dim_mean):
            score, dims = residual_sink_dims(row, self.sink_dim_threshold)
            scores.append(float(score))
            add(layer, -1, "resid_sink_score", score)
            add(layer, -1, "resid_sink_dim_count", len(dims))
            weight = self.norm_weight[layer] if self.norm_weight is not None else None
            if weight is not None:
                add(layer, -1, "norm_weight_median", weight.median())
            pre = self.pre_scale[layer].abs() if self.pre_scale is not None else None
            if pre is not None:
                add(layer, -1, "norm_prescale_ratio", pre.max() / pre.median())
            for d in dims.tolist():
                add(layer, d, "resid_sink_dim", row[d])
                if weight is not None:
                    add(layer, d, "resid_sink_dim_weight", weight[d])
                if pre is not None:
                    add(layer, d, "resid_sink_dim_prescale", pre[d])
        add(-1, -1, "resid_sink_score", sum(scores) / len(scores))
        return rows

    def arrays(self, results: dict, step: int) -> dict:
        """The non-scalar results as numpy arrays for `plots` (attention maps, gate histograms, dim means)."""
        out = {"step": step, "causal": np.array(self.causal), "resid_dim_mean_abs": results["sink_dims"].cpu().numpy()}
        if "attn_maps" in results:
            out["attn_maps"] = results["attn_maps"].cpu().numpy()
            out["attn_map_layers"] = results["map_layers"].numpy()
        if "gate" in results:
            out["gate_hist"] = results["gate"]["hist"].cpu().numpy()
            out["gate_edges"] = results["gate"]["edges"].numpy()
        return out


def probe_model(model: nn.Module, input_ids: ProbeInputs, map_layers: Sequence[int] = (),
                short_len: int = SHORT_LEN) -> tuple[list[LayerProbe], list[LayerProbe]]:
    """`collect` at the probe length and on the first `short_len` tokens (rerun: exact for causal models).
    Bidirectional models and dict inputs have no meaningful prefix: the second probe is the first."""
    probe = collect(model, input_ids, map_layers)
    prefix = torch.is_tensor(input_ids) and probe[0].causal and input_ids.shape[1] > short_len
    short = collect(model, input_ids[:, :short_len]) if prefix else probe
    return probe, short


def compute_stats(probe: Sequence[LayerProbe], probe_short: Sequence[LayerProbe] | None = None,
                  step: int = 0, **kwargs) -> list[Row]:
    """Tidy rows for one probe in this process (no cross-rank reduction); kwargs go to `SinkStats`."""
    stats = SinkStats(probe, **kwargs).to(probe[0].resid.device)
    stats.update(probe, probe_short)
    return stats.rows(stats.compute(), step)
