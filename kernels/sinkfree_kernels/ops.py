"""Launchers and `torch.library` ops (namespace `sinkfree`) for dense and block-sparse flash attention.

Public entry points: `flash_attention(q, k, v, sink, causal, scale)` and
`block_sparse_attention(q, k, v, q2k_idx, q2k_cnt, ...)`, both returning (out, lse) and differentiable in
q, k, v and sink (and lse: its gradient folds into delta). They compile under torch.compile without graph
breaks (custom ops with fake kernels).
"""

import math
from typing import Optional

import torch
import triton

from ._tuning import INTERPRET, seq_bucket, tma_mode
from .attention_bwd import _attn_bwd_dkdv, _attn_bwd_dq, _bwd_preprocess
from .attention_fwd import LOG2E, _attn_fwd
from .tiles import transpose_lists

SUPPORTED_HEAD_DIMS = (64, 128)
_PRE_BLOCK = 64


def _check_inputs(q, k, v, sink):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"sinkfree attention wants (B, H, S, D) tensors, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    b, hq, _, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must match each other and q's B and D")
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim {d} is not supported by the sinkfree Triton kernels: use one of "
                         f"{SUPPORTED_HEAD_DIMS} (or the 'sdpa' / 'eager' backend)")
    if hq % k.shape[1]:
        raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({k.shape[1]})")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one of float16/bfloat16/float32, got {q.dtype}, {k.dtype}, {v.dtype}")
    if sink is not None and sink.shape != (hq,):
        raise ValueError(f"sink must have shape ({hq},) (one logit per query head), got {tuple(sink.shape)}")


def _lastdim_contig(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _tma_ok(t):
    """Whether a (B, H, S, D) tensor can back a TMA descriptor: 16-bit floats (the bf16/fp16 fast path), base
    and every non-last stride 16-byte aligned, last dim contiguous, and (CUDA) a Hopper-or-newer device. CPU
    tensors pass (the interpreter and the sm_90 CPU-compile tool)."""
    if t.dtype not in (torch.float16, torch.bfloat16) or t.numel() == 0 or t.stride(-1) != 1:
        return False
    e = t.element_size()
    if t.data_ptr() % 16 or any((st * e) % 16 for st in t.stride()[:-1]):
        return False
    if t.is_cuda:
        return not INTERPRET and torch.cuda.get_device_capability(t.device)[0] >= 9
    return True


def _tma_descs(*tensors):
    """Host tensor descriptors of q, k, v (the backward: and dO) over their 4-D shapes (block shapes set by the
    configs' pre_hook), or None: SINKFREE_ATTN_TMA off, an old Triton, or a tensor TMA cannot read (then every
    launch uses pointers)."""
    if tma_mode() == "0" or not all(_tma_ok(t) for t in tensors):
        return None
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:  # triton < 3.4
        return None
    return [TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, 64, t.shape[-1]]) for t in tensors]


