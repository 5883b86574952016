"""Launchers and `torch.library` ops of the 8-bit attention (namespace `sinkfree`):

- `sinkfree::sage8_fwd` / `sinkfree::sage8_bwd`: trainable INT8-QK / FP8-PV attention with the 8-bit
  backward (differentiable in q, k, v, sink and through lse), dense or block-sparse (optional tile lists);
- `sinkfree::sage8_infer_fwd`: the same forward without autograd (inference; returns LSE);
- `sinkfree::sage8_quantize`: the quantization alone (for kernel-only timing).

Public entry points: `sage8_attention`, `sage8_block_sparse_attention` (infer=True for the forward-only
op), `sage8_quantize` + `sage8_attention_quantized` (kernel-only forward). Inputs as the bf16 family:
q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D), D in (64, 128), fp16/bf16 (fp32 for tests).
"""

from typing import Optional

import torch
import triton

from ._tuning import seq_bucket
from .attention_fwd import LOG2E
from .ops import (_bshd_empty, _bwd_delta, _bwd_list_args, _check_inputs, _fake_fwd, _fake_grads, _grid, _lastdim_contig,
                  _list_args, _prec, _register_tile_list_autograd, _softmax_scale, _tile_args)
from .quant import EXACT_FP8, FP8_MAX, QUANT_BLOCK, _quant_channels, _quant_tokens_int8
from .sage8_bwd import _sage8_bwd_dkdv, _sage8_bwd_dq
from .sage8_fwd import _sage8_fwd

INT8_MAX = 127.0
_PAD = 16  # K-major 8-bit buffers: rows padded to 16 bytes (TMA / vectorised loads)


