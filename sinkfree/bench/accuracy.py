"""`sinkfree bench accuracy`: how close each attention kernel is to an fp64 reference (issue 7's accuracy
targets), with bf16 cuDNN's own error beside it as the floor. Runs on one GPU (or on CPU under
TRITON_INTERPRET=1 with tiny --shapes, for testing).

For each shape and case it draws q, k, v ~ N(0, 1) (seeded, the same base tensors for every case of a shape)
and a fixed random dO, casts them to --dtype (bf16 on GPU; fp16 on CPU, where the interpreter gets bf16
wrong), computes the reference on those same rounded values (fp64 math by default, chunked over heads and
query blocks so S = 16384 fits; causal chunks read only the visible keys) and compares each provider's
out and gradients of q, k, v (and of the sink logits with --sink) for the loss sum(out * dO).

Cases (--cases):
  normal      q, k, v ~ N(0, 1)
  k-offset    K channel offset: --k-offset sigma added to --k-offset-channels random channels of K (what K
              smoothing is for; without a sink the softmax is unchanged, the INT8 range is not)
  large-q     q x --q-scale (peaked softmax); the logit range it gives is printed per shape
  logits-1e4  q and k scaled by one factor so that max |logit| = --max-logit (both signs occur): forward
              only; the checks are finiteness (the issue's "no NaN/Inf") and a sanity cosine >= 0.95
              (INT8 Q, K err ~15 rms per logit at this scale against a median top-2 gap of ~350, so some
              near-tied rows pick another key: fake-quant cosine ~0.98-0.99 at S 2048; bf16 stays ~1)

Providers (--providers):
  cudnn-bf16     SDPA with the cuDNN backend on the same inputs: the floor (no sink: with --sink its rows are
                 compared with the reference computed without the sink, marked "nosink" in the ref column)
  flash-bf16     our Triton flash_attention
  sage8          sage8_attention (INT8 QK, FP8 PV, 8-bit backward)
  sage8 v_split  sage8_attention(..., v_split=True) (V as two FP8 terms)
  sage8-infer    sage8_attention(..., infer=True): forward only
  sage8 no-smooth  sage8_attention(..., smooth_k=False): not in the default set; run it with the k-offset
                 case to see the failure that K smoothing prevents
(quote names with a space: --providers flash-bf16 'sage8 v_split')

Checks (issue 7's done-when, thresholds of reference/lowbit_attention.md section 6.2), PASS when all hold for a
row: every measured tensor finite; normal case: out cosine >= 0.9995 and relative L1 (sum|a - r| / sum|r|)
<= 0.03; outlier cases (k-offset, large-q): out cosine >= 0.999 (relative L1 reported); every case with a
backward: cosine of dV >= 0.999, of dQ and dK >= 0.995. The
sink gradient (its relative L1 in the table: a cosine over H numbers says little) and the LSE are reported
without a threshold. Metrics are computed in fp64: cosine,
relative L1, max abs error, finite. The table shows one row per (shape, case, provider); "L1/floor" is the
out relative L1 over cudnn-bf16's. Exit status: 0, or 1 when a provider raised (and with --strict when any
non-floor row FAILs), 2 on bad usage.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import zlib
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch

from sinkfree.bench.attention import parse_shape

SHAPES = [f"1x4x{s}x{d}{c}" for s in (4096, 16384) for d in (64, 128) for c in ("", ":causal")]
CASES = ("normal", "k-offset", "large-q", "logits-1e4")
FORWARD_ONLY_CASES = ("logits-1e4",)
PROVIDERS = ("cudnn-bf16", "flash-bf16", "sage8", "sage8 v_split", "sage8-infer")
EXTRA_PROVIDERS = ("sage8 no-smooth",)  # selectable, not run by default
FLOOR = "cudnn-bf16"

OUT_COS, OUT_REL_L1 = 0.9995, 0.03
OUTLIER_CASES, OUTLIER_OUT_COS = ("k-offset", "large-q"), 0.999
GRAD_COS = {"dq": 0.995, "dk": 0.995, "dv": 0.999}
HUGE_LOGIT_COS = 0.95  # sanity only (the issue asks finiteness at |logits| ~1e4)
GRADS = ("dq", "dk", "dv", "dsink")


@dataclass(frozen=True)
class Provider:
    """An attention implementation under test: fn(q, k, v, sink or None, causal) -> out or (out, lse)."""

    fn: Callable
    backward: bool = True  # False: forward only (no gradients measured)
    sink: bool = True  # False: takes no sink; compared with the reference without the sink
    floor: bool = False  # the reference error level (not a candidate)


@dataclass
class CaseOptions:
    k_offset: float = 8.0
    k_offset_channels: int = 4
    q_scale: float = 10.0
    max_logit: float = 1e4


@dataclass
class Result:
    """One (shape, case, provider) comparison."""

    shape: str
    case: str
    provider: str
    ref: str  # "fp64", "fp64 nosink", ...
    metrics: dict = field(default_factory=dict)  # tensor -> {cos, rel_l1, max_abs, finite, ref_abs_mean}
    checks: dict = field(default_factory=dict)  # check label -> bool
    passed: Optional[bool] = None
    floor: bool = False
    note: str = ""


# ---- providers ---------------------------------------------------------------------------------------------

def _cudnn(q, k, v, sink, causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention

    if q.device.type != "cuda":
        raise RuntimeError("needs CUDA (cuDNN)")
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        return scaled_dot_product_attention(q, k, v, is_causal=causal)


def default_providers(names=PROVIDERS) -> dict[str, Provider]:
    """The named providers (see the module docstring); kernels are imported on first call."""
    def flash(q, k, v, s, causal):
        from sinkfree_kernels import flash_attention

        return flash_attention(q, k, v, s, causal)

    def sage8(**kw):
        def f(q, k, v, s, causal):
            from sinkfree_kernels.sage8_ops import sage8_attention

            return sage8_attention(q, k, v, s, causal, **kw)
        return f

    table = {
        "cudnn-bf16": Provider(_cudnn, sink=False, floor=True),
        "flash-bf16": Provider(flash),
        "sage8": Provider(sage8()),
        "sage8 v_split": Provider(sage8(v_split=True)),
        "sage8-infer": Provider(sage8(infer=True), backward=False),
        "sage8 no-smooth": Provider(sage8(smooth_k=False)),
    }
    return {n: table[n] for n in names}


# ---- reference ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _full_fp32_matmul():
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # no TF32 in the fp32 reference
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def _chunk_rows(sq, sk, chunk):
    return max(1, min(sq, chunk // max(sk, 1)))


def _visible(i0, i1, nk, off, device):
    i = torch.arange(i0, i1, device=device)[:, None]
    return torch.arange(nk, device=device)[None, :] <= i + off


@torch.no_grad()
def max_abs_logit(q, k, causal, scale, chunk=2**24):
    """max |scale * q . k| over the visible (b, h, i, j), in fp32, chunked like the reference."""
    b, h, sq, _ = q.shape
    sk, off = k.shape[2], k.shape[2] - q.shape[2]
    rows, best = _chunk_rows(sq, sk, chunk), 0.0
    with _full_fp32_matmul():
        for bi in range(b):
            for hi in range(h):
                for i0 in range(0, sq, rows):
                    i1 = min(sq, i0 + rows)
                    nk = max(0, min(sk, i1 + off)) if causal else sk
                    if nk == 0:
                        continue
                    z = (q[bi, hi, i0:i1].float() @ k[bi, hi, :nk].float().T).abs() * scale
                    if causal:
                        z = z.masked_fill(~_visible(i0, i1, nk, off, q.device), 0.0)
                    best = max(best, z.max().item())
    return best


@torch.no_grad()
def reference(q, k, v, sink=None, causal=False, scale=None, dout=None, dtype=torch.float64, chunk=2**24):
    """Attention (B, H, Sq, D) with q, k, v of equal head counts and an optional per-head sink logit, in
    `dtype` math, one (batch, head, query chunk) at a time (chunk = max elements of a score block). Returns a
    dict: out, lse and, with dout, dq, dk, dv, dsink (gradients of sum(out * dout)), plus the range of the
    visible logits (logit_min, logit_max)."""
    b, h, sq, d = q.shape
    sk = k.shape[2]
    off = sk - sq  # bottom-right causal: row i sees keys j <= i + off
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    dev = q.device
    res = {"out": torch.zeros(b, h, sq, d, dtype=dtype, device=dev),
           "lse": torch.full((b, h, sq), float("-inf"), dtype=dtype, device=dev)}
    grads = dout is not None
    if grads:
        res.update(dq=torch.zeros(b, h, sq, d, dtype=dtype, device=dev),
                   dk=torch.zeros(b, h, sk, d, dtype=dtype, device=dev),
                   dv=torch.zeros(b, h, sk, d, dtype=dtype, device=dev),
                   dsink=torch.zeros(h, dtype=dtype, device=dev) if sink is not None else None)
    zmin, zmax = math.inf, -math.inf
    rows = _chunk_rows(sq, sk, chunk)
    with _full_fp32_matmul():
        for bi in range(b):
            for hi in range(h):
                kf, vf = k[bi, hi].to(dtype), v[bi, hi].to(dtype)
                s_h = sink[hi].to(dtype) if sink is not None else None
                for i0 in range(0, sq, rows):
                    i1 = min(sq, i0 + rows)
                    nk = max(0, min(sk, i1 + off)) if causal else sk
                    qc = q[bi, hi, i0:i1].to(dtype)
                    z = (qc @ kf[:nk].T) * scale
                    if causal:
                        vis = _visible(i0, i1, nk, off, dev)
                        if vis.any():
                            zmin = min(zmin, z.masked_fill(~vis, math.inf).min().item())
                            zmax = max(zmax, z.masked_fill(~vis, -math.inf).max().item())
                        z = z.masked_fill(~vis, -math.inf)
                    elif z.numel():
                        zmin, zmax = min(zmin, z.min().item()), max(zmax, z.max().item())
                    m = z.amax(-1) if nk else torch.full((i1 - i0,), -math.inf, dtype=dtype, device=dev)
                    if s_h is not None:
                        m = torch.maximum(m, s_h)
                    m = torch.where(torch.isinf(m), 0.0, m)  # rows with neither a key nor a sink
                    p = torch.exp(z - m[:, None])
                    l_ = p.sum(-1) + (torch.exp(s_h - m) if s_h is not None else 0.0)
                    pn = p * torch.where(l_ > 0, 1.0 / l_, 0.0)[:, None]
                    o = pn @ vf[:nk]
                    lse = torch.where(l_ > 0, m + torch.log(l_), -math.inf)
                    res["out"][bi, hi, i0:i1] = o
                    res["lse"][bi, hi, i0:i1] = lse
                    if not grads:
                        continue
                    do = dout[bi, hi, i0:i1].to(dtype)
                    delta = (do * o).sum(-1)
                    ds = pn * (do @ vf[:nk].T - delta[:, None])
                    res["dq"][bi, hi, i0:i1] = (ds @ kf[:nk]) * scale
                    res["dk"][bi, hi, :nk] += (ds.T @ qc) * scale
                    res["dv"][bi, hi, :nk] += pn.T @ do
                    if s_h is not None:
                        psink = torch.where(torch.isfinite(lse), torch.exp(s_h - lse), 0.0)
                        res["dsink"][hi] -= (psink * delta).sum()
    res["logit_min"], res["logit_max"] = zmin, zmax
    return res


# ---- metrics -----------------------------------------------------------------------------------------------

def metrics(a, r) -> dict:
    """cos, relative L1 (sum|a - r| / sum|r|), max abs error, finite (all of a), mean |r|; in fp64."""
    a, r = a.detach().double().flatten(), r.detach().double().flatten().to(a.device)
    fin_r = torch.isfinite(r)
    # where the reference itself is infinite (LSE of a row with no key) the value must match it exactly
    finite = bool(torch.isfinite(a[fin_r]).all()) and bool(torch.equal(a[~fin_r], r[~fin_r]))
    a, r = a[fin_r], r[fin_r]
    diff = a - r
    na, nr = a.norm().item(), r.norm().item()
    cos = (a @ r).item() / (na * nr) if na > 0 and nr > 0 else (1.0 if na == nr == 0 else 0.0)
    l1 = r.abs().sum().item()
    rel_l1 = diff.abs().sum().item() / l1 if l1 > 0 else diff.abs().sum().item()
    return {"cos": cos, "rel_l1": rel_l1, "max_abs": diff.abs().max().item() if diff.numel() else 0.0,
            "finite": finite, "ref_abs_mean": r.abs().mean().item() if r.numel() else 0.0}


def checks(case: str, m: dict) -> dict:
    """Check label -> bool for a result's metrics (the thresholds of the module docstring)."""
    c = {f"{name} finite": mm["finite"] for name, mm in m.items()}
    if case in FORWARD_ONLY_CASES:
        c[f"out cos>={HUGE_LOGIT_COS} (sanity)"] = m["out"]["cos"] >= HUGE_LOGIT_COS
        return c
    if case in OUTLIER_CASES:
        c[f"out cos>={OUTLIER_OUT_COS}"] = m["out"]["cos"] >= OUTLIER_OUT_COS
    else:
        c[f"out cos>={OUT_COS}"] = m["out"]["cos"] >= OUT_COS
        c[f"out relL1<={OUT_REL_L1}"] = m["out"]["rel_l1"] <= OUT_REL_L1
    for g, thr in GRAD_COS.items():
        if g in m:
            c[f"{g} cos>={thr}"] = m[g]["cos"] >= thr
    return c