def _prec(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"


def _softmax_scale(q, scale):
    """The score scale: 1/sqrt(D) by default."""
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def _grid(n, block, programs):
    """Launch grid of an autotuned kernel: (cdiv(n, meta[block]), programs)."""
    return lambda meta: (triton.cdiv(n, meta[block]), programs)


def _tile_args(q, idx, cnt, tile_q, tile_k, kv_tile_len=None):
    """Broadcast tile lists to (B, Hq, Nq, K) / (B, Hq, Nq) views with a contiguous last dim; kv_tile_len
    (Nk,) as contiguous int32 on q's device. Returns (idx, cnt, kv_tile_len)."""
    b, hq, sq, _ = q.shape
    if tile_q not in (64, 128) or tile_k not in (64, 128):
        raise ValueError(f"tile sizes must be 64 or 128, got tile_q={tile_q}, tile_k={tile_k}")
    nq = triton.cdiv(sq, tile_q)
    if idx.dim() != 4 or cnt.dim() != 3 or idx.shape[2] != nq or cnt.shape[2] != nq:
        raise ValueError(f"tile lists must be idx (B, H, {nq}, K) and cnt (B, H, {nq}) for Sq={sq}, "
                         f"tile_q={tile_q}; got {tuple(idx.shape)} and {tuple(cnt.shape)}")
    if idx.dtype != torch.int32 or cnt.dtype != torch.int32:
        raise ValueError("tile lists must be int32")
    idx = _lastdim_contig(idx.expand(b, hq, nq, idx.shape[3]))
    cnt = _lastdim_contig(cnt.expand(b, hq, nq))
    if kv_tile_len is not None:
        kv_tile_len = kv_tile_len.to(device=q.device, dtype=torch.int32).contiguous()
    return idx, cnt, kv_tile_len


def _list_args(idx, cnt, klen, dummy):
    """Kernel arguments of optional tile lists: (sparse, idx, cnt, klen, strides of idx and cnt); `dummy`
    stands in for absent tensors (never read: SPARSE / HAS_KLEN are off)."""
    if idx is None:
        return False, dummy, dummy, (klen if klen is not None else dummy), (0, 0, 0, 0, 0)
    strides = (idx.stride(0), idx.stride(1), idx.stride(2), cnt.stride(0), cnt.stride(1))
    return True, idx, cnt, (klen if klen is not None else dummy), strides


def _bwd_list_args(idx, cnt, klen, n_k_tiles, dummy):
    """The backward's list arguments: (sparse, query-major idx, cnt, strides for dQ, the transposed key-major
    kidx, kcnt, strides for dK/dV, klen)."""
    kidx = kcnt = None
    if idx is not None:
        kidx, kcnt = transpose_lists(idx, cnt, n_k_tiles)
    sparse, kidx, kcnt, klen_t, strides_k = _list_args(kidx, kcnt, klen, dummy)
    _, idx, cnt, _, strides_q = _list_args(idx, cnt, klen, dummy)
    return sparse, idx, cnt, strides_q, kidx, kcnt, strides_k, klen_t


def _bwd_delta(out, dout, lse, dlse, sink):
    """delta = rowsum(dO * O) - dLSE (B, Hq, Sq) fp32 and dsink (Hq,) fp32 (empty without a sink)."""
    b, hq, sq, d = out.shape
    delta = torch.empty((b, hq, sq), dtype=torch.float32, device=out.device)
    n_pre = triton.cdiv(sq, _PRE_BLOCK)
    part = torch.empty((b * hq, n_pre), dtype=torch.float32, device=out.device)
    sink_t = sink.float().contiguous() if sink is not None else lse
    dlse_t = dlse.float().contiguous() if dlse is not None else lse
    _bwd_preprocess[(n_pre, b * hq)](
        out, dout, lse, dlse_t, sink_t, delta, part,
        out.stride(0), out.stride(1), out.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
        hq, sq, n_pre, HEAD_DIM=d, BLOCK=_PRE_BLOCK, HAS_SINK=sink is not None, HAS_DLSE=dlse is not None,
    )
    if sink is None:
        return delta, torch.zeros((0,), dtype=torch.float32, device=out.device)
    return delta, -part.view(b, hq, -1).sum(dim=(0, 2))


def _bshd_empty(like, shape, dtype=None):
    """An empty (B, H, S, D) tensor stored as (B, S, H, D): the layout the model reshapes to (B, S, H·D) for the
    output projection (a view, no copy) and the layout of the fused q/k/v projection's gradient, so neither the
    output nor dq/dk/dv needs a transposing copy around the kernels (which take any strides)."""
    b, h, s, d = shape
    return like.new_empty((b, s, h, d), dtype=dtype or like.dtype).transpose(1, 2)


def _fake_fwd(q, *args):
    b, h, s, d = q.shape
    return _bshd_empty(q, (b, h, s, d)), q.new_empty((b, h, s), dtype=torch.float32)


def _fake_grads(q, k, v, sink):
    n = q.shape[1] if sink is not None else 0
    return (_bshd_empty(q, q.shape), _bshd_empty(k, k.shape), _bshd_empty(v, v.shape),
            q.new_empty((n,), dtype=torch.float32))


def _forward(q, k, v, sink, causal, scale, idx=None, cnt=None, klen=None, tile_q=64, tile_k=64):
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    q, k, v = _lastdim_contig(q), _lastdim_contig(k), _lastdim_contig(v)
    out = _bshd_empty(q, (b, hq, sq, d))
    lse = torch.empty((b, hq, sq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    sink_t = sink.float().contiguous() if sink is not None else lse
    sparse, idx, cnt, klen_t, list_strides = _list_args(idx, cnt, klen, lse)
    descs = None if sparse else _tma_descs(q, k, v)
    _attn_fwd[_grid(sq, "BLOCK_M", b * hq)](
        q, k, v, out, lse, sink_t, idx, cnt, klen_t, *(descs or (q, k, v)),
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        *list_strides,
        hq, hq // hkv, sq, sk, scale * LOG2E, seq_bucket(max(sq, sk)),
        HEAD_DIM=d, CAUSAL=causal, SPARSE=sparse, HAS_SINK=sink is not None, HAS_KLEN=klen is not None,
        TILE_M=tile_q, TILE_N=tile_k, PREC=_prec(q.dtype), HAS_DESC=descs is not None,
    )
    return out, lse


def _backward(dout, dlse, q, k, v, out, lse, sink, causal, scale, deterministic, idx=None, cnt=None, klen=None,
              tile_q=64, tile_k=64):
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    q, k, v, dout = _lastdim_contig(q), _lastdim_contig(k), _lastdim_contig(v), _lastdim_contig(dout)
    dq, dk, dv = _bshd_empty(q, (b, hq, sq, d)), _bshd_empty(k, (b, hkv, sk, d)), _bshd_empty(v, (b, hkv, sk, d))
    if sq == 0 or sk == 0:
        dsink = torch.zeros((hq,) if sink is not None else (0,), dtype=torch.float32, device=q.device)
        return dq.zero_(), dk.zero_(), dv.zero_(), dsink
    delta, dsink = _bwd_delta(out, dout, lse, dlse, sink)

    sparse, idx, cnt, strides_q, kidx, kcnt, strides_k, klen_t = _bwd_list_args(
        idx, cnt, klen, triton.cdiv(sk, tile_k), lse)
    common = dict(HEAD_DIM=d, CAUSAL=causal, SPARSE=sparse, HAS_KLEN=klen is not None,
                  TILE_M=tile_q, TILE_N=tile_k, PREC=_prec(q.dtype))
    key = seq_bucket(max(sq, sk))
    # opt-in faster mode: dQ added with fp32 atomics inside the dK/dV pass (no dQ kernel, not reproducible)
    dq_acc = (_bshd_empty(q, (b, hq, sq, d), torch.float32).zero_() if not deterministic
              else torch.empty(1, dtype=torch.float32, device=q.device))
    acc_strides = (dq_acc.stride(0), dq_acc.stride(1), dq_acc.stride(2)) if not deterministic else (0, 0, 0)

    # one set of descriptors for both kernels (each config's pre_hook sets the block shapes before its launch)
    descs = None if sparse else _tma_descs(q, k, v, dout)
    common["HAS_DESC"] = descs is not None
    descs = descs or (q, k, v, dout)

    _attn_bwd_dkdv[_grid(sk, "BLOCK_N", b * hkv)](
        q, k, v, dout, lse, delta, dk, dv, dq_acc, kidx, kcnt, klen_t, *descs,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2), *acc_strides, *strides_k,
        hq, hkv, hq // hkv, sq, sk, scale * LOG2E, scale, key, ATOMIC_DQ=not deterministic, **common,
    )
    if not deterministic:
        return dq_acc.to(q.dtype), dk, dv, dsink

    _attn_bwd_dq[_grid(sq, "BLOCK_M", b * hq)](
        q, k, v, dout, lse, delta, dq, idx, cnt, klen_t, *descs,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2), *strides_q,
        hq, hq // hkv, sq, sk, scale * LOG2E, scale, key, **common,
    )
    return dq, dk, dv, dsink


# ---- dense op ---------------------------------------------------------------------------------------------

@torch.library.custom_op("sinkfree::flash_attn_fwd", mutates_args=())
def flash_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sink: Optional[torch.Tensor],
                   causal: bool, scale: float, deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense flash attention forward: (out, lse)."""
    return _forward(q, k, v, sink, causal, scale)


flash_attn_fwd.register_fake(_fake_fwd)


@torch.library.custom_op("sinkfree::flash_attn_bwd", mutates_args=())
def flash_attn_bwd(dout: torch.Tensor, dlse: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor,
                   v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, sink: Optional[torch.Tensor],
                   causal: bool, scale: float,
                   deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense flash attention backward: (dq, dk, dv, dsink); dsink is empty without a sink."""
    return _backward(dout, dlse, q, k, v, out, lse, sink, causal, scale, deterministic)


@flash_attn_bwd.register_fake
def _(dout, dlse, q, k, v, out, lse, sink, causal, scale, deterministic):
    return _fake_grads(q, k, v, sink)


def _flash_setup(ctx, inputs, output):
    q, k, v, sink, causal, scale, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, sink)
    ctx.args = (causal, scale, deterministic)