def _quant_int8(x, mean=None, kmean=None, corr_scale=0.0, transposed=False, group=1):
    """Per-token INT8 of x (B, H, S, D) (minus mean (B, H, D)): (x8, x8t or None, scale (B, H, S), corr or None)."""
    b, h, s, d = x.shape
    x8 = torch.empty((b, h, s, d), dtype=torch.int8, device=x.device)
    scale = torch.empty((b, h, s), dtype=torch.float32, device=x.device)
    x8t = corr = None
    if transposed:
        x8t = torch.empty((b, h, d, triton.cdiv(s, _PAD) * _PAD), dtype=torch.int8, device=x.device)
    if kmean is not None:
        corr = torch.empty((b, h, s), dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return x8, x8t, scale, corr
    t = x8t if transposed else x8
    _quant_tokens_int8[(triton.cdiv(s, QUANT_BLOCK), b * h)](
        x, mean if mean is not None else scale, x8, t, scale, corr if corr is not None else scale,
        kmean if kmean is not None else scale,
        x.stride(0), x.stride(1), x.stride(2), x8.stride(0), x8.stride(1), x8.stride(2),
        t.stride(0), t.stride(1), t.stride(2),
        h, h // group, group, s, corr_scale,
        HEAD_DIM=d, BLOCK=QUANT_BLOCK, SUB_MEAN=mean is not None, HAS_T=transposed, HAS_CORR=kmean is not None,
    )
    return x8, x8t, scale, corr


def _quant_kmajor(x, split=False, int8=False):
    """Per-channel 8-bit x (B, H, S, D) into a K-major [D, S] buffer: (x8 as a (B, H, S, D) view, fac (B, H, D),
    lo or None). FP8 (V): x ~ x8 * fac * 448 (the 448 of P~ = e4m3(448 P) folded in), with split the residual
    term lo (x ~ (x8 + lo / 16) * fac * 448). int8 (dO): x ~ x8 * fac, fac = absmax / 127."""
    b, h, s, d = x.shape
    if s > 0:  # one read pass, no fp32 or |x| copy of x (max/min of bf16 values are exact)
        lo_, hi_ = torch.aminmax(x, dim=2)
        amax = torch.maximum(hi_, -lo_).float()
    else:
        amax = x.new_zeros((b, h, d), dtype=torch.float32)
    dtype = torch.int8 if int8 else torch.float8_e4m3fn
    buf = torch.empty((b, h, d, triton.cdiv(s, _PAD) * _PAD), dtype=dtype, device=x.device)
    x8 = buf[..., :s].transpose(-1, -2)  # logical (B, H, S, D), token stride 1
    lo = torch.empty_like(buf)[..., :s].transpose(-1, -2) if split else None
    if s > 0:
        _quant_channels[(triton.cdiv(s, QUANT_BLOCK), b * h)](
            x, amax.contiguous(), x8, lo if split else x8, x.stride(0), x.stride(1), x.stride(2),
            x8.stride(0), x8.stride(1), x8.stride(2), x8.stride(3), h, s,
            HEAD_DIM=d, BLOCK=QUANT_BLOCK, EXACT=EXACT_FP8, HAS_LO=split, INT8=int8,
        )
    if int8:  # IEEE division, as the reference's
        return x8, amax / torch.full_like(amax, INT8_MAX), lo
    return x8, amax / (FP8_MAX * FP8_MAX), lo


def _quantize(q, k, v, scale, smooth_k, transposed=False, with_v=True, v_split=False):
    """Everything the 8-bit kernels read: dict of int8 q8/k8 (+ K-major copies), per-token scales, k mean,
    per-row smoothing correction, fp8 V (K-major) and its per-channel factor."""
    group = q.shape[1] // k.shape[1]
    # fp32 accumulation without an fp32 copy of K
    km = k.mean(2, dtype=torch.float32).contiguous() if smooth_k and k.shape[2] > 0 else None
    q8, q8t, qs, corr = _quant_int8(q, None, km, scale, transposed, group)
    k8, k8t, ks, _ = _quant_int8(k, km, None, 0.0, transposed)
    qz = dict(q8=q8, q8t=q8t, qs=qs, corr=corr, k8=k8, k8t=k8t, ks=ks, kmean=km)
    if with_v:
        qz["v8"], qz["vfac"], qz["vlo"] = _quant_kmajor(v, v_split)
    return qz


def _forward_quantized(qz, shape_q, shape_k, dtype, sink, causal, scale, idx=None, cnt=None, klen=None,
                       tile_q=64, tile_k=64):
    b, hq, sq, d = shape_q
    hkv, sk = shape_k[1], shape_k[2]
    device = qz["q8"].device
    out = _bshd_empty(qz["q8"], (b, hq, sq, d), dtype)  # the layout of ops.py's outputs (and their fakes)
    lse = torch.empty((b, hq, sq), dtype=torch.float32, device=device)
    if out.numel() == 0:
        return out, lse
    if sk == 0:  # no key at all: out 0, LSE = the sink logit or -inf
        out.zero_()
        if sink is not None:
            lse.copy_(sink.float().view(1, hq, 1).expand(b, hq, sq))
        else:
            lse.fill_(float("-inf"))
        return out, lse
    sparse, idx, cnt, klen_t, ls = _list_args(idx, cnt, klen, torch.empty(1, dtype=torch.int32, device=device))
    sink_t = sink.float().contiguous() if sink is not None else lse
    corr = qz["corr"] if qz["corr"] is not None else lse
    q8, k8, v8 = qz["q8"], qz["k8"], qz["v8"]

    vlo = qz.get("vlo")
    _sage8_fwd[_grid(sq, "BLOCK_M", b * hq)](
        q8, qz["qs"], k8, qz["ks"], v8, vlo if vlo is not None else v8, qz["vfac"].contiguous(), corr, out, lse, sink_t, idx, cnt, klen_t,
        q8.stride(0), q8.stride(1), q8.stride(2), k8.stride(0), k8.stride(1), k8.stride(2),
        v8.stride(0), v8.stride(1), v8.stride(2), v8.stride(3), out.stride(0), out.stride(1), out.stride(2),
        *ls, hq, hq // hkv, sq, sk, scale * LOG2E, seq_bucket(max(sq, sk)),
        HEAD_DIM=d, CAUSAL=causal, SPARSE=sparse, HAS_SINK=sink is not None, HAS_CORR=qz["corr"] is not None,
        HAS_KLEN=klen is not None, TILE_M=tile_q, TILE_N=tile_k, EXACT=EXACT_FP8, V_SPLIT=vlo is not None,
    )
    return out, lse


def _forward(q, k, v, sink, causal, scale, smooth_k, v_split, idx=None, cnt=None, klen=None, tile_q=64,
             tile_k=64):
    q, k, v = _lastdim_contig(q), _lastdim_contig(k), _lastdim_contig(v)
    qz = _quantize(q, k, v, scale, smooth_k, v_split=v_split)
    return _forward_quantized(qz, q.shape, k.shape, q.dtype, sink, causal, scale, idx, cnt, klen, tile_q, tile_k)


def _backward(dout, dlse, q, k, v, out, lse, sink, causal, scale, smooth_k, idx=None, cnt=None, klen=None,
              tile_q=64, tile_k=64):
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    q, k, v, dout = _lastdim_contig(q), _lastdim_contig(k), _lastdim_contig(v), _lastdim_contig(dout)
    out = _lastdim_contig(out)
    dq = _bshd_empty(q, (b, hq, sq, d)).zero_()
    dk, dv = _bshd_empty(k, (b, hkv, sk, d)).zero_(), _bshd_empty(v, (b, hkv, sk, d)).zero_()
    if sq == 0 or sk == 0:
        dsink = torch.zeros((hq,) if sink is not None else (0,), dtype=torch.float32, device=q.device)
        return dq, dk, dv, dsink
    # delta' = rowsum(dO o O) - dLSE and the sink gradient: the bf16 family's preprocess
    delta, dsink = _bwd_delta(out, dout, lse, dlse, sink)
    qz = _quantize(q, k, v, scale, smooth_k, transposed=True, with_v=False)
    do8, dofac, _ = _quant_kmajor(dout, int8=True)  # dV = P^T dO in INT8
    # r = rowsum(dS) = dLSE + delta' p_sink: the k-mean term of dQ (zero without sink and LSE gradient)
    has_r = smooth_k and (sink is not None or dlse is not None)
    r = lse
    if has_r:
        fin = torch.isfinite(lse)
        r = torch.zeros_like(delta)
        if sink is not None:
            r = r + delta * torch.exp(sink.float().view(1, hq, 1) - torch.where(fin, lse, float("inf")))
        if dlse is not None:
            r = r + dlse.float()
        r = torch.where(fin, r, 0.0).contiguous()

    sparse, idx, cnt, strides_q, kidx, kcnt, strides_k, klen_t = _bwd_list_args(
        idx, cnt, klen, triton.cdiv(sk, tile_k), torch.empty(1, dtype=torch.int32, device=q.device))
    corr = qz["corr"] if qz["corr"] is not None else lse
    kmean = qz["kmean"] if qz["kmean"] is not None else lse
    common = dict(HEAD_DIM=d, CAUSAL=causal, SPARSE=sparse, HAS_KLEN=klen is not None,
                  HAS_CORR=qz["corr"] is not None, TILE_M=tile_q, TILE_N=tile_k, PREC=_prec(q.dtype))
    key = seq_bucket(max(sq, sk))
    q8, q8t, k8, k8t = qz["q8"], qz["q8t"], qz["k8"], qz["k8t"]

    _sage8_bwd_dkdv[_grid(sk, "BLOCK_N", b * hkv)](
        q8, q8t, qz["qs"], k8, qz["ks"], v, dout, do8, dofac.contiguous(), lse, delta, corr, dk, dv,
        kidx, kcnt, klen_t,
        q8.stride(0), q8.stride(1), q8.stride(2), q8t.stride(0), q8t.stride(1), q8t.stride(3), q8t.stride(2),
        k8.stride(0), k8.stride(1), k8.stride(2), v.stride(0), v.stride(1), v.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2), do8.stride(0), do8.stride(1), do8.stride(2),
        do8.stride(3), dk.stride(0), dk.stride(1), dk.stride(2), *strides_k,
        hq, hkv, hq // hkv, sq, sk, scale * LOG2E, scale, key, **common,
    )

    _sage8_bwd_dq[_grid(sq, "BLOCK_M", b * hq)](
        q8, qz["qs"], k8, k8t, qz["ks"], v, dout, lse, delta, corr, r, kmean, dq, idx, cnt, klen_t,
        q8.stride(0), q8.stride(1), q8.stride(2), k8.stride(0), k8.stride(1), k8.stride(2),
        k8t.stride(0), k8t.stride(1), k8t.stride(3), k8t.stride(2), v.stride(0), v.stride(1), v.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2), dq.stride(0), dq.stride(1), dq.stride(2), *strides_q,
        hq, hq // hkv, sq, sk, scale * LOG2E, scale, key, HAS_R=has_r, **common,
    )
    return dq, dk, dv, dsink


