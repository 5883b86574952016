"""`sinkfree bench attention`: our Triton `flash` and `block_sparse` kernels against SDPA (cuDNN, flash),
FlexAttention (dense, BlockMask from the same tile lists, and compiled flex + sink the way users train sinks
today) and the `vsa` package's Triton kernel when installed, side by side in one process on one GPU.

8-bit rows (issue 7): `sage8` (trainable, fwd and fwd+bwd) and `sage8-infer` (fwd) time the whole op, the
quantization of Q, K, V (and in the backward of Q, K, dO) included; `... kernel-only` rows time the attention
kernel on inputs quantized beforehand, and `sage8 quant-only` / `sage8 bwd-quant-only` the quantization alone
(replayed as a CUDA graph, so Python launch overhead is not counted)
(subtract it from the fwd+bwd row for the backward kernels' own time).

FLOPs (DESIGN.md): fwd = 4*B*H*Sq*Sk*D (x0.5 causal), fwd+bwd = 3.5 x fwd, sparse = dense x kept fraction.
Times are medians of triton.testing.do_bench; "x cuDNN" is cuDNN's time over the row's time.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass

import torch

DENSE_SHAPES = ["2x16x4096x128:causal", "2x16x4096x128", "1x16x16384x128", "1x24x32768x128",
                "4x16x4096x64:causal"]
SPARSE_SHAPE = "1x24x32768x128"


@dataclass
class Row:
    """One timed measurement."""

    section: str  # dense | sparse
    shape: str
    mode: str  # fwd | fwd+bwd
    provider: str
    ms: float | None
    tflops: float | None
    x_cudnn: float | None
    note: str = ""


def parse_shape(text: str):
    """'BxHxSxD[:causal]' -> (B, H, S, D, causal)."""
    dims, _, flag = text.partition(":")
    b, h, s, d = (int(x) for x in dims.split("x"))
    if flag not in ("", "causal"):
        raise argparse.ArgumentTypeError(f"shape flag {flag!r}: only ':causal' is allowed")
    return b, h, s, d, flag == "causal"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sinkfree bench attention", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dense-shapes", nargs="*", default=DENSE_SHAPES, metavar="BxHxSxD[:causal]",
                   help="dense shapes (bf16); default: the D=128 shapes of anchors.md plus one D=64")
    p.add_argument("--sparse-shape", default=SPARSE_SHAPE, metavar="BxHxSxD",
                   help="shape of the block-sparse comparison (non-causal, like VSA)")
    p.add_argument("--keep", type=float, default=0.125, help="fraction of key tiles kept per query tile")
    p.add_argument("--tiles", type=int, nargs="*", default=[64, 128], help="sparse tile sizes to compare")
    p.add_argument("--modes", nargs="*", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"],
                   help="what to time")
    p.add_argument("--sections", nargs="*", default=["dense", "sparse"], choices=["dense", "sparse"],
                   help="which comparisons to run")
    p.add_argument("--providers", nargs="*", default=None,
                   help="only these providers (names as printed), plus cudnn for the ratio")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up in ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time in ms")
    p.add_argument("--seed", type=int, default=0, help="seed of inputs and random tile lists")
    p.add_argument("--ceilings", action="store_true", help="also measure bf16 matmul rate and copy bandwidth")
    p.add_argument("--json", default=None, metavar="PATH", help="write all rows (and the card) as JSON here")
    return p


def _flops(b, h, sq, sk, d, causal, mode, kept=1.0):
    f = 4.0 * b * h * sq * sk * d * (0.5 if causal else 1.0) * kept
    return f * (3.5 if mode == "fwd+bwd" else 1.0)


def _timer(warmup, rep):
    from triton.testing import do_bench

    def run(fn, mode, grads):
        if mode == "fwd":
            with torch.no_grad():
                return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
        out = fn()
        dout = torch.randn_like(out)
        del out  # else its autograd graph (all saved activations of a model step) stays alive while timing

        def step():
            fn().backward(dout)

        return do_bench(step, warmup=warmup, rep=rep, grad_to_none=grads, return_mode="median")

    def graphed(fn):
        # Quantisation alone is a handful of short launches with nothing queued behind them: timed with plain
        # do_bench it measures Python launch overhead (0.41-0.47 ms whatever S on an H200). Replaying a CUDA
        # graph times the GPU work, which is what the fused op pays when the attention kernel follows.
        from triton.testing import do_bench_cudagraph

        with torch.no_grad():
            fn()  # compile / allocate outside the capture
            return do_bench_cudagraph(fn, rep=rep, return_mode="median")

    run.graphed = graphed
    return run


def _sdpa(backend):
    from torch.nn.attention import sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention

    def make(q, k, v, causal):
        def f():
            with sdpa_kernel([backend]):
                return scaled_dot_product_attention(q, k, v, is_causal=causal)
        return f

    return make


def _flex_fns():
    """A fresh compiled flex_attention (dynamo reset first: one compile per shape, no recompile limit) and the
    sink baseline built on it."""
    import gc

    from torch.nn.attention.flex_attention import flex_attention

    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()
    flex = torch.compile(flex_attention, dynamic=False)

    def flex_sink(q, k, v, sink, block_mask):
        # what users run today to train with sinks: compiled flex with return_lse, then out * sigmoid(lse - s)
        out, lse = flex(q, k, v, block_mask=block_mask, return_lse=True)
        return out * torch.sigmoid(lse - sink.view(1, -1, 1)).unsqueeze(-1).to(out.dtype)

    return flex, flex_sink


def _causal_block_mask(s, device):
    from torch.nn.attention.flex_attention import create_block_mask

    def causal(b, h, qi, kj):
        return qi >= kj

    return create_block_mask(causal, None, None, s, s, device=device)


def bench_dense(args, run, rows, providers):
    from torch.nn.attention import SDPBackend

    from sinkfree_kernels import flash_attention

    for text in args.dense_shapes:
        b, h, s, d, causal = parse_shape(text)
        flex, flex_sink = _flex_fns()
        g = torch.Generator(device="cuda").manual_seed(args.seed)
        q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
                   for _ in range(3))
        sink = torch.randn(h, device="cuda", generator=g).requires_grad_()
        bm = _causal_block_mask(s, "cuda") if causal else None
        cands = {
            "cudnn": _sdpa(SDPBackend.CUDNN_ATTENTION)(q, k, v, causal),
            "sdpa_flash": _sdpa(SDPBackend.FLASH_ATTENTION)(q, k, v, causal),
            "flex": lambda: flex(q, k, v, block_mask=bm),
            "flex+sink": lambda: flex_sink(q, k, v, sink, bm),
            "flash": lambda: flash_attention(q, k, v, None, causal)[0],
            "flash+sink": lambda: flash_attention(q, k, v, sink, causal)[0],
            "flash+sink atomic-dq": lambda: flash_attention(q, k, v, sink, causal, deterministic=False)[0],
        }
        cands.update(_sage8_cands(q, k, v, sink, causal))
        grads = [q, k, v, sink]
        _run_all(cands, providers, "dense", text, args.modes, run, grads, rows,
                 lambda mode: _flops(b, h, s, s, d, causal, mode))
        cands = q = k = v = sink = bm = None  # free this shape's tensors before the next one


def _flex_block_mask(idx, cnt, nk, tile, s):
    from torch.nn.attention.flex_attention import BlockMask

    from sinkfree_kernels import lists_from_map, map_from_lists

    full_idx, full_cnt = lists_from_map(map_from_lists(idx, cnt, nk))  # full width, as flex wants
    zero = torch.zeros_like(full_cnt)
    # every kept tile is a "full" block: flex skips mask_mod there, its fastest path
    return BlockMask.from_kv_blocks(zero, full_idx, full_cnt, full_idx, BLOCK_SIZE=tile, seq_lengths=(s, s))


def bench_sparse(args, run, rows, providers):
    from torch.nn.attention import SDPBackend

    from sinkfree_kernels import block_sparse_attention, map_from_lists, random_lists

    b, h, s, d, _ = parse_shape(args.sparse_shape)
    vsa = _load_vsa()
    g = torch.Generator(device="cuda").manual_seed(args.seed)
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
               for _ in range(3))
    sink = torch.randn(h, device="cuda", generator=g).requires_grad_()
    grads = [q, k, v, sink]
    dense = {"cudnn": _sdpa(SDPBackend.CUDNN_ATTENTION)(q, k, v, False)}
    _run_all(dense, None, "sparse", f"{args.sparse_shape} dense", args.modes, run, grads, rows,
             lambda mode: _flops(b, h, s, s, d, False, mode))
    cudnn_ms = {r.mode: r.ms for r in rows if r.section == "sparse" and r.provider == "cudnn"}
    for tile in args.tiles:
        idx, cnt = random_lists(b, h, s, s, tile, tile, args.keep,
                                generator=torch.Generator().manual_seed(args.seed), device="cuda")
        nk = -(-s // tile)
        kept = cnt.sum().item() / (b * h * cnt.shape[-1] * nk)
        flex, _ = _flex_fns()
        cands = {
            f"block_sparse{tile}": lambda: block_sparse_attention(q, k, v, idx, cnt, None, False,
                                                                  tile_q=tile, tile_k=tile)[0],
            f"block_sparse{tile}+sink": lambda: block_sparse_attention(q, k, v, idx, cnt, sink, False,
                                                                       tile_q=tile, tile_k=tile)[0],
            f"block_sparse{tile} atomic-dq": lambda: block_sparse_attention(
                q, k, v, idx, cnt, None, False, tile_q=tile, tile_k=tile, deterministic=False)[0],
        }
        cands.update(_sage8_cands(q, k, v, sink, False, idx, cnt, tile))
        try:
            bm = _flex_block_mask(idx, cnt, nk, tile, s)
            cands[f"flex_blockmask{tile}"] = lambda: flex(q, k, v, block_mask=bm)
        except Exception as e:  # noqa: BLE001  (a baseline that cannot be built is reported, not fatal)
            rows.append(Row("sparse", args.sparse_shape, "fwd", f"flex_blockmask{tile}", None, None, None,
                            f"failed: {type(e).__name__}: {e}"[:200]))
        if vsa is not None and tile == 64:
            tile_map = map_from_lists(idx, cnt, nk)
            vbs = torch.full((nk,), 64, device="cuda", dtype=torch.int32)
            cands["vsa_triton64"] = lambda: vsa(q, k, v, tile_map, vbs)[0]
        _run_all(cands, providers, "sparse", f"{args.sparse_shape} keep={kept:.3f} tile={tile}", args.modes,
                 run, grads, rows, lambda mode: _flops(b, h, s, s, d, False, mode, kept), cudnn_ms)


# providers timed in the fwd mode only (forward-only ops, or quantization alone)
FWD_ONLY = ("sage8-infer", "kernel-only", "quant-only")


def _sage8_cands(q, k, v, sink, causal, idx=None, cnt=None, tile=64):
    """sage8 / sage8-infer rows (whole op, kernel only, quantization only); dense when idx is None."""
    from sinkfree_kernels.sage8_ops import (sage8_attention, sage8_attention_quantized, sage8_backward_quantize,
                                            sage8_block_sparse_attention, sage8_quantize)

    sfx = "" if idx is None else f"_block_sparse{tile}"
    state = {}

    def op(s, infer, v_split=False):
        if idx is None:
            return sage8_attention(q, k, v, s, causal, infer=infer, v_split=v_split)[0]
        return sage8_block_sparse_attention(q, k, v, idx, cnt, s, causal, tile_q=tile, tile_k=tile,
                                            infer=infer, v_split=v_split)[0]

    def kernel_only():
        if "qz" not in state:  # quantized once, outside the timed region
            with torch.no_grad():
                state["qz"] = sage8_quantize(q, k, v)
        return sage8_attention_quantized(state["qz"], sink, causal, idx, cnt, tile, tile)[0]

    dout = torch.randn_like(q)
    return {
        f"sage8{sfx}": lambda: op(None, False),
        f"sage8{sfx}+sink": lambda: op(sink, False),
        f"sage8{sfx}+sink v_split": lambda: op(sink, False, True),
        f"sage8-infer{sfx}+sink": lambda: op(sink, True),
        f"sage8-infer{sfx}+sink kernel-only": kernel_only,
        f"sage8{sfx} quant-only": lambda: sage8_quantize(q, k, v),
        f"sage8{sfx} bwd-quant-only": lambda: sage8_backward_quantize(q, k, dout),
    }


def _load_vsa():
    try:
        from vsa.block_sparse_wrapper import block_sparse_attn_triton
    except Exception:  # noqa: BLE001  (not installed, or its CUDA extension does not load)
        return None
    return block_sparse_attn_triton


def _run_all(cands, providers, section, shape, modes, run, grads, rows, flops_of, cudnn_ms=None):
    for mode in modes:
        base = (cudnn_ms or {}).get(mode)
        for name, fn in cands.items():
            if providers is not None and name not in providers and name != "cudnn":
                continue
            if mode != "fwd" and any(tag in name for tag in FWD_ONLY):
                continue
            note = ""
            try:
                if "quant-only" in name and hasattr(run, "graphed"):
                    try:
                        ms, note = run.graphed(fn), "CUDA graph"
                    except Exception as e:  # noqa: BLE001  (capture failed: plain timing, launch-bound)
                        ms, note = run(fn, mode, grads), f"launch-bound (graph failed: {type(e).__name__})"
                else:
                    ms = run(fn, mode, grads)
            except Exception as e:  # noqa: BLE001  (a failing peer is a row, not the end of the run)
                rows.append(Row(section, shape, mode, name, None, None, None,
                                f"failed: {type(e).__name__}: {e}"[:200]))
                torch.cuda.empty_cache()
                continue
            if name == "cudnn":
                base = ms
            rows.append(Row(section, shape, mode, name, ms, flops_of(mode) / ms / 1e9,
                            base / ms if base else None, note))
            print(f"  {shape:40s} {mode:8s} {name:24s} {ms:9.3f} ms", file=sys.stderr, flush=True)


def measure_ceilings():
    """bf16 matmul rate (TFLOP/s) and device copy bandwidth (TB/s, read + write) of this GPU."""
    from triton.testing import do_bench

    from sinkfree.bench.lm import matmul_peak_tflops

    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=50, rep=200, return_mode="median")
    return {"bf16_matmul_tflops": matmul_peak_tflops(), "copy_tb_s": 2 * x.numel() / (ms * 1e-3) / 1e12}


def format_table(rows, card):
    lines = [f"card: {card}", f"{'section':7s} {'shape':44s} {'mode':8s} {'provider':24s} {'ms':>9s} "
             f"{'TFLOP/s':>8s} {'x cuDNN':>8s}"]
    for r in rows:
        ms = f"{r.ms:9.3f}" if r.ms is not None else "        -"
        tf = f"{r.tflops:8.1f}" if r.tflops is not None else "       -"
        xc = f"{r.x_cudnn:8.2f}" if r.x_cudnn is not None else "       -"
        lines.append(f"{r.section:7s} {r.shape:44s} {r.mode:8s} {r.provider:24s} {ms} {tf} {xc} {r.note}")
    return "\n".join(lines)


def summary(rows):
    """The done-when ratios of issue 3, from the rows of this run."""
    t = {(r.shape, r.mode, r.provider): r.ms for r in rows if r.ms is not None}
    out = []
    for (shape, mode, prov), ms in t.items():
        pairs = {"flash+sink": ["flex+sink", "cudnn"], "sage8+sink": ["cudnn", "flash+sink"],
                 "sage8-infer+sink": ["cudnn", "flash+sink"], "sage8-infer+sink kernel-only": ["cudnn"],
                 "sage8_block_sparse64+sink": ["block_sparse64+sink"],
                 "sage8_block_sparse128+sink": ["block_sparse128+sink"],
                 "sage8-infer_block_sparse64+sink": ["block_sparse64+sink"],
                 "sage8-infer_block_sparse128+sink": ["block_sparse128+sink"], "flash+sink atomic-dq": ["flex+sink", "cudnn"],
                 "block_sparse64": ["vsa_triton64"], "block_sparse64 atomic-dq": ["vsa_triton64"],
                 "block_sparse128": ["flex_blockmask128"], "block_sparse128 atomic-dq": ["flex_blockmask128"]}
        for other in pairs.get(prov, []):
            if (shape, mode, other) in t:
                out.append(f"{shape} {mode}: {prov} is {t[(shape, mode, other)] / ms:.2f}x {other}")
    return out


def bench_main(argv=None) -> int:
    """Entry point of `sinkfree bench attention`."""
    args = build_parser().parse_args(argv)
    if not torch.cuda.is_available():
        print("sinkfree bench attention needs a CUDA GPU", file=sys.stderr)
        return 2
    card = torch.cuda.get_device_name()
    print(f"card: {card}; torch {torch.__version__}", file=sys.stderr)
    run = _timer(args.warmup, args.rep)
    rows: list[Row] = []
    providers = set(args.providers) if args.providers else None
    if "dense" in args.sections:
        bench_dense(args, run, rows, providers)
    if "sparse" in args.sections:
        bench_sparse(args, run, rows, providers)
    result = {"card": card, "torch": torch.__version__, "rows": [asdict(r) for r in rows]}
    if args.ceilings:
        result["ceilings"] = measure_ceilings()
    print(format_table(rows, card))
    for line in summary(rows):
        print(line)
    if args.ceilings:
        print("ceilings:", {k: round(v, 2) for k, v in result["ceilings"].items()})
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0 if all(math.isfinite(r.ms) for r in rows if r.ms is not None) else 1


if __name__ == "__main__":
    sys.exit(bench_main())