# ---- cases and the core loop -------------------------------------------------------------------------------

def _seed(*key) -> int:
    return zlib.crc32(repr(key).encode())


def make_case(name, q, k, v, causal, scale, opts: CaseOptions, seed=0, chunk=2**24):
    """fp32 inputs of one case from the base N(0, 1) q, k, v: (q, k, v, description)."""
    if name == "normal":
        return q, k, v, "q, k, v ~ N(0, 1)"
    if name == "k-offset":
        g = torch.Generator().manual_seed(_seed(seed, "k-offset"))
        ch = torch.randperm(k.shape[-1], generator=g)[: opts.k_offset_channels].sort().values.tolist()
        k = k.clone()
        k[..., ch] += opts.k_offset
        return q, k, v, f"K channels {ch} + {opts.k_offset:g} sigma"
    if name == "large-q":
        return q * opts.q_scale, k, v, f"q x {opts.q_scale:g}"
    if name == "logits-1e4":
        top = max_abs_logit(q, k, causal, scale, chunk)
        c = math.sqrt(opts.max_logit / top) if top > 0 else 1.0
        return q * c, k * c, v, f"q, k x {c:.2f} (max |logit| {opts.max_logit:g})"
    raise ValueError(f"unknown case {name!r}; allowed: {', '.join(CASES)}")