# ---- ops ---------------------------------------------------------------------------------------------------

@torch.library.custom_op("sinkfree::sage8_fwd", mutates_args=())
def sage8_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q2k_idx: Optional[torch.Tensor],
              q2k_cnt: Optional[torch.Tensor], kv_tile_len: Optional[torch.Tensor], sink: Optional[torch.Tensor],
              causal: bool, scale: float, tile_q: int, tile_k: int,
              smooth_k: bool, v_split: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Trainable 8-bit attention forward (dense when q2k_idx is None): (out, lse)."""
    return _forward(q, k, v, sink, causal, scale, smooth_k, v_split, q2k_idx, q2k_cnt, kv_tile_len, tile_q, tile_k)


sage8_fwd.register_fake(_fake_fwd)


@torch.library.custom_op("sinkfree::sage8_infer_fwd", mutates_args=())
def sage8_infer_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q2k_idx: Optional[torch.Tensor],
                    q2k_cnt: Optional[torch.Tensor], kv_tile_len: Optional[torch.Tensor],
                    sink: Optional[torch.Tensor], causal: bool, scale: float, tile_q: int, tile_k: int,
                    smooth_k: bool, v_split: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Inference 8-bit attention forward (INT8 QK, FP8 PV), no autograd: (out, lse)."""
    return _forward(q, k, v, sink, causal, scale, smooth_k, v_split, q2k_idx, q2k_cnt, kv_tile_len, tile_q, tile_k)


