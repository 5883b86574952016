"""In-register pieces shared by the bf16 (`attention_*`) and 8-bit (`sage8_*`) attention kernels and the
quantization kernels: program ids and offsets, pointers, masks, loop bounds, tile-list walking, the online
softmax. Triton inlines `@triton.jit` helpers, so the kernels compile to the same code as when these lines
stood in each of them.

Conventions (as in `attention_fwd`): rows index queries, cols index keys; causal is bottom-right aligned
(key j is visible to query i iff j <= i + off, off = Sk - Sq); kend bounds the real keys of a padded tile.
"""

import triton
import triton.language as tl


@triton.jit
def head_base(X, b, h, sb, sh):
    """X offset to head (b, h) of a (B, H, ...) tensor, in 64-bit arithmetic."""
    return X + b.to(tl.int64) * sb + h.to(tl.int64) * sh


@triton.jit
def row_major_ptrs(base, rows, srow, offs_d):
    """(len(rows), HEAD_DIM) pointers: rows along dim 0, the contiguous head dim along dim 1."""
    return base + rows[:, None] * srow + offs_d[None, :]


@triton.jit
def transposed_ptrs(base, cols, scol, offs_d):
    """(HEAD_DIM, len(cols)) pointers: a row-major (S, HEAD_DIM) block read transposed."""
    return base + cols[None, :] * scol + offs_d[:, None]


@triton.jit
def query_program(H, GROUP, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    """A query-major program (grid (Sq blocks, B * H)): (pid_bh, b, h, kv head, b * HKV + kv head, m0, offs_m,
    offs_n, offs_d). What a kernel leaves unused is dropped at compile time."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    bhk = b * (H // GROUP) + hk
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    return pid_bh, b, h, hk, bhk, m0, offs_m, offs_n, offs_d


@triton.jit
def key_program(HKV, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    """A key-major program (grid (Sk blocks, B * HKV)): (pid_bh, b, kv head, n0, offs_n, offs_m, offs_d)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    return pid_bh, b, hk, n0, offs_n, offs_m, offs_d


@triton.jit
def row_program(H, S, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    """A row-block program (grid (S blocks, B * H)): (pid, bh, b, h, rows, offs_d, rows in bounds)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    return pid, bh, b, h, rows, offs_d, rows < S


@triton.jit
def load_rows_f32(X, b, h, sb, sh, srow, rows, offs_d, inb):
    """A (len(rows), HEAD_DIM) block of head (b, h) as fp32, rows out of bounds read as 0."""
    return tl.load(row_major_ptrs(head_base(X, b, h, sb, sh), rows, srow, offs_d),
                   mask=inb[:, None], other=0.0).to(tl.float32)


@triton.jit
def visible(cols, rows, kend, off, CAUSAL: tl.constexpr):
    """Which (broadcast) key cols each query row sees: before kend and, when causal, at most row + off."""
    keep = cols < kend
    if CAUSAL:
        keep = keep & (cols <= rows + off)
    return keep


@triton.jit
def causal_full_end(m0, off, BLOCK_N: tl.constexpr):
    """Causal, query rows from m0: the key blocks before this every row sees whole (no mask needed)."""
    return (tl.maximum(m0 + off + 1, 0) // BLOCK_N) * BLOCK_N


@triton.jit
def causal_key_end(m0, off, Sk, BLOCK_M: tl.constexpr):
    """Causal, query rows m0 .. m0 + BLOCK_M - 1: the end of the keys any of them sees."""
    return tl.minimum(m0 + BLOCK_M + off, Sk)


@triton.jit
def causal_query_range(n0, off, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For key cols n0 .. n0 + BLOCK_N - 1 (causal): query rows >= lo see part of the block, rows >= mid all of
    it (both rounded to BLOCK_M)."""
    lo = (tl.maximum(n0 - off, 0) // BLOCK_M) * BLOCK_M
    mid = tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - off, 0), BLOCK_M) * BLOCK_M
    return lo, mid


@triton.jit
def tile_list(Idx, Cnt, b, h, tile, sib, sih, siq, scb, sch):
    """Tile `tile`'s list of partner tiles for head (b, h): (pointer to its first entry, entry count)."""
    cnt = tl.load(Cnt + b * scb + h * sch + tile)
    idx_ptr = Idx + b.to(tl.int64) * sib + h.to(tl.int64) * sih + tile * siq
    return idx_ptr, cnt


@triton.jit
def key_tile_end(KLen, kt, Sk, TILE_N: tl.constexpr, HAS_KLEN: tl.constexpr):
    """End of the real keys of key tile kt: Sk, or the tile's start plus KLen[kt] (padded tiles)."""
    kend = Sk
    if HAS_KLEN:
        kend = tl.minimum(kt * TILE_N + tl.load(KLen + kt), Sk)
    return kend


@triton.jit
def sink_start(s2, BLOCK_M: tl.constexpr, HAS_SINK: tl.constexpr):
    """Running max and row sum of the online softmax before the first key block. The sink (base-2 logit s2,
    per head or per row) joins as its first column of value 0; the max is floored at -1e30 so
    exp2(m_old - m_new) stays finite on rows that see no key."""
    if HAS_SINK:
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.maximum(s2, -1.0e30)
        l_i = tl.math.exp2(s2 - m_i)
    else:
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    return m_i, l_i


@triton.jit
def softmax_step(qk, m_i, l_i):
    """Online-softmax update with base-2 scores qk (BLOCK_M, BLOCK_N): (p, rescale of the old sums, l, m)."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    p = tl.math.exp2(qk - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    return p, alpha, l_i, m_new


@triton.jit
def store_rows(ptrs, x, rows, Sq, EVEN_M: tl.constexpr):
    """Store a (BLOCK_M, HEAD_DIM) block in ptrs' dtype, rows >= Sq dropped unless EVEN_M."""
    if EVEN_M:
        tl.store(ptrs, x.to(ptrs.dtype.element_ty))
    else:
        tl.store(ptrs, x.to(ptrs.dtype.element_ty), mask=rows[:, None] < Sq)


@triton.jit
def store_out_lse(Out, Lse, out, lse, b, h, pid_bh, offs_m, offs_d, sob, soh, som, Sq, EVEN_M: tl.constexpr):
    """The forward's epilogue: out (BLOCK_M, HEAD_DIM) in Out's dtype and the fp32 LSE of the rows."""
    o_ptrs = row_major_ptrs(head_base(Out, b, h, sob, soh), offs_m, som, offs_d)
    lse_ptrs = Lse + pid_bh.to(tl.int64) * Sq + offs_m
    if EVEN_M:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty))
        tl.store(lse_ptrs, lse)
    else:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=offs_m[:, None] < Sq)
        tl.store(lse_ptrs, lse, mask=offs_m < Sq)