def _run(prov: Provider, q, k, v, sink, causal, dout, backward):
    ins = [t.detach().requires_grad_(backward) for t in (q, k, v)]
    s = sink.detach().clone().requires_grad_(backward) if (sink is not None and prov.sink) else None
    with torch.enable_grad() if backward else torch.no_grad():
        res = prov.fn(*ins, s, causal)
        out, lse = res if isinstance(res, tuple) else (res, None)
        tensors = {"out": out.detach()}
        if lse is not None:
            tensors["lse"] = lse.detach()
        if backward:
            wrt = ins + ([s] if s is not None else [])
            tensors.update(zip(GRADS, torch.autograd.grad(out, wrt, dout.to(out.dtype))))
    return tensors


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def evaluate(shape, cases=CASES, providers: Optional[dict] = None, *, sink=False, dtype=None, device=None,
             seed=0, ref_dtype=torch.float64, chunk=2**24, opts: Optional[CaseOptions] = None, log=None):
    """One shape ('BxHxSxD[:causal]'): every case against every provider. Returns (case infos, results)."""
    b, h, s, d, causal = parse_shape(shape) if isinstance(shape, str) else shape
    text = shape if isinstance(shape, str) else f"{b}x{h}x{s}x{d}" + (":causal" if causal else "")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float16)
    providers = default_providers() if providers is None else providers
    opts = opts or CaseOptions()
    scale = 1.0 / math.sqrt(d)
    g = torch.Generator().manual_seed(_seed(seed, b, h, s, d))
    base = [torch.randn(b, h, s, d, generator=g).to(device) for _ in range(3)]
    dout = torch.randn(b, h, s, d, generator=g).to(device=device, dtype=dtype)
    sink_t = torch.randn(h, generator=g).to(device) if sink else None
    infos, results = [], []
    for case in cases:
        fwd_only = case in FORWARD_ONLY_CASES
        q, k, v, desc = make_case(case, *base, causal, scale, opts, seed, chunk)
        q, k, v = (t.to(dtype) for t in (q, k, v))
        refs = {}

        def ref_for(with_sink):
            key = "fp64" if ref_dtype == torch.float64 else "fp32"
            key += "" if with_sink or sink_t is None else " nosink"
            if key not in refs:
                refs[key] = reference(q, k, v, sink_t if with_sink else None, causal, scale,
                                      None if fwd_only else dout, ref_dtype, chunk)
            return key, refs[key]

        key, main_ref = ref_for(True)
        info = {"shape": text, "case": case, "desc": desc, "logit_min": main_ref["logit_min"],
                "logit_max": main_ref["logit_max"],
                "logit_absmax": max(abs(main_ref["logit_min"]), abs(main_ref["logit_max"])),
                "dtype": str(dtype).replace("torch.", "")}
        infos.append(info)
        if log:
            log(f"{text} {case}: {desc}; logits in [{info['logit_min']:.4g}, {info['logit_max']:.4g}]")
        for name, prov in providers.items():
            key, ref = ref_for(prov.sink)
            res = Result(text, case, name, key, floor=prov.floor)
            try:
                got = _run(prov, q, k, v, sink_t, causal, dout, prov.backward and not fwd_only)
            except Exception as e:  # noqa: BLE001  (a provider that cannot run is a row, not the end)
                res.note = f"failed: {type(e).__name__}: {e}"[:200]
                res.passed = False
                results.append(res)
                _sync(device)
                continue
            for t, val in got.items():
                if val is not None and ref.get(t) is not None and val.numel():
                    res.metrics[t] = metrics(val, ref[t])
            res.checks = checks(case, res.metrics)
            res.passed = all(res.checks.values())
            results.append(res)
            got = None
            _sync(device)
            if log:
                log(f"  {name:14s} {'PASS' if res.passed else 'FAIL'}")
        refs = q = k = v = None
        _sync(device)
    return infos, results