sage8_infer_fwd.register_fake(_fake_fwd)


@torch.library.custom_op("sinkfree::sage8_bwd", mutates_args=())
def sage8_bwd(dout: torch.Tensor, dlse: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, q2k_idx: Optional[torch.Tensor],
              q2k_cnt: Optional[torch.Tensor], kv_tile_len: Optional[torch.Tensor], sink: Optional[torch.Tensor],
              causal: bool, scale: float, tile_q: int, tile_k: int,
              smooth_k: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """8-bit attention backward: (dq, dk, dv, dsink); dsink is empty without a sink."""
    return _backward(dout, dlse, q, k, v, out, lse, sink, causal, scale, smooth_k, q2k_idx, q2k_cnt, kv_tile_len,
                     tile_q, tile_k)


@sage8_bwd.register_fake
def _(dout, dlse, q, k, v, out, lse, q2k_idx, q2k_cnt, kv_tile_len, sink, causal, scale, tile_q, tile_k, smooth_k):
    return _fake_grads(q, k, v, sink)


_register_tile_list_autograd(sage8_fwd, sage8_bwd)  # the backward flag is smooth_k; v_split is forward-only


# ---- public API --------------------------------------------------------------------------------------------

def _prepare(q, k, v, sink, scale, infer):
    _check_inputs(q, k, v, sink)
    if infer and torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, sink)):
        raise RuntimeError("sage8-infer is forward-only (no backward): use the trainable 'sage8' "
                           "(sinkfree_kernels.sage8_attention(..., infer=False)) or run under torch.no_grad()")
    return _softmax_scale(q, scale)


