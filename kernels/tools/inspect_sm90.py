"""sm_90 compile facts of the sinkfree Triton kernels, without a GPU: registers, spills, shared memory, wgmma.

For each kernel, autotune config, head dim and masking variant the kernel is compiled for sm_90 on the CPU
(`triton.compile` with `GPUTarget("cuda", 90, 32)`), ptxas (the one Triton ships) is run with -v on the
PTX, and the TTGIR is read for the lowering of every `tl.dot`.

The kernel arguments are those of a real launch: the launchers (`ops._forward` / `_backward`,
`sage8_ops._forward` / `_backward`, `gated_norm._forward` / `_backward`) run on small CPU tensors with every
kernel's `run` replaced by a recorder (no interpreter: `TRITON_INTERPRET=1` would collapse the autotune
configs to one and switch the FP8 rounding to its interpreter form). The recorded arguments then go through
Triton's own launch-time specialization (`create_function_from_signature` with the sm_90 backend, tensors
as `MockTensor`s whose pointers are 16-byte aligned), so pointer/int divisibility (tt.divisibility 16),
ints equal to 1 (constexpr) and dtypes are exactly what a launch at these shapes would compile. Shapes are
chosen like real ones: S a multiple of 128 (EVEN_M / EVEN_N true), strides multiples of 16.

Autotune configs are pruned as on an H100/H200 (the kernels' own early_config_prune, 227 KB shared memory);
pruned configs are listed but not compiled unless --all-configs.

Usage (from the repo root):
    python kernels/tools/inspect_sm90.py --kernels sage8 flash gated_norm --head-dims 64 128
    python kernels/tools/inspect_sm90.py --kernels sage8 --head-dims 128 --causal 0 --no-sparse --json out.json
--tma sets SINKFREE_ATTN_TMA=1 before the kernels are imported: the tensor-descriptor (TMA) configs of the
dense forward and backward (_attn_fwd, _attn_bwd_dkdv, _attn_bwd_dq) join their lists and the recorded launches carry host descriptors (rows "tma" / "tma+ws", notes count the
TMA loads and flag warp-specialized compiles).
Kernel groups: flash (_attn_fwd, _attn_bwd_dkdv, _attn_bwd_dq, _bwd_preprocess), sage8 (_sage8_fwd with and
without V_SPLIT, _sage8_bwd_dkdv, _sage8_bwd_dq), quant (_quant_tokens_int8, _quant_channels),
gated_norm (_gn_fwd, _gn_bwd at C 768 -> BLOCK_C 1024, r 16, x fp32 and bf16, bf16 matmuls; the launcher's
config, SINKFREE_GN_CONFIG respected).

Columns: regs (ptxas "Used N registers"), spill (store/load bytes), smem (metadata.shared, bytes), wgmma /
mma.sync / fma (number of dots lowered to `ttng.warp_group_dot`, to `tt.dot` with an mma v2 layout, to
`tt.dot` with a blocked layout), imprecise (maxNumImpreciseAcc of the FP8 dots; 2^30 = the whole K summed
in Hopper's reduced-precision FP8 accumulator, no fp32 promotion inside the dot).
"""