# ---- report ------------------------------------------------------------------------------------------------

def _f(x, fmt):
    width = int("".join(ch for ch in fmt.split(".")[0] if ch.isdigit()) or 0)
    return format(x, fmt) if x is not None else "-".rjust(width)


def format_table(infos, results, card, with_sink=False) -> str:
    floor_l1 = {(r.shape, r.case): r.metrics["out"]["rel_l1"] for r in results if r.floor and "out" in r.metrics}
    cols = ["dq", "dk", "dv"]
    head = (f"{'shape':22s} {'case':10s} {'provider':14s} {'ref':11s} {'out cos':>9s} {'out L1':>7s} "
            f"{'L1/floor':>8s} {'out max':>9s} " + " ".join(f"{c + ' cos':>9s}" for c in cols)
            + (f" {'dsink L1':>8s}" if with_sink else "") + f" {'finite':6s} verdict")
    lines = [f"card: {card}", head]
    desc = {(i["shape"], i["case"]): i for i in infos}
    last = None
    for r in results:
        if (r.shape, r.case) != last:
            last = (r.shape, r.case)
            i = desc.get(last)
            if i:
                lines.append(f"# {r.shape} {r.case}: {i['desc']}; logits [{i['logit_min']:.4g}, "
                             f"{i['logit_max']:.4g}]")
        m = r.metrics
        out = m.get("out", {})
        fl = floor_l1.get((r.shape, r.case))
        ratio = out["rel_l1"] / fl if out and fl else None
        fin = all(x["finite"] for x in m.values()) if m else None
        verdict = ("PASS" if r.passed else "FAIL") + (" (floor)" if r.floor else "")
        failed = [c for c, ok in r.checks.items() if not ok]
        note = r.note or ("; ".join(failed) if failed else "")
        lines.append(
            f"{r.shape:22s} {r.case:10s} {r.provider:14s} {r.ref:11s} {_f(out.get('cos'), '9.6f')} "
            f"{_f(out.get('rel_l1'), '7.4f')} {_f(ratio, '8.2f')} {_f(out.get('max_abs'), '9.3g')} "
            + " ".join(_f(m[c]['cos'], '9.6f') if c in m else f"{'-':>9s}" for c in cols)
            + ((f" {m['dsink']['rel_l1']:8.4f}" if "dsink" in m else f" {'-':>8s}") if with_sink else "")
            + f" {('yes' if fin else 'NO') if fin is not None else '-':6s} {verdict} {note}".rstrip())
    return "\n".join(lines)


