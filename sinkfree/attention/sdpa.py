"""torch scaled_dot_product_attention backend (the default); sinks as one extra key column."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sinkfree.attention.eager import causal_visible
from sinkfree.attention.registry import BackendInfo, register_backend
from sinkfree.attention.spec import AttentionSpec


def _sink_columns(q, k, v, spec: AttentionSpec, sink: torch.Tensor):
    # The sink is a key whose q.k logit is 0 and whose float mask bias is s_h, with value 0:
    # softmax over [z, s_h] then dropping the sink column's (zero) contribution.
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    bias = torch.zeros(sq, sk, dtype=q.dtype, device=q.device)
    if spec.causal:
        bias = bias.masked_fill(~causal_visible(sq, sk, q.device), float("-inf"))
    s = sink.to(q.dtype).view(1, hq, 1, 1).expand(1, hq, sq, 1)
    mask = torch.cat([bias.expand(1, hq, sq, sk), s], dim=-1)  # (1, Hq, Sq, Sk + 1)
    zeros = k.new_zeros(b, hkv, 1, d)
    return torch.cat([k, zeros], dim=2), torch.cat([v, zeros], dim=2), mask


def sdpa_attention(q, k, v, spec: AttentionSpec, sink=None) -> torch.Tensor:
    """Attention through torch SDPA; causal is bottom-right aligned; GQA and sinks supported."""
    hq, hkv = q.shape[1], k.shape[1]
    sq, sk = q.shape[2], k.shape[2]
    mask, is_causal = None, False
    if sink is not None:
        k, v, mask = _sink_columns(q, k, v, spec, sink)
    elif spec.causal and sq == sk:
        is_causal = True  # SDPA's is_causal is top-left aligned, which equals bottom-right only here
    elif spec.causal:
        mask = causal_visible(sq, sk, q.device)
    enable_gqa = False
    if hq != hkv:
        if mask is None:
            enable_gqa = True
        else:
            # Fused kernels that take a mask do not all accept enable_gqa; expanding keeps them eligible.
            k = k.repeat_interleave(hq // hkv, dim=1)
            v = v.repeat_interleave(hq // hkv, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=spec.scale,
                                          enable_gqa=enable_gqa)


SDPA = register_backend(BackendInfo(
    "sdpa", sdpa_attention, supports_sink=True,
    description="torch scaled_dot_product_attention; sinks via a float mask (no fused flash path)"))