import argparse
import json
import multiprocessing as mp
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("inspect_sm90: unset TRITON_INTERPRET (the kernels must be JITFunctions to compile for sm_90)")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # kernels/ (sinkfree_kernels without install)
if "--tma" in sys.argv:  # the descriptor configs join the autotune lists at import
    os.environ["SINKFREE_ATTN_TMA"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import MockTensor, create_function_from_signature  # noqa: E402
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

from sinkfree_kernels import (_tuning, attention_bwd, attention_fwd, gated_norm, ops, quant, sage8_bwd,  # noqa: E402
                              sage8_fwd, sage8_ops, tiles)

TARGET = GPUTarget("cuda", 90, 32)
H100_SMEM = 232448  # opt-in shared memory per block of H100/H200
KERNEL_MODULES = (attention_fwd, attention_bwd, sage8_fwd, sage8_bwd, quant, gated_norm)
GROUPS = ("flash", "sage8", "quant", "gated_norm")
DUMP_DIR = None  # --dump-dir: where each compile's TTGIR and PTX go


# ---- recording the launches -----------------------------------------------------------------------------

def _kernel_objects():
    """name -> Autotuner / Heuristics / JITFunction of every kernel in the kernel modules."""
    out = {}
    for mod in KERNEL_MODULES:
        for name, obj in vars(mod).items():
            if isinstance(obj, (triton.runtime.Autotuner, triton.runtime.Heuristics, triton.JITFunction)):
                if name.startswith("_") and not name.startswith("__"):
                    out[name] = obj
    return out


def record_launches(fn):
    """Run fn() with every kernel's launch replaced by a recorder: [(kernel name, args, kwargs)]."""
    kernels = _kernel_objects()
    calls = []
    saved = {}

    def recorder(name):
        def run(*args, grid=None, warmup=False, **kwargs):
            calls.append((name, args, kwargs))
        return run

    for name, obj in kernels.items():
        saved[name] = obj.__dict__.get("run")
        obj.run = recorder(name)
    try:
        fn()
    finally:
        for name, obj in kernels.items():
            if saved[name] is None:
                del obj.run
            else:
                obj.run = saved[name]
    return calls


def _attn_inputs(d, sparse, causal, seq, heads, tile=64):
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(1, heads, seq, d, generator=g).to(torch.bfloat16) for _ in range(4))
    sink = torch.zeros(heads)
    idx = cnt = None
    if sparse:
        idx, cnt = tiles.random_lists(1, heads, seq, seq, tile, tile, 0.25, generator=g, causal=causal)
        idx, cnt, _ = ops._tile_args(q, idx, cnt, tile, tile)
    return q, k, v, dout, sink, idx, cnt


def launches_flash(d, causal, sparse, seq=1024, heads=6, sink=True, tile=64):
    q, k, v, dout, s, idx, cnt = _attn_inputs(d, sparse, causal, seq, heads, tile)
    s = s if sink else None
    scale = d ** -0.5

    def go():
        out, lse = ops._forward(q, k, v, s, causal, scale, idx, cnt, None, tile, tile)
        ops._backward(dout, None, q, k, v, out, lse, s, causal, scale, True, idx, cnt, None, tile, tile)
    return record_launches(go)


def launches_sage8(d, causal, sparse, v_split, seq=1024, heads=6, sink=True, tile=64, backward=True):
    q, k, v, dout, s, idx, cnt = _attn_inputs(d, sparse, causal, seq, heads, tile)
    s = s if sink else None
    scale = d ** -0.5

    def go():
        out, lse = sage8_ops._forward(q, k, v, s, causal, scale, True, v_split, idx, cnt, None, tile, tile)
        if backward:
            lse = torch.zeros_like(lse)
            sage8_ops._backward(dout, None, q, k, v, out, lse, s, causal, scale, True, idx, cnt, None, tile, tile)
    return record_launches(go)


def launches_gated_norm(x_dtype, c=768, r=16, rows=4096, mm_dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, c, generator=g).to(x_dtype)
    w, wd, wu = torch.ones(c), torch.randn(r, c, generator=g) * 0.02, torch.randn(c, r, generator=g) * 0.02

    def go():
        out, rstd, a = gated_norm._forward(x, w, wd, wu, 1e-5, 1.0, mm_dtype)
        gated_norm._backward(torch.ones_like(out), x, w, wd, wu, rstd, a, 1.0, mm_dtype)
    return record_launches(go)


# ---- configs, specialization, compile ------------------------------------------------------------------

def _layers(obj):
    """(autotuner or None, heuristics or None, JITFunction)."""
    at = obj if isinstance(obj, triton.runtime.Autotuner) else None
    inner = at.fn if at else obj
    heur = inner if isinstance(inner, triton.runtime.Heuristics) else None
    jit = heur.fn if heur else inner
    return at, heur, jit