def summary(results) -> list[str]:
    """Per provider: rows passed and the worst value of each thresholded metric over the suite."""
    out = []
    for name in dict.fromkeys(r.provider for r in results):
        rs = [r for r in results if r.provider == name]
        ok = sum(bool(r.passed) for r in rs)
        worst = []
        for t, key, fn in (("out", "cos", min), ("out", "rel_l1", max), ("dq", "cos", min), ("dk", "cos", min),
                           ("dv", "cos", min)):
            vals = [r.metrics[t][key] for r in rs if t in r.metrics and r.case not in FORWARD_ONLY_CASES]
            if vals:
                worst.append(f"{t} {key} {fn(vals):.6g}")
        out.append(f"{name}: {ok}/{len(rs)} PASS; worst (non-forward-only cases): " + (", ".join(worst) or "-"))
    return out


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


# ---- CLI ---------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sinkfree bench accuracy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="*", default=SHAPES, metavar="BxHxSxD[:causal]",
                   help="shapes (H query heads = kv heads); default: B1, H4, S 4096 and 16384, D 64 and 128, "
                        "causal and not")
    p.add_argument("--cases", nargs="*", default=list(CASES), choices=CASES,
                   help="input cases (see above); default: all")
    p.add_argument("--providers", nargs="*", default=list(PROVIDERS), choices=PROVIDERS + EXTRA_PROVIDERS,
                   help="implementations to compare (see above); default: all")
    p.add_argument("--sink", action="store_true",
                   help="add a learnable-style sink logit per head (N(0, 1)) to every provider that takes one "
                        "and measure its gradient; cudnn-bf16 is then compared without it")
    p.add_argument("--dtype", choices=["bfloat16", "float16"], default=None,
                   help="input dtype of the providers (default: bfloat16 on GPU, float16 on CPU)")
    p.add_argument("--ref-dtype", choices=["float64", "float32"], default="float64",
                   help="math of the reference (default float64: cheap at these sizes, fp64 tensor cores)")
    p.add_argument("--chunk", type=int, default=2**24,
                   help="max elements of one reference score block (query rows x keys); lower it if the "
                        "reference runs out of memory")
    p.add_argument("--k-offset", type=float, default=8.0, help="k-offset case: offset in sigmas (K is N(0, 1))")
    p.add_argument("--k-offset-channels", type=int, default=4, help="k-offset case: how many K channels")
    p.add_argument("--q-scale", type=float, default=10.0, help="large-q case: factor on q")
    p.add_argument("--max-logit", type=float, default=1e4, help="logits-1e4 case: target max |logit|")
    p.add_argument("--seed", type=int, default=0, help="seed of inputs, dO, sinks and offset channels")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="write card, settings, case infos and every metric and check to this JSON file")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 when any non-floor row FAILs (default: only when a provider raised)")
    return p


