"""VSA: tiling, exactness against dense attention, a pure-PyTorch masked reference, and clear errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sinkfree.attention import AttentionSpec, attend
from sinkfree.attention.vsa import pad_tiles, tile_tokens, unpad_tiles, untile_tokens, vsa_attention, vsa_tiling
from sinkfree.attention.vsa import vsa_topk
from sinkfree.models.dit import DiT, DiTConfig
from sinkfree.models.llm import LLMConfig


@pytest.fixture(autouse=True)
def _reference_path(monkeypatch):
    # The fine stage runs the PyTorch reference on CPU (the Triton interpreter is tested in test_kernels_*).
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.mark.parametrize("grid,tile", [((4, 8, 8), (4, 4, 4)), ((5, 6, 7), (4, 4, 4)), ((1, 9, 10), (1, 8, 8)),
                                       ((3, 3, 3), (4, 4, 4))])
def test_tile_untile_round_trip(grid, tile):
    tl = vsa_tiling(grid, tile)
    s = math.prod(grid)
    x = torch.randn(2, s, 3)
    assert torch.equal(untile_tokens(tile_tokens(x, tl), tl), x)
    assert int(tl.tile_len.sum()) == s
    assert tl.padded == any(g % t for g, t in zip(grid, tile))
    # slots are unique and the real tokens come first inside every padded tile
    assert tl.slot.unique().numel() == s and int(tl.slot.max()) < tl.n_tiles * tl.volume
    assert bool(((tl.slot % tl.volume) < tl.tile_len[tl.tile_of]).all())
    # every tile-major token's tile really contains its raster coordinates
    T, H, W = grid
    r = tl.perm
    t, h, w = r // (H * W), (r // W) % H, r % W
    nh, nw = -(-H // tile[1]), -(-W // tile[2])
    assert torch.equal((t // tile[0] * nh + h // tile[1]) * nw + w // tile[2], tl.tile_of)
    q = torch.randn(2, 2, s, 8)
    assert torch.equal(unpad_tiles(pad_tiles(q, tl), tl), q)
    # the closed-form tile sizes are the counts of tokens per tile
    assert torch.equal(tl.tile_len, torch.bincount(tl.tile_of, minlength=tl.n_tiles).to(torch.int32))


def test_dit_vsa_compiles_without_graph_breaks():
    """The tiling is built from static-shape ops, so Dynamo traces a VSA DiT forward as one graph (a bincount
    there used to break it in two and rebuild the tiling eagerly every step)."""
    import torch._dynamo

    cfg = DiTConfig.from_name("dit-tiny", attn_backend="vsa", vsa_sparsity=0.5, vsa_tile=(4, 4, 4))
    model = DiT(cfg)
    pt, ph, pw = cfg.patch_size
    x, t = torch.randn(1, cfg.in_channels, 4 * pt, 8 * ph, 9 * pw), torch.rand(1)  # partial tiles along W
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(x, t)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]


def test_topk_rule():
    assert vsa_topk(64, 0.875) == 8 and vsa_topk(10, 0.0) == 10 and vsa_topk(3, 0.99) == 1
    with pytest.raises(ValueError, match="vsa_sparsity"):
        vsa_topk(8, 1.0)


def _grads(out, *xs):
    torch.manual_seed(0)
    return torch.autograd.grad((out * torch.randn_like(out)).sum(), xs)


@pytest.mark.parametrize("hkv", [2, 1])
def test_all_tiles_zero_gate_equals_dense(hkv):
    grid = (5, 6, 7)  # partial tiles on every axis
    tl = vsa_tiling(grid, (4, 4, 4))
    s = math.prod(grid)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 2, s, 64, generator=g).requires_grad_()
    k, v = (torch.randn(2, hkv, s, 64, generator=g).requires_grad_() for _ in range(2))
    gate = torch.zeros(2, 2, s, 64, requires_grad=True)
    out = vsa_attention(q, k, v, tl, topk=tl.n_tiles, gate=gate)
    ref = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # permutation-equivariant: order irrelevant
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(_grads(out, q, k, v), _grads(ref, q, k, v)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def vsa_masked_reference(q, k, v, grid, tile, topk, gate=None, sink=None):
    """VSA in raster order from first principles: per-token tile ids, means by index_add, dense masked softmax."""
    b, h, s, d = q.shape
    T, H, W = grid
    pos = torch.arange(s)
    t, y, x = pos // (H * W), (pos // W) % H, pos % W
    nh, nw = -(-H // tile[1]), -(-W // tile[2])
    tid = (t // tile[0] * nh + y // tile[1]) * nw + x // tile[2]
    nt = int(tid.max()) + 1
    count = torch.bincount(tid, minlength=nt).double()

    def means(z):
        return torch.zeros(b, z.shape[1], nt, d, dtype=torch.float64).index_add(2, tid, z.double()) / count[:, None]

    qc, kc, vc = means(q), means(k).repeat_interleave(h // k.shape[1], 1), means(v).repeat_interleave(
        h // k.shape[1], 1)
    logits = qc @ kc.transpose(-1, -2) / math.sqrt(d)
    sel = torch.zeros(b, h, nt, nt, dtype=torch.bool).scatter_(-1, logits.topk(topk, -1).indices, True)
    extra = torch.full((b, h, nt, 1), float("-inf"), dtype=torch.float64) if sink is None else \
        sink.double().view(1, h, 1, 1).expand(b, h, nt, 1)
    coarse = torch.softmax(torch.cat([logits, extra], -1), -1)[..., :nt] @ vc  # (B, H, Nt, D)
    kk, vv = k.double().repeat_interleave(h // k.shape[1], 1), v.double().repeat_interleave(h // k.shape[1], 1)
    z = q.double() @ kk.transpose(-1, -2) / math.sqrt(d)
    mask = sel[:, :, tid][:, :, :, tid]  # (B, H, S, S): query token's tile selected key token's tile
    z = z.masked_fill(~mask, float("-inf"))
    extra = torch.full((b, h, s, 1), float("-inf"), dtype=torch.float64) if sink is None else \
        sink.double().view(1, h, 1, 1).expand(b, h, s, 1)
    fine = torch.softmax(torch.cat([z, extra], -1), -1)[..., :s] @ vv
    c = coarse[:, :, tid]
    return fine + (c if gate is None else gate.double() * c)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("use_sink", [False, True])
def test_vsa_matches_masked_reference(d, use_sink):
    grid, tile = (5, 6, 7), (4, 4, 4)  # 8 tiles, all partial but one
    tl = vsa_tiling(grid, tile)
    s = math.prod(grid)
    g = torch.Generator().manual_seed(d + use_sink)
    q, k, v = (torch.randn(2, 2, s, d, generator=g).requires_grad_() for _ in range(3))
    gate = torch.randn(2, 2, s, d, generator=g).requires_grad_()
    sink = torch.randn(2, generator=g).requires_grad_() if use_sink else None
    topk = 3
    ref = vsa_masked_reference(q, k, v, grid, tile, topk, gate, sink)
    out = untile_tokens(vsa_attention(*(tile_tokens(z, tl, 2) for z in (q, k, v)), tl, topk,
                                      tile_tokens(gate, tl, 2), sink), tl, 2)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    inputs = (q, k, v, gate) + ((sink,) if use_sink else ())
    for a, b in zip(_grads(out, *inputs), _grads(ref.float(), *inputs)):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_vsa_without_gate_adds_coarse():
    grid = (4, 4, 8)
    tl = vsa_tiling(grid, (4, 4, 4))
    q, k, v = (torch.randn(1, 2, 128, 64) for _ in range(3))
    out = untile_tokens(vsa_attention(*(tile_tokens(z, tl, 2) for z in (q, k, v)), tl, topk=1), tl, 2)
    ref = vsa_masked_reference(q, k, v, grid, (4, 4, 4), 1)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)


def test_dit_vsa_all_tiles_equals_dense_with_sink_and_gate():
    """Whole model: tile-major order, partial tiles, learnable sinks and the output gate compose with VSA."""
    common = dict(in_channels=3, n_layer=2, n_embd=128, n_head=2, num_classes=3, attn_sink="learnable",
                  attn_gate="elementwise", sink_init=0.5)
    dense = DiT(DiTConfig(**common))
    vsa = DiT(DiTConfig(**common, attn_backend="vsa", vsa_sparsity=0.0, vsa_gate_zero_init=True))
    missing, unexpected = vsa.load_state_dict(dense.state_dict(), strict=False)
    assert not unexpected and all("gate_compress" in m for m in missing)
    with torch.no_grad():  # leave adaLN-Zero's identity so attention matters
        for m in (dense, vsa):
            torch.manual_seed(0)
            for name, p in m.named_parameters():
                if "adaln" in name or "head" in name:
                    p.normal_(0, 0.05)
    x = torch.randn(2, 3, 6, 10, 6)  # token grid (6, 5, 3): partial tiles
    t, y = torch.rand(2), torch.tensor([0, 2])
    out_d, out_v = dense(x, t, y), vsa(x, t, y)
    assert out_d.abs().max() > 1e-3
    torch.testing.assert_close(out_v, out_d, rtol=1e-4, atol=1e-5)
    out_d.square().sum().backward()
    out_v.square().sum().backward()
    pv = dict(vsa.named_parameters())
    for name, p in dense.named_parameters():
        torch.testing.assert_close(pv[name].grad, p.grad, rtol=1e-3, atol=1e-5, msg=name)
    assert pv["layers.0.attn.gate_compress.weight"].grad.abs().max() > 0  # the coarse branch learns


def test_dit_vsa_image_tiles_and_sparsity():
    m = DiT(DiTConfig(n_layer=1, n_embd=64, n_head=1, attn_backend="vsa", vsa_sparsity=0.5))
    assert m.tiling((1, 16, 8)).tile == (1, 8, 8) and m.tiling((2, 8, 8)).tile == (4, 4, 4)
    out = m(torch.randn(1, 3, 1, 32, 16), torch.rand(1))
    assert out.shape == (1, 3, 1, 32, 16)
    m.set_vsa_sparsity(0.75)
    assert m.layers[0].attn.sparsity == 0.75 and m.layers[0].attn.kept_tiles(16) == 4


def test_bad_vsa_options_are_clear_errors():
    with pytest.raises(ValueError, match="causal.*vsa"):
        LLMConfig(attn_backend="vsa")
    with pytest.raises(ValueError, match="head_dim=32.*vsa"):
        DiTConfig(n_embd=64, n_head=2, attn_backend="vsa")
    with pytest.raises(ValueError, match="vsa_tile=.*64 or 128|vsa_tile=.*holds 48"):
        DiTConfig(vsa_tile=(4, 4, 3))
    with pytest.raises(ValueError, match="vsa_image_tile"):
        DiTConfig(vsa_image_tile=(2, 4, 8))
    with pytest.raises(ValueError, match="vsa_sparsity"):
        DiTConfig(vsa_sparsity=1.0)
    with pytest.raises(ValueError, match="token grid"):
        q = torch.randn(1, 1, 64, 64)
        attend(q, q, q, AttentionSpec("vsa", causal=False))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_coarse_stage_in_the_input_dtype(dtype):
    """Half-precision inputs: tile-level matmuls in that dtype (fp32 means and accumulation), fp32 logits for
    the top-k; logits, output and gradients close to an fp64 computation of the same coarse stage."""
    from sinkfree.attention.vsa import vsa_coarse

    torch.manual_seed(0)
    tl = vsa_tiling((4, 8, 12), (4, 4, 4))
    b, h, d = 2, 3, 64
    qp, kp, vp = (pad_tiles(torch.randn(b, h, math.prod(tl.grid), d), tl) for _ in range(3))
    sink = torch.randn(h)
    ref = [t.double().requires_grad_() for t in (qp, kp, vp)]
    half = [t.to(dtype).requires_grad_() for t in (qp, kp, vp)]
    rl, ro = vsa_coarse(*ref, tl, 0.125, sink.double())
    hl, ho = vsa_coarse(*half, tl, 0.125, sink)
    assert hl.dtype == torch.float32 and ho.dtype == dtype
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    assert ((hl.double() - rl).norm() / rl.norm()) < tol
    assert ((ho.double() - ro).norm() / ro.norm()) < tol
    g = torch.randn_like(ro)
    (ro * g).sum().backward()
    (ho.float() * g.float()).sum().backward()
    for a, r in zip(half, ref):
        assert ((a.grad.double() - r.grad).norm() / r.grad.norm()) < 3 * tol
