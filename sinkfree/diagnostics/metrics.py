"""Sink metrics: pure tensor functions and torchmetrics `Metric`s that reduce them across ranks.

Definitions follow `reference/sinks.md` §2. Shapes: B sequences, H heads, S tokens, C residual width,
L layers. Every metric keeps its state per layer (and per head where it applies) so one `Metric`
covers the whole model. Sums and counts reduce by sum; order statistics (top-k, median) gather the
values (`dist_reduce_fx="cat"`), so numbers from N ranks equal one process over the union.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

SINK_EPS = 0.3  # Gu et al.'s ε: insensitive to the sequence length
MASSIVE_ABS = 100.0  # Sun et al.: |h| > 100 ...
MASSIVE_REL = 1000.0  # ... and > 1000 × the median |h| of that hidden state
SINK_DIM_THRESHOLD = 10.0  # a residual-sink dim has mean |h_d| >= 10 × the median dim
HIGH_NORM_REL = 4.0  # a high-norm token has ‖h_i‖ > 4 × the median token norm of its layer [I]


# ---- pure functions -------------------------------------------------------------------------------

def first_token_mass(probs: Tensor) -> Tensor:
    """Attention on key 0 averaged over queries: probs (B, H, Sq, Sk) -> α (B, H) per sequence and head."""
    return probs[..., 0].float().mean(-1)


def max_key_mass(probs: Tensor) -> Tensor:
    """Largest column mean max_j (1/Sq) Σ_i A_ij: probs (B, H, Sq, Sk) -> (B, H); DiTs have no first token."""
    return probs.float().mean(-2).amax(-1)


def sink_indicator(alpha: Tensor, eps: float = SINK_EPS) -> Tensor:
    """1 where the first-token mass α exceeds ε (Gu et al.'s Sink^ε), else 0; same shape as α."""
    return (alpha > eps).float()


def learned_sink_mass(sink_mass: Tensor) -> Tensor:
    """Probability given to the learned sink averaged over queries: (B, H, Sq) -> (B, H)."""
    return sink_mass.float().mean(-1)


def value_norm_ratio(v: Tensor) -> Tensor:
    """‖v_0‖ / mean_j ‖v_j‖ over all tokens j: v (B, Hkv, S, D) -> (B, Hkv). Sink keys carry small values."""
    norms = v.float().norm(dim=-1)  # (B, Hkv, S)
    return norms[..., 0] / norms.mean(-1)


def top_abs(h_abs: Tensor, k: int = 3) -> Tensor:
    """The k largest |h| of each layer: h_abs (L, ...) -> (L, k), descending."""
    return h_abs.flatten(1).topk(k, dim=1).values


def massive_mask(h_abs: Tensor, median: Tensor, abs_threshold: float = MASSIVE_ABS,
                 rel_threshold: float = MASSIVE_REL) -> Tensor:
    """True where |h| > abs_threshold and > rel_threshold × median; median broadcasts against h_abs."""
    return (h_abs > abs_threshold) & (h_abs > rel_threshold * median)


def token_norms(h: Tensor) -> Tensor:
    """L2 norm over the residual width of every token: h (..., S, C) -> (..., S)."""
    return h.float().norm(dim=-1)


def high_norm_mask(norms: Tensor, median: Tensor, rel_threshold: float = HIGH_NORM_REL) -> Tensor:
    """True where a token's norm exceeds rel_threshold × the median token norm (ViT "register" tokens)."""
    return norms > rel_threshold * median


def residual_sink_dims(dim_mean_abs: Tensor, threshold: float = SINK_DIM_THRESHOLD) -> tuple[Tensor, Tensor]:
    """Residual-sink score and dims of one layer: dim_mean_abs (C,) -> (max/median score, dims with
    mean |h_d| / median >= threshold, sorted by index)."""
    median = dim_mean_abs.median().clamp_min(torch.finfo(dim_mean_abs.dtype).tiny)
    ratio = dim_mean_abs / median
    return ratio.max(), torch.nonzero(ratio >= threshold).flatten()


# ---- torchmetrics ---------------------------------------------------------------------------------

class PerHeadMean(Metric):
    """Mean over sequences of a per-(layer, head) value; used for first-token mass, max-key mass,
    learned-sink mass and value-norm ratio. update((L, B, H)); compute() -> (L, H)."""

    full_state_update = False

    def __init__(self, num_layers: int, num_heads: int, **kwargs):
        super().__init__(**kwargs)
        self.add_state("total", torch.zeros(num_layers, num_heads, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: Tensor) -> None:
        self.total += values.double().sum(1)
        self.count += values.shape[1]

    def compute(self) -> Tensor:
        return (self.total / self.count).float()


class SinkRate(PerHeadMean):
    """Gu et al.'s Sink^ε per (layer, head): share of sequences whose first-token mass α > ε.
    The mean over heads and layers of compute() is the model's Sink^ε rate. update(α (L, B, H)).
    Fed the max-key mass instead, it is the share of heads above ε of a bidirectional model."""

    def __init__(self, num_layers: int, num_heads: int, eps: float = SINK_EPS, **kwargs):
        super().__init__(num_layers, num_heads, **kwargs)
        self.eps = eps

    def update(self, alpha: Tensor) -> None:
        super().update(sink_indicator(alpha, self.eps))


class GateStats(Metric):
    """Attention-output gate values (post-sigmoid): per-(layer, head) mean, share below `low`, and a
    per-layer histogram over [0, 1]. update(gate (L, B, S, H, D)); compute() -> dict."""

    full_state_update = False

    def __init__(self, num_layers: int, num_heads: int, low: float = 0.1, bins: int = 50, **kwargs):
        super().__init__(**kwargs)
        self.low, self.bins = low, bins
        shape = (num_layers, num_heads)
        self.add_state("total", torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("below", torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("hist", torch.zeros(num_layers, bins, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, gate: Tensor) -> None:
        g = gate.float().movedim(3, 1).flatten(2)  # (L, H, B*S*D)
        self.total += g.double().sum(-1)
        self.below += (g < self.low).double().sum(-1)
        self.count += g.shape[-1]
        for layer, values in enumerate(g):  # per layer: no (L, N) index tensor on the device
            self.hist[layer] += torch.histc(values, self.bins, 0.0, 1.0).double()

    def compute(self) -> dict[str, Tensor]:
        return {"mean": (self.total / self.count).float(), "below": (self.below / self.count).float(),
                "hist": self.hist, "edges": torch.linspace(0, 1, self.bins + 1)}


class ResidualMagnitude(Metric):
    """Order statistics of |h| of the residual stream after each block: top-1/2/3, median, and the
    massive activations (|h| > 100 and > 1000 × median) with the dims they sit in. The median needs
    every value, so the state is the gathered |h|. update(h (L, B, S, C)); compute() -> dict."""

    full_state_update = False

    def __init__(self, k: int = 3, abs_threshold: float = MASSIVE_ABS, rel_threshold: float = MASSIVE_REL,
                 **kwargs):
        super().__init__(**kwargs)
        self.k, self.abs_threshold, self.rel_threshold = k, abs_threshold, rel_threshold
        self.add_state("values", [], dist_reduce_fx="cat")  # (tokens, L, C) per update

    def update(self, h: Tensor) -> None:
        self.values.append(h.detach().float().abs().flatten(1, 2).transpose(0, 1))

    def compute(self) -> dict[str, Tensor]:
        values = dim_zero_cat(self.values).transpose(0, 1)  # (L, tokens, C)
        flat = values.flatten(1)
        median = flat.median(dim=1).values  # (L,), lower median
        massive = massive_mask(values, median[:, None, None], self.abs_threshold, self.rel_threshold)
        dims = massive.sum(1)  # (L, C) massive-activation count per dim
        return {"top": top_abs(values, self.k), "median": median, "massive_count": dims.sum(1),
                "massive_dims": dims}


class HighNormTokens(Metric):
    """Token norms ‖h_i‖₂ of the residual stream after each block: per layer the median, max / median and
    the count of high-norm tokens (‖h_i‖ > rel_threshold × median; Darcet et al.'s ViT "registers", the
    bidirectional counterpart of a sink token). The median needs every norm, so the state is the gathered
    norms. update(h (L, B, S, C)); compute() -> dict of (L,) tensors."""

    full_state_update = False

    def __init__(self, rel_threshold: float = HIGH_NORM_REL, **kwargs):
        super().__init__(**kwargs)
        self.rel_threshold = rel_threshold
        self.add_state("norms", [], dist_reduce_fx="cat")  # (tokens, L) per update

    def update(self, h: Tensor) -> None:
        self.norms.append(token_norms(h.detach()).flatten(1).transpose(0, 1))

    def compute(self) -> dict[str, Tensor]:
        norms = dim_zero_cat(self.norms).transpose(0, 1)  # (L, tokens)
        median = norms.median(dim=1).values
        ratio = norms.amax(1) / median.clamp_min(torch.finfo(norms.dtype).tiny)
        count = high_norm_mask(norms, median[:, None], self.rel_threshold).sum(1)
        return {"median": median, "ratio": ratio, "count": count}


class ResidualSinkDims(Metric):
    """Per-dim mean |h_d| of the residual stream over non-first tokens (the first token holds the
    massive activations; a residual sink is a dim that dominates on every token); `skip_first=False`
    averages over every token (bidirectional models have no first token). update(h (L, B, S, C));
    compute() -> (L, C) per-dim mean |h|; `residual_sink_dims` turns a row into the score and dims."""

    full_state_update = False

    def __init__(self, num_layers: int, width: int, skip_first: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.skip_first = skip_first
        self.add_state("total", torch.zeros(num_layers, width, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, h: Tensor) -> None:
        rest = h.detach()[:, :, 1 if self.skip_first else 0:].float().abs()
        self.total += rest.double().sum((1, 2))
        self.count += rest.shape[1] * rest.shape[2]

    def compute(self) -> Tensor:
        return (self.total / self.count).float()


class AttentionMaps(Metric):
    """Head- and batch-averaged attention maps at chosen layers. update(maps (M, B, Sq, Sk) each already
    averaged over heads); compute() -> (M, Sq, Sk)."""

    full_state_update = False

    def __init__(self, num_maps: int, q_len: int, k_len: int, **kwargs):
        super().__init__(**kwargs)
        self.add_state("total", torch.zeros(num_maps, q_len, k_len, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, maps: Tensor) -> None:
        self.total += maps.double().sum(1)
        self.count += maps.shape[1]

    def compute(self) -> Tensor:
        return (self.total / self.count).float()