def _flash_grad(ctx, dout, dlse):
    q, k, v, out, lse, sink = ctx.saved_tensors
    dq, dk, dv, dsink = flash_attn_bwd(dout, dlse, q, k, v, out, lse, sink, *ctx.args)
    return dq, dk, dv, (dsink if sink is not None else None), None, None, None


flash_attn_fwd.register_autograd(_flash_grad, setup_context=_flash_setup)


# ---- block-sparse op --------------------------------------------------------------------------------------

@torch.library.custom_op("sinkfree::block_sparse_attn_fwd", mutates_args=())
def block_sparse_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q2k_idx: torch.Tensor,
                          q2k_cnt: torch.Tensor, kv_tile_len: Optional[torch.Tensor], sink: Optional[torch.Tensor],
                          causal: bool, scale: float, tile_q: int, tile_k: int,
                          deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse flash attention forward over key-tile lists: (out, lse)."""
    return _forward(q, k, v, sink, causal, scale, q2k_idx, q2k_cnt, kv_tile_len, tile_q, tile_k)


block_sparse_attn_fwd.register_fake(_fake_fwd)


@torch.library.custom_op("sinkfree::block_sparse_attn_bwd", mutates_args=())
def block_sparse_attn_bwd(dout: torch.Tensor, dlse: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor,
                          v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, q2k_idx: torch.Tensor,
                          q2k_cnt: torch.Tensor, kv_tile_len: Optional[torch.Tensor],
                          sink: Optional[torch.Tensor], causal: bool, scale: float, tile_q: int, tile_k: int,
                          deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block-sparse backward: (dq, dk, dv, dsink), dK/dV key-major over the transposed lists."""
    return _backward(dout, dlse, q, k, v, out, lse, sink, causal, scale, deterministic, q2k_idx, q2k_cnt,
                     kv_tile_len, tile_q, tile_k)