@triton.jit
def store_dkdv(DK, DV, dk, dv, b, hk, offs_n, offs_d, sgb, sgh, sgn, Sk, EVEN_N: tl.constexpr):
    """The dK/dV epilogue: both (BLOCK_N, HEAD_DIM) blocks (same strides) in their tensors' dtypes."""
    dk_ptrs = row_major_ptrs(head_base(DK, b, hk, sgb, sgh), offs_n, sgn, offs_d)
    dv_ptrs = row_major_ptrs(head_base(DV, b, hk, sgb, sgh), offs_n, sgn, offs_d)
    if EVEN_N:
        tl.store(dk_ptrs, dk.to(DK.dtype.element_ty))
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty))
    else:
        tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=offs_n[:, None] < Sk)
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=offs_n[:, None] < Sk)


@triton.jit
def tma_rows(Desc, b, h, start, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Rows start .. start + BLOCK - 1 of head (b, h) by a tensor-descriptor (TMA) load over the 4-D (B, H, S,
    HEAD_DIM) tensor, as a (BLOCK, HEAD_DIM) block; rows past S are zero-filled per head (never the next head)."""
    return Desc.load([b, h, start, 0]).reshape(BLOCK, HEAD_DIM)


@triton.jit
def tile_pair_cols(idx_ptr, t, cnt, KLen, Sk, offs_n, TILE_N: tl.constexpr, HAS_KLEN: tl.constexpr):
    """Entries t and t + 1 of a tile list as one block of 2 x TILE_N gathered key columns: (cols, col_ok,
    kend per column); the second half is absent (col_ok False) when t + 1 == cnt."""
    half = offs_n // TILE_N
    kt0 = tl.load(idx_ptr + t)
    has1 = t + 1 < cnt
    kt1 = tl.load(idx_ptr + t + 1, mask=has1, other=0)
    kt = tl.where(half == 0, kt0, kt1)
    cols = kt * TILE_N + offs_n % TILE_N
    col_ok = ((half == 0) | has1) & (cols < Sk)
    kend = tl.zeros_like(cols) + Sk
    if HAS_KLEN:
        kend = tl.minimum(kt * TILE_N + tl.load(KLen + kt, mask=col_ok, other=0), Sk)
    return cols, col_ok, kend


@triton.jit
def tile_pair_rows(idx_ptr, t, cnt, Sq, offs_m, TILE_M: tl.constexpr):
    """Entries t and t + 1 of a key tile's query-tile list as one block of 2 x TILE_M gathered query rows:
    (rows, row_ok); the second half is absent (row_ok False) when t + 1 == cnt."""
    half = offs_m // TILE_M
    qt0 = tl.load(idx_ptr + t)
    has1 = t + 1 < cnt
    qt1 = tl.load(idx_ptr + t + 1, mask=has1, other=0)
    rows = tl.where(half == 0, qt0, qt1) * TILE_M + offs_m % TILE_M
    return rows, ((half == 0) | has1) & (rows < Sq)