def sage8_attention(q, k, v, sink=None, causal=False, scale=None, smooth_k=True, infer=False, v_split=False):
    """Dense 8-bit attention (INT8 QK^T per token with K smoothing, FP8 PV): (out, lse). infer=False is
    trainable (8-bit backward, dP in the input dtype); infer=True is the forward-only op. v_split=True
    quantizes V as two FP8 terms (one more FP8 dot in the forward; about halves the output error)."""
    scale = _prepare(q, k, v, sink, scale, infer)
    op = sage8_infer_fwd if infer else sage8_fwd
    return op(q, k, v, None, None, None, sink, bool(causal), scale, 64, 64, bool(smooth_k), bool(v_split))


def sage8_block_sparse_attention(q, k, v, q2k_idx, q2k_cnt, sink=None, causal=False, scale=None, tile_q=64,
                                 tile_k=64, kv_tile_len=None, smooth_k=True, infer=False, v_split=False):
    """Block-sparse 8-bit attention over the key-tile lists of `block_sparse_attention`: (out, lse)."""
    scale = _prepare(q, k, v, sink, scale, infer)
    idx, cnt, kv_tile_len = _tile_args(q, q2k_idx, q2k_cnt, tile_q, tile_k, kv_tile_len)
    op = sage8_infer_fwd if infer else sage8_fwd
    return op(q, k, v, idx, cnt, kv_tile_len, sink, bool(causal), scale, tile_q, tile_k, bool(smooth_k),
              bool(v_split))


def sage8_quantize(q, k, v, scale=None, smooth_k=True, v_split=False):
    """The forward's quantization alone (INT8 Q, smoothed INT8 K, FP8 V): a dict for `sage8_attention_quantized`
    (kernel-only timing)."""
    _check_inputs(q, k, v, None)
    scale = _softmax_scale(q, scale)
    q, k, v = _lastdim_contig(q), _lastdim_contig(k), _lastdim_contig(v)
    qz = _quantize(q, k, v, scale, smooth_k, v_split=v_split)
    qz.update(shape_q=tuple(q.shape), shape_k=tuple(k.shape), dtype=q.dtype, scale=scale)
    return qz


def sage8_backward_quantize(q, k, dout, scale=None, smooth_k=True):
    """The backward's re-quantization alone (INT8 Q, K with K-major copies, INT8 dO): its cost is the part of
    the fwd+bwd time that is not attention kernels."""
    scale = _softmax_scale(q, scale)
    q, k, dout = _lastdim_contig(q), _lastdim_contig(k), _lastdim_contig(dout)
    qz = _quantize(q, k, None, scale, smooth_k, transposed=True, with_v=False)
    qz["do8"], qz["dofac"], _ = _quant_kmajor(dout, int8=True)
    return qz


def sage8_attention_quantized(qz, sink=None, causal=False, q2k_idx=None, q2k_cnt=None, tile_q=64, tile_k=64):
    """The 8-bit attention kernel alone on `sage8_quantize` output (no autograd): (out, lse)."""
    idx = cnt = None
    if q2k_idx is not None:
        idx, cnt, _ = _tile_args(qz["q8"], q2k_idx, q2k_cnt, tile_q, tile_k)
    return _forward_quantized(qz, qz["shape_q"], qz["shape_k"], qz["dtype"], sink, bool(causal), qz["scale"],
                              idx, cnt, None, tile_q, tile_k)