def configs_for(obj, args, kwargs, all_configs=False):
    """[(config kwargs incl. num_warps/num_stages, kept by the H100/H200 pruning)] of one launch."""
    at, _, _ = _layers(obj)
    if at is None:
        return [({}, True)]
    named = dict(zip(at.arg_names, args))
    saved = _tuning.max_shared_memory, _tuning.autotune_enabled
    _tuning.max_shared_memory = lambda *a, **k: H100_SMEM
    _tuning.autotune_enabled = lambda: True
    try:
        kept = at.early_config_prune(at.configs, named, **kwargs) if at.early_config_prune else at.configs
    finally:
        _tuning.max_shared_memory, _tuning.autotune_enabled = saved
    kept_keys = {str(c) for c in kept}
    out = [(c.all_kwargs(), str(c) in kept_keys) for c in at.configs]
    for c in kept:  # a fallback config the pruner made up
        if str(c) not in {str(x) for x in at.configs}:
            out.append((c.all_kwargs(), True))
    return out if all_configs else [o for o in out if o[1]]


def specialize(obj, args, kwargs, config_kwargs):
    """What a launch would compile: (JITFunction, signature, constexprs, attrs, options dict)."""
    at, heur, jit = _layers(obj)
    kw = {**kwargs, **config_kwargs}
    if heur is not None:
        named = dict(zip(heur.arg_names, args))
        for name, h in heur.values.items():
            kw[name] = h({**named, **kw})
    backend = make_backend(TARGET)
    binder = create_function_from_signature(jit.signature, jit.params, backend)

    def mock(a):
        if isinstance(a, torch.Tensor):
            return MockTensor(a.dtype)
        if isinstance(a, TensorDescriptor):  # a fresh copy: the config's pre_hook sets its block shape
            return TensorDescriptor(MockTensor(a.base.dtype), list(a.shape), list(a.strides), list(a.block_shape))
        return a
    margs = [mock(a) for a in args]
    mkw = {k: mock(v) for k, v in kw.items()}
    pre_hook = next((c.pre_hook for c in (at.configs if at else []) if c.all_kwargs() == config_kwargs), None)
    if pre_hook is not None:
        pre_hook({**dict(zip(jit.arg_names, margs)), **mkw})
    bound, spec, options = binder(*margs, **mkw)
    options, signature, constexprs, attrs = jit._pack_args(backend, mkw, bound, spec, options)
    return jit, signature, constexprs, attrs, options.__dict__