@block_sparse_attn_bwd.register_fake
def _(dout, dlse, q, k, v, out, lse, q2k_idx, q2k_cnt, kv_tile_len, sink, causal, scale, tile_q, tile_k,
      deterministic):
    return _fake_grads(q, k, v, sink)


def _register_tile_list_autograd(fwd_op, bwd_op):
    """Autograd for a tile-list op fwd_op(q, k, v, idx, cnt, klen, sink, causal, scale, tile_q, tile_k, flag,
    ...) -> (out, lse) whose backward is bwd_op(dout, dlse, q, k, v, out, lse, idx, cnt, klen, sink, causal,
    scale, tile_q, tile_k, flag) -> (dq, dk, dv, dsink)."""
    def setup(ctx, inputs, output):
        q, k, v, idx, cnt, klen, sink = inputs[:7]
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, idx, cnt, klen, sink)
        ctx.args = tuple(inputs[7:12])
        ctx.n_inputs = len(inputs)

    def grad(ctx, dout, dlse):
        q, k, v, out, lse, idx, cnt, klen, sink = ctx.saved_tensors
        dq, dk, dv, dsink = bwd_op(dout, dlse, q, k, v, out, lse, idx, cnt, klen, sink, *ctx.args)
        return (dq, dk, dv, None, None, None, (dsink if sink is not None else None)) + (None,) * (ctx.n_inputs - 7)

    fwd_op.register_autograd(grad, setup_context=setup)


_register_tile_list_autograd(block_sparse_attn_fwd, block_sparse_attn_bwd)


# ---- public API -------------------------------------------------------------------------------------------

def flash_attention(q, k, v, sink=None, causal=False, scale=None, deterministic=True):
    """Dense flash attention with optional per-head sink logits (fp32, (Hq,)): returns (out, lse).
    deterministic=False adds dQ with fp32 atomics in the backward (faster, not bitwise reproducible)."""
    _check_inputs(q, k, v, sink)
    return flash_attn_fwd(q, k, v, sink, bool(causal), _softmax_scale(q, scale), bool(deterministic))


def block_sparse_attention(q, k, v, q2k_idx, q2k_cnt, sink=None, causal=False, scale=None, tile_q=64,
                           tile_k=64, kv_tile_len=None, deterministic=True):
    """Block-sparse flash attention over key-tile lists idx (B|1, Hq|1, Nq, K) int32 and cnt (B|1, Hq|1, Nq)
    int32; kv_tile_len (Nk,) int32 gives the real tokens of each padded key tile. Returns (out, lse).
    deterministic=False: dQ by fp32 atomics in the backward (faster, not bitwise reproducible)."""
    _check_inputs(q, k, v, sink)
    scale = _softmax_scale(q, scale)
    idx, cnt, kv_tile_len = _tile_args(q, q2k_idx, q2k_cnt, tile_q, tile_k, kv_tile_len)
    return block_sparse_attn_fwd(q, k, v, idx, cnt, kv_tile_len, sink, bool(causal), scale, tile_q, tile_k,
                                 bool(deterministic))