def accuracy_main(argv=None) -> int:
    """Entry point of `sinkfree bench accuracy`."""
    args = build_parser().parse_args(argv)
    if torch.cuda.is_available():
        device, card = torch.device("cuda"), torch.cuda.get_device_name()
    elif os.environ.get("TRITON_INTERPRET") == "1":
        device, card = torch.device("cpu"), "cpu (TRITON_INTERPRET=1)"
    else:
        print("sinkfree bench accuracy: error: needs a CUDA GPU (or TRITON_INTERPRET=1 and tiny --shapes, "
              "e.g. 1x2x128x64, to test on CPU)", file=sys.stderr)
        return 2
    try:
        for text in args.shapes:
            parse_shape(text)
    except (ValueError, argparse.ArgumentTypeError) as e:
        print(f"sinkfree bench accuracy: error: bad --shapes {text!r}: {e}", file=sys.stderr)
        return 2
    names = list(args.providers)
    if device.type != "cuda" and FLOOR in names:
        names.remove(FLOOR)
        print(f"{FLOOR} skipped: needs CUDA", file=sys.stderr)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float16)
    ref_dtype = getattr(torch, args.ref_dtype)
    opts = CaseOptions(args.k_offset, args.k_offset_channels, args.q_scale, args.max_logit)
    print(f"card: {card}; torch {torch.__version__}; inputs {args.dtype or str(dtype)[6:]}, reference "
          f"{args.ref_dtype}, sink {'on' if args.sink else 'off'}", flush=True)
    providers = default_providers(names)
    infos, results = [], []
    for text in args.shapes:
        i, r = evaluate(text, args.cases, providers, sink=args.sink, dtype=dtype, device=device, seed=args.seed,
                        ref_dtype=ref_dtype, chunk=args.chunk, opts=opts,
                        log=lambda line: print(line, file=sys.stderr, flush=True))
        infos += i
        results += r
    print(format_table(infos, results, card, args.sink))
    for line in summary(results):
        print(line)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(_jsonable({"card": card, "torch": torch.__version__, "dtype": str(dtype)[6:],
                                 "ref_dtype": args.ref_dtype, "settings": vars(args), "cases": infos,
                                 "thresholds": {"out_cos": OUT_COS, "out_rel_l1": OUT_REL_L1,
                                                "outlier_out_cos": OUTLIER_OUT_COS, **{
                                     f"{g}_cos": t for g, t in GRAD_COS.items()},
                                     "huge_logit_out_cos": HUGE_LOGIT_COS},
                                 "results": [asdict(r) for r in results]}), fh, indent=1)
    if any(r.note.startswith("failed") for r in results):
        return 1
    if args.strict and any(not r.passed for r in results if not r.floor):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(accuracy_main())
