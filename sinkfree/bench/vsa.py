"""`sinkfree bench vsa`: video sparse attention vs dense cuDNN SDPA on one GPU, side by side in one process.

Attention rows (B, H, grid, D): dense cuDNN fwd+bwd; full VSA (coarse + selection + fine + combine) fwd+bwd;
its fine stage alone (block-sparse kernel on the same tile lists) fwd+bwd; coarse + selection alone (fwd).
Model rows (`--model dit-video-b`): one training step (fwd + bwd) of the DiT with dense cuDNN attention and
with VSA at the same sparsity, bf16 autocast. Times are medians of triton.testing.do_bench, in ms.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch

from sinkfree.bench import profiling


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sinkfree bench vsa", description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1, help="batch size B")
    p.add_argument("--heads", type=int, default=24, help="attention heads H (attention rows)")
    p.add_argument("--grid", default="32,32,32", help="token grid T,H,W (32,32,32 = 32768 tokens)")
    p.add_argument("--head-dim", type=int, default=128, help="head dim D (64 or 128)")
    p.add_argument("--sparsity", type=float, default=0.875, help="fraction of key tiles skipped")
    p.add_argument("--tile", default="4,4,4", help="VSA tile t,h,w")
    p.add_argument("--model", default=None,
                   help="also time a training step (forward, backward, AdamW) of this DiT preset, e.g. dit-video-b")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile both models of the --model training step (dense and VSA)")
    p.add_argument("--proj", choices=("fused", "separate", "both"), default=None,
                   help="with --model, the input projections of both models of the training step: separate "
                        "(the default: a GEMM each, as DiTConfig), fused (one GEMM for q/k/v/gates and one for the MLP's gate/up), or "
                        "both (four model rows; each arm's ratio is taken against the faster dense row)")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up in ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time in ms")
    p.add_argument("--profile-steps", type=int, default=0, metavar="N",
                   help="with --model: after timing, run N more training steps of each arm under torch.profiler and "
                        "print its top GPU kernels in ms per step (all of them in the JSON, top 80)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    return p


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(n) for n in text.split(","))


def bench_attention(args, run) -> list[dict]:
    from torch.nn.attention import SDPBackend

    from sinkfree.attention.block_sparse import block_sparse_attend
    from sinkfree.attention.spec import AttentionSpec
    from sinkfree.attention.vsa import pad_tiles, vsa_attention, vsa_coarse, vsa_select, vsa_tiling, vsa_topk
    from sinkfree.bench.attention import _sdpa

    grid, b, h, d = _ints(args.grid), args.batch, args.heads, args.head_dim
    s = math.prod(grid)
    tl = vsa_tiling(grid, _ints(args.tile), "cuda")
    topk = vsa_topk(tl.n_tiles, args.sparsity)
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    gate = torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    scale = 1 / math.sqrt(d)
    with torch.no_grad():
        qp, kp, vp = pad_tiles(q, tl), pad_tiles(k, tl), pad_tiles(v, tl)
        idx, cnt = vsa_select(vsa_coarse(qp, kp, vp, tl, scale)[0], topk)
    spec = AttentionSpec("block_sparse", causal=False, scale=scale, tile_size=tl.volume)
    grads = [q, k, v, gate]
    dense = _sdpa(SDPBackend.CUDNN_ATTENTION)(q, k, v, False)
    cands = {
        "dense cuDNN": (dense, "fwd+bwd", 1.0),
        "VSA full": (lambda: vsa_attention(q, k, v, tl, topk, gate), "fwd+bwd", topk / tl.n_tiles),
        "VSA fine only": (lambda: block_sparse_attend(q, k, v, idx, cnt, spec, None, tl.tile_len), "fwd+bwd",
                          topk / tl.n_tiles),
        "VSA coarse+select (fwd+bwd)": (lambda: vsa_coarse(pad_tiles(q, tl), pad_tiles(k, tl), pad_tiles(v, tl),
                                                           tl, scale)[1], "fwd+bwd", None),
        "VSA coarse+select (fwd)": (lambda: vsa_select(vsa_coarse(pad_tiles(q, tl), pad_tiles(k, tl),
                                                                  pad_tiles(v, tl), tl, scale)[0], topk)[0],
                                    "fwd", None),
    }
    rows = []
    for name, (fn, mode, kept) in cands.items():
        ms = run(fn, mode, grads)
        tflops = None if kept is None else 4.0 * b * h * s * s * d * kept * 3.5 / ms / 1e9
        rows.append(dict(section="attention", name=name, mode=mode, ms=ms, eff_tflops=tflops, B=b, H=h, S=s, D=d,
                         grid=list(grid), kept_tiles=topk, n_tiles=tl.n_tiles))
        print(f"attention {name:28s} {mode:10s} {ms:9.3f} ms", flush=True)  # the table follows at the end
    return rows


def attention_context(device: str):
    """A factory of the dense arm's attention context: cuDNN SDPA on CUDA, nothing elsewhere. A factory, not one
    context: sdpa_kernel's context manager is single-use and the timed step enters it many times."""
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel

    if device == "cuda":
        return lambda: sdpa_kernel([SDPBackend.CUDNN_ATTENTION])
    return nullcontext


