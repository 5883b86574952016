"""Pure-PyTorch references (fp32 math) of dense and block-sparse attention with sinks, same mask semantics
as the kernels: GQA, bottom-right causal, padded key tiles, empty rows give out 0 and LSE -inf (or LSE = s_h
with a sink). Differentiable in q, k, v and sink. Used on CPU and as the test oracle.
"""

import math

import torch

from .tiles import token_mask


def masked_attention_reference(q, k, v, mask=None, sink=None, scale=None, causal=False):
    """out (B, Hq, Sq, D) in q's dtype and lse (B, Hq, Sq) fp32, for a bool mask (B|1, Hq|1, Sq, Sk) or None."""
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qf, kf, vf = q.float(), k.float(), v.float()
    if hq != hkv:
        kf = kf.repeat_interleave(hq // hkv, dim=1)
        vf = vf.repeat_interleave(hq // hkv, dim=1)
    z = torch.einsum("bhid,bhjd->bhij", qf, kf) * scale
    keep = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
    if causal:
        keep = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
    if mask is not None:
        keep = keep & mask
    keep = keep.expand(b, hq, sq, sk)
    z = z.masked_fill(~keep, float("-inf"))
    if sink is None:
        extra = torch.full((b, hq, sq, 1), float("-inf"), device=q.device)
    else:
        extra = sink.float().view(1, hq, 1, 1).expand(b, hq, sq, 1)
    empty = ~keep.any(-1, keepdim=True) & torch.isinf(extra)
    # an all--inf row gets a dummy 0 column so the softmax (and its gradient) stays finite
    extra = torch.where(empty, torch.zeros_like(extra), extra)
    aug = torch.cat([z, extra], dim=-1)
    lse = torch.logsumexp(aug, dim=-1)
    p = torch.softmax(aug, dim=-1)[..., :sk]
    out = torch.einsum("bhij,bhjd->bhid", p, vf)
    lse = torch.where(empty[..., 0], float("-inf"), lse)
    return out.to(q.dtype), lse


def attention_reference(q, k, v, sink=None, causal=False, scale=None):
    """Dense attention with an optional per-head sink logit: (out, lse)."""
    return masked_attention_reference(q, k, v, None, sink, scale, causal)


def block_sparse_attention_reference(q, k, v, q2k_idx, q2k_cnt, sink=None, causal=False, scale=None,
                                     tile_q=64, tile_k=64, kv_tile_len=None):
    """Block-sparse attention over per-(b, h, query tile) key-tile lists: (out, lse)."""
    b, hq, sq, _ = q.shape
    sk = k.shape[2]
    idx = q2k_idx.expand(b, hq, *q2k_idx.shape[2:])
    cnt = q2k_cnt.expand(b, hq, *q2k_cnt.shape[2:])
    mask = token_mask(idx, cnt, sq, sk, tile_q, tile_k, kv_tile_len, causal=False)
    return masked_attention_reference(q, k, v, mask, sink, scale, causal)
