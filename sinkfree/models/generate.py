"""Autoregressive sampling without a KV cache: greedy or nucleus (top-p)."""
from __future__ import annotations

import torch
from torch import nn


def _top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    # Keep the smallest set of most likely tokens whose mass reaches top_p, renormalised. probs (B, V).
    sorted_p, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_p.cumsum(-1) - sorted_p
    sorted_p = sorted_p.masked_fill(mass_before >= top_p, 0.0)  # the top token always survives
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return kept / kept.sum(-1, keepdim=True)


@torch.no_grad()
def generate(model: nn.Module, idx: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, eos_id: int | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Append up to max_new_tokens to idx (B, S); greedy at temperature 0, else top-p sampling."""
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    block_size = model.config.block_size
    was_training = model.training
    model.eval()
    done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    try:
        for _ in range(max_new_tokens):
            logits = model(idx[:, -block_size:])[:, -1, :].float()  # (B, V)
            if temperature == 0:
                nxt = logits.argmax(-1)
            else:
                probs = _top_p_filter(torch.softmax(logits / temperature, dim=-1), top_p)
                nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)  # finished rows pad with eos
                done |= nxt == eos_id
            idx = torch.cat([idx, nxt.unsqueeze(-1)], dim=1)
            if eos_id is not None and bool(done.all()):
                break
    finally:
        model.train(was_training)
    return idx