def bench_model(args, run, device: str = "cuda") -> list[dict]:
    """A training step (forward, backward, fused AdamW step) of the `args.model` DiT preset with dense cuDNN
    attention and with VSA, on the same input; `args.compile` compiles both models."""
    from triton.testing import do_bench

    from sinkfree.models.dit import DiT, DiTConfig

    grid = _ints(args.grid)
    rows = []
    layouts = {"fused": (True,), "separate": (False,), "both": (False, True)}[args.proj or "separate"]
    for backend, fused in ((b, f) for b in ("sdpa", "vsa") for f in layouts):
        cfg = DiTConfig.from_name(args.model, attn_backend=backend, vsa_sparsity=args.sparsity,
                                  vsa_tile=_ints(args.tile), fused_proj=fused)
        # Pure bf16 weights and inputs (no fp32 master copy, no autocast), the same in both arms: the
        # 1B-parameter dit-video-b at 32768 tokens then fits one H200 with room to spare.
        model = DiT(cfg).to(device=device, dtype=torch.bfloat16)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device == "cuda")
        fwd = torch.compile(model) if args.compile else model
        pt, ph, pw = cfg.patch_size
        x = torch.randn(args.batch, cfg.in_channels, grid[0] * pt, grid[1] * ph, grid[2] * pw, device=device,
                        dtype=torch.bfloat16)
        t = torch.rand(args.batch, device=device, dtype=torch.bfloat16)
        attn_ctx = attention_context(device)

        def train_step(fwd=fwd, opt=opt, attn_ctx=attn_ctx):
            with attn_ctx():
                loss = fwd(x, t).float().square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        train_step()  # compile (when asked) and allocate the optimizer state outside the timing
        ms = do_bench(train_step, warmup=args.warmup, rep=args.rep, return_mode="median")
        name = f"{args.model} {backend}" + (" compiled" if args.compile else "") + (" fused" if cfg.fused_proj else "")
        rows.append(dict(section="model", name=name, mode="train step", ms=ms, S=math.prod(grid),
                         params=model.num_params(), compiled=bool(args.compile), fused_proj=fused))
        if args.profile_steps:
            rows[-1]["profile"] = profiling.profile_calls(train_step, args.profile_steps)
        print(f"model     {name:28s} train step {ms:9.3f} ms", flush=True)
        model = fwd = opt = train_step = None
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def dense_baselines(rows: list[dict]) -> dict[str, float]:
    """Each section's dense time: cuDNN attention, and the faster dense model row (with --proj both a VSA row is
    measured against the best dense layout, not one slowed by its projection layout)."""
    base: dict[str, float] = {}
    for r in rows:
        if r["name"] == "dense cuDNN" or " sdpa" in r["name"]:
            base[r["section"]] = min(base.get(r["section"], float("inf")), r["ms"])
    return base


def vsa_main(argv: list[str]) -> int:
    """Entry point of `sinkfree bench vsa`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.profile_steps < 0 or (args.profile_steps and not args.model):
        parser.error(f"--profile-steps {args.profile_steps}: must be >= 0, and > 0 only with --model "
                     "(it profiles the training steps)")
    if args.proj is not None and not args.model:
        parser.error(f"--proj {args.proj}: only with --model (it picks the training step's projection layout)")
    if not torch.cuda.is_available():
        print("sinkfree bench vsa: error: needs a CUDA GPU (benchmarks are measured on H100/H200)", file=sys.stderr)
        return 2
    from sinkfree.bench.attention import _timer

    run = _timer(args.warmup, args.rep)
    rows = bench_attention(args, run)
    if args.model:
        rows += bench_model(args, run)
    base = dense_baselines(rows)
    fine = next(r["ms"] for r in rows if r["name"] == "VSA fine only")
    print(f"card: {torch.cuda.get_device_name()}" + ("; model rows against the faster dense row" if args.proj == "both"
                                                      else ""))
    for r in rows:
        ratio = base.get(r["section"], float("nan")) / r["ms"]
        extra = f"  coarse+select / fine = {r['ms'] / fine:.1%}" if r["name"].startswith("VSA coarse") else ""
        tf = f"{r['eff_tflops']:7.1f} eff TFLOP/s" if r.get("eff_tflops") else " " * 21
        print(f"{r['section']:9s} {r['name']:28s} {r['mode']:10s} {r['ms']:9.3f} ms {tf}  x dense {ratio:5.2f}{extra}")
    for r in rows:
        if "profile" in r:
            print(f"\nGPU kernels of {r['name']} (ms per training step, profiled over {args.profile_steps} steps):")
            print("\n".join(profiling.format_kernels(r["profile"])))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(card=torch.cuda.get_device_name(), rows=rows), f, indent=1)
    return 0