_PTXAS_RE = {
    "regs": re.compile(r"Used (\d+) registers"),
    "spill_st": re.compile(r"(\d+) bytes spill stores"),
    "spill_ld": re.compile(r"(\d+) bytes spill loads"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
}


def ptxas_facts(ptx):
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(TARGET.arch).path
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as fh:
            fh.write(ptx)
        r = subprocess.run([ptxas, "-lineinfo", "-v", "--gpu-name=sm_90a", src, "-o", os.path.join(tmp, "k.o")],
                           capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"ptxas failed: {r.stderr[-2000:]}")
    out = {}
    for key, rx in _PTXAS_RE.items():
        m = rx.search(r.stderr)
        out[key] = int(m.group(1)) if m else None
    return out


_DOT_RE = re.compile(r"(%[\w.]+)(?::\d+)? = (ttng\.warp_group_dot|tt\.dot) (.*)")


def _short_type(t):
    t = t.strip()
    m = re.match(r"(?:tensor|!ttg\.memdesc)<([\dx]+)x(\w+)", t)
    if not m:
        return t[:40]
    where = "smem" if t.startswith("!ttg.memdesc") else "reg"
    return f"{m.group(1)}x{m.group(2)}@{where}"


def ttgir_dots(ttgir):
    """Every dot of the TTGIR: name, lowering (wgmma / mma.sync / fma), operand types, maxNumImpreciseAcc."""
    layouts = {}
    for m in re.finditer(r"^(#\w+) = (#[\w.]+<.*)$", ttgir, re.M):
        layouts[m.group(1)] = m.group(2)
    dots = []
    for line in ttgir.splitlines():
        m = _DOT_RE.search(line)
        if not m:
            continue
        var, op, rest = m.groups()
        name = re.sub(r"_\d+$", "", var.lstrip("%"))
        sep = "} : " if "} : " in rest else " : "  # the types follow the attribute dict
        tys = rest.split(sep, 1)[1].split(" loc(")[0] if sep in rest else ""
        ab, _, res = tys.partition(" -> ")
        a, _, b = ab.partition(" * ")
        imp = re.search(r"maxNumImpreciseAcc = (\d+)", rest)
        if op == "ttng.warp_group_dot":
            kind = "wgmma"
        else:
            enc = re.search(r",\s*(#\w+)>\s*$", res.strip())
            lay = layouts.get(enc.group(1), "") if enc else ""
            kind = "mma.sync" if "nvidia_mma" in lay else "fma"
        dots.append(dict(name=name, kind=kind, a=_short_type(a), b=_short_type(b), out=_short_type(res),
                         max_imprecise_acc=int(imp.group(1)) if imp else None))
    return dots


def compile_facts(obj, args, kwargs, config_kwargs):
    jit, signature, constexprs, attrs, options = specialize(obj, args, kwargs, config_kwargs)
    t0 = time.time()
    ck = triton.compile(ASTSource(fn=jit, signature=signature, constexprs=constexprs, attrs=attrs), target=TARGET,
                        options=options)
    facts = dict(compile_s=round(time.time() - t0, 2), smem=ck.metadata.shared)
    facts.update(ptxas_facts(ck.asm["ptx"]))
    ttgir = ck.asm["ttgir"]
    facts["dots"] = ttgir_dots(ttgir)
    facts["async_copies"] = len(re.findall(r"ttg\.async_copy_global_to_local|ttng\.async_tma_copy", ttgir))
    facts["tma_loads"] = len(re.findall(r"ttng\.async_tma_copy_global_to_local", ttgir))
    facts["warp_specialized"] = "ttg.warp_specialize" in ttgir
    facts["num_warps"] = ck.metadata.num_warps
    facts["wgmma_waits"] = re.findall(r"warp_group_dot_wait .*?pendings = (\d+)", ttgir)
    if DUMP_DIR:
        stem = os.path.join(DUMP_DIR, "_".join(f"{k}{v}" for k, v in sorted(config_kwargs.items())
                                               if k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")))
        for ext in ("ttgir", "ptx"):
            with open(f"{stem}_{jit.__name__}_{facts['smem']}_{len(ttgir)}.{ext}", "w") as fh:
                fh.write(ck.asm[ext])
    return facts


# ---- jobs ----------------------------------------------------------------------------------------------

def build_jobs(groups, head_dims, causals, sparse, all_configs, sink=True, seq=1024, kernel_names=None,
               variants=None):
    """[(row dict, kernel object, args, kwargs, config kwargs)]; kernel_names / variants (e.g. "tma") keep
    only those rows."""
    kernels = _kernel_objects()
    jobs = []

    def add(group, variant, calls, d="", causal="", tile=0, only=None):
        seen = set()
        for name, args, kwargs in calls:
            if (only and name not in only) or (kernel_names and name not in kernel_names):
                continue
            if name in seen:
                continue
            seen.add(name)
            obj = kernels[name]
            for ckw, kept in configs_for(obj, args, kwargs, all_configs):
                var = variant
                if ckw.get("USE_TMA"):
                    var = "tma+ws" if ckw.get("WARP_SPEC") else "tma"
                if variants and var not in variants:
                    continue
                row = dict(group=group, kernel=name, variant=var, D=d, causal=causal, sparse_tile=tile,
                           BLOCK_M=ckw.get("BLOCK_M", kwargs.get("BLOCK_M", "")),
                           BLOCK_N=ckw.get("BLOCK_N", kwargs.get("BLOCK", kwargs.get("BLOCK_C", ""))),
                           warps=ckw.get("num_warps", kwargs.get("num_warps", 4)),
                           stages=ckw.get("num_stages", kwargs.get("num_stages", 3)), pruned=not kept)
                jobs.append((row, obj, args, kwargs, ckw))

    tiles_ = [0] + ([64] if sparse else [])
    for d in head_dims:
        for causal in causals:
            for tile in tiles_:
                sp = tile > 0
                if "flash" in groups:
                    add("flash", "bf16", launches_flash(d, causal, sp, seq=seq, sink=sink, tile=tile or 64),
                        d, causal, tile, only={"_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq"})
                if "sage8" in groups:
                    calls = launches_sage8(d, causal, sp, False, seq=seq, sink=sink, tile=tile or 64)
                    add("sage8", "", calls, d, causal, tile, only={"_sage8_fwd", "_sage8_bwd_dkdv", "_sage8_bwd_dq"})
                    calls = launches_sage8(d, causal, sp, True, seq=seq, sink=sink, tile=tile or 64, backward=False)
                    add("sage8", "v_split", calls, d, causal, tile, only={"_sage8_fwd"})
        if "flash" in groups:
            add("flash", "bf16", launches_flash(d, False, False, seq=seq, sink=sink), d, "", 0, only={"_bwd_preprocess"})
        if "quant" in groups:
            calls = launches_sage8(d, False, False, True, seq=seq, sink=sink)
            add("quant", "", calls, d, "", 0, only={"_quant_tokens_int8"})
            add("quant", "v_split", calls, d, "", 0, only={"_quant_channels"})
    if "gated_norm" in groups:
        for xd in (torch.float32, torch.bfloat16):
            add("gated_norm", f"x {str(xd).replace('torch.', '')}, mm bf16", launches_gated_norm(xd))
    return jobs


def _child(conn, job):
    row, obj, args, kwargs, ckw = job
    try:
        conn.send(dict(ok=True, **compile_facts(obj, args, kwargs, ckw)))
    except Exception as e:  # report, don't die: one bad config must not hide the others
        conn.send(dict(ok=False, error=f"{type(e).__name__}: {str(e)[-500:]}"))
    conn.close()


def run_jobs(jobs, n_par=1, timeout=600, log=print):
    """Compile each non-pruned job in a forked process (at most n_par at once, killed after timeout s)."""
    ctx = mp.get_context("fork")
    results = [None] * len(jobs)
    todo = [i for i, j in enumerate(jobs) if not j[0]["pruned"]]
    for i, j in enumerate(jobs):
        if j[0]["pruned"]:
            results[i] = dict(ok=False, error="pruned (smem estimate > 227 KB)")
    running = {}
    while todo or running:
        while todo and len(running) < n_par:
            i = todo.pop(0)
            parent, child = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_child, args=(child, jobs[i]))
            p.start()
            child.close()
            running[i] = (p, parent, time.time())
        time.sleep(0.05)
        for i, (p, conn, t0) in list(running.items()):
            res = None
            if conn.poll():
                try:
                    res = conn.recv()
                except EOFError:
                    res = dict(ok=False, error=f"compile process died (exit {p.exitcode})")
            elif not p.is_alive():
                res = dict(ok=False, error=f"compile process died (exit {p.exitcode})")
            elif time.time() - t0 > timeout:
                p.kill()
                res = dict(ok=False, error=f"timeout after {timeout}s")
            if res is None:
                continue
            p.join(5)
            conn.close()
            del running[i]
            results[i] = res
            log(fmt_row({**jobs[i][0], **res}), flush=True)
    return [{**j[0], **r} for j, r in zip(jobs, results)]


# ---- output --------------------------------------------------------------------------------------------

COLUMNS = ("kernel", "variant", "BM", "BN", "w", "st", "D", "causal", "sparse", "regs", "spill st/ld", "smem",
           "wgmma", "mma.sync", "fma", "imprecise", "note")


def _pow2(n):
    return f"2^{n.bit_length() - 1}" if n and n & (n - 1) == 0 and n >= 1024 else str(n)


def row_cells(r):
    dots = r.get("dots") or []
    by_kind = {k: [x["name"] for x in dots if x["kind"] == k] for k in ("wgmma", "mma.sync", "fma")}
    imp = sorted({f"{x['name']}:{_pow2(x['max_imprecise_acc'])}" for x in dots
                  if x.get("max_imprecise_acc") and "f8" in x["a"] + x["b"]})

    def n_names(names):
        if not names:
            return "0"
        parts = [n if names.count(n) == 1 else f"{n}x{names.count(n)}" for n in sorted(set(names))]
        return f"{len(names)} ({','.join(parts)})"
    note = ""
    if r.get("ok"):
        if r["smem"] > H100_SMEM:
            note = "smem > 227 KB"
        if r.get("tma_loads"):
            note = (note + "; " if note else "") + f"{r['tma_loads']} TMA loads"
        if r.get("warp_specialized"):
            note = (note + "; " if note else "") + f"warp-specialized ({r['num_warps']} warps in all)"
        sp = (r.get("spill_st") or 0) + (r.get("spill_ld") or 0)
        cells_spill = f"{r.get('spill_st')}/{r.get('spill_ld')}" + (" SPILL" if sp else "")
        vals = [r["regs"], cells_spill, r["smem"], n_names(by_kind["wgmma"]), n_names(by_kind["mma.sync"]),
                n_names(by_kind["fma"]), " ".join(imp) or "-"]
    else:
        vals = ["-"] * 7
        note = r.get("error", "")
    causal = {True: "yes", False: "no"}.get(r["causal"], r["causal"])
    return [r["kernel"], r["variant"], r["BLOCK_M"], r["BLOCK_N"], r["warps"], r["stages"], r["D"], causal,
            r["sparse_tile"] or "dense", *vals, note]


def fmt_row(r):
    return "| " + " | ".join(str(c) for c in row_cells(r)) + " |"


def table(rows):
    head = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS)
    return "\n".join([head] + [fmt_row(r) for r in rows])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernels", nargs="+", default=list(GROUPS), choices=GROUPS)
    ap.add_argument("--head-dims", nargs="+", type=int, default=[64, 128])
    ap.add_argument("--causal", nargs="+", type=int, default=[0, 1], choices=[0, 1])
    ap.add_argument("--no-sparse", action="store_true", help="skip the SPARSE=True (tile 64) variants")
    ap.add_argument("--no-sink", action="store_true", help="launch without sink logits (HAS_SINK off)")
    ap.add_argument("--all-configs", action="store_true", help="also compile configs the H100 pruning drops")
    ap.add_argument("--jobs", type=int, default=1, help="parallel compiles")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per compile")
    ap.add_argument("--json", default="inspect_sm90.json", help="where to write the rows")
    ap.add_argument("--dump-dir", help="also write each compile's TTGIR and PTX there")
    ap.add_argument("--only", nargs="+", help="kernel names to keep (e.g. _attn_fwd)")
    ap.add_argument("--variants", nargs="+", help="row variants to keep (e.g. tma tma+ws bf16)")
    ap.add_argument("--tma", action="store_true", help="SINKFREE_ATTN_TMA=1: add the dense forward's and "
                    "backward's tensor-descriptor configs (launches get descriptors; sparse ones keep pointers)")
    a = ap.parse_args(argv)
    global DUMP_DIR
    if a.dump_dir:
        os.makedirs(a.dump_dir, exist_ok=True)
        DUMP_DIR = a.dump_dir

    t0 = time.time()
    jobs = build_jobs(a.kernels, a.head_dims, [bool(c) for c in a.causal], not a.no_sparse, a.all_configs,
                      sink=not a.no_sink, kernel_names=a.only, variants=a.variants)
    print(f"{len(jobs)} rows, {sum(not j[0]['pruned'] for j in jobs)} to compile", flush=True)
    print("| " + " | ".join(COLUMNS) + " |", flush=True)
    rows = run_jobs(jobs, a.jobs, a.timeout)
    print(f"\n## sm_90 compile facts ({time.time() - t0:.0f} s)\n")
    print(table(rows))
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=Path(__file__).parent).stdout.strip()
    meta = dict(triton=triton.__version__, target="cuda sm_90 (ptxas --gpu-name=sm_90a)", argv=sys.argv[1:],
                git=rev)
    with open(a.json, "w") as fh:
        json.dump(dict(meta=meta, rows=rows), fh, indent=1, default=str)
    print(f"\nwrote {a.json}")


if __name__ == "__main__":
    main()
