"""DiT model, rectified-flow task, video data and the sparsity ramp (CPU, tiny shapes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sinkfree.data.video import FolderDataModule, SyntheticVideoDataModule
from sinkfree.models.dit import DiT, DiTConfig, PRESETS
from sinkfree.tasks.flow import RectifiedFlow, VSASparsityRamp, write_samples


def tiny(**kw) -> DiTConfig:
    return DiTConfig(**{**dict(n_layer=2, n_embd=64, n_head=2, num_classes=3), **kw})


def test_presets_and_bad_config():
    assert set(PRESETS) == {"dit-tiny", "dit-s", "dit-b", "dit-video-b"}
    c = DiTConfig.from_name("dit-video-b", attn_backend="vsa")
    assert (c.n_embd, c.n_layer, c.n_head, c.head_size) == (1536, 24, 12, 128)
    assert sum(c.rope_axes) == 128 and all(a % 2 == 0 for a in c.rope_axes)
    with pytest.raises(ValueError, match="unknown DiT preset"):
        DiTConfig.from_name("dit-xxl")
    with pytest.raises(ValueError, match="patch_size"):
        DiTConfig(patch_size=(1, 2))
    with pytest.raises(ValueError, match="attn_gate"):
        DiTConfig(attn_gate="sometimes")
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        DiT(tiny())(torch.randn(1, 3, 1, 5, 4), torch.rand(1))


def test_patchify_round_trip():
    m = DiT(tiny(patch_size=(2, 2, 2)))
    x = torch.randn(2, 3, 4, 6, 8)
    tokens = m.patchify(x)
    assert tokens.shape == (2, 2 * 3 * 4, 3 * 8)
    assert torch.equal(m.unpatchify(tokens, m.token_grid(x.shape)), x)


def test_rope_splits_head_dim_over_axes():
    m = DiT(tiny())
    cos, _ = m.rope((2, 3, 4))
    dt, dh, dw = m.config.rope_axes
    c = cos[:, : (dt + dh + dw) // 2].view(2, 3, 4, -1)  # first half: t dims, then h, then w
    a, b = dt // 2, (dt + dh) // 2
    assert torch.allclose(c[:, :1, :1, :a], c[:, :, :, :a].reshape(2, 12, -1)[:, :1].view(2, 1, 1, -1))
    assert torch.equal(c[0, :, 0, a:b], c[1, :, 3, a:b])  # h dims depend on h only
    assert not torch.equal(c[0, 0, :, b:][0], c[0, 0, :, b:][1])  # w dims move with w


@pytest.mark.parametrize("residual_sink,gate", [("none", "none"), ("gatednorm", "elementwise")])
def test_adaln_zero_block_is_identity_at_init(residual_sink, gate):
    m = DiT(tiny(residual_sink=residual_sink, attn_gate=gate, attn_sink="learnable", qk_norm=True))
    x, cond = torch.randn(2, 24, 64), torch.randn(2, 64)
    rope = tuple(r[:24] for r in m.rope((2, 3, 4)))
    assert torch.equal(m.layers[0](x, cond, rope), x)
    out = m(torch.randn(2, 3, 2, 6, 8), torch.rand(2), torch.tensor([0, 3]))  # 3 = the null class
    assert torch.equal(out, torch.zeros_like(out))  # zero head: the initial velocity is 0


def test_flow_loss_and_fixed_validation_triples():
    task = RectifiedFlow(arch=tiny(), t_logit_std=1.0)
    task.configure_model()
    x0 = torch.randn(2, 3, 1, 4, 4)
    n1, t1 = task._fixed_triples(x0, 3)
    n2, t2 = task._fixed_triples(x0, 3)
    assert torch.equal(n1, n2) and torch.equal(t1, t2) and not torch.equal(n1, task._fixed_triples(x0, 4)[0])
    # the model starts at velocity 0, so the loss is E|ε − x0|²
    loss = task.flow_loss(x0, n1, t1, None)
    torch.testing.assert_close(loss, (n1 - x0).square().mean())
    t = task.sample_t(10000, torch.Generator().manual_seed(0))
    assert 0 < float(t.min()) and float(t.max()) < 1 and abs(float(t.median()) - 0.5) < 0.02
    with pytest.raises(ValueError, match="class_dropout"):
        RectifiedFlow(arch=tiny(), class_dropout=1.0)


def test_euler_sampler_integrates_velocity():
    task = RectifiedFlow(arch=tiny(num_classes=0), sample_steps=4)
    task.configure_model()
    x = task.sample(2, (3, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    # zero velocity at init: the sample is the starting noise
    assert torch.equal(x, torch.randn((2, 3, 1, 4, 4), generator=torch.Generator().manual_seed(0)))


def test_synthetic_videos_are_seeded_and_structured():
    dm = SyntheticVideoDataModule(frames=4, size=16, num_classes=6, batch_size=2, train_size=8, val_size=4)
    a, b = dm.train_set[3], dm.train_set[3]
    assert torch.equal(a["x"], b["x"]) and a["y"] == b["y"] and a["x"].shape == (3, 4, 16, 16)
    assert float(a["x"].min()) >= -1 and float(a["x"].max()) <= 1
    assert not torch.equal(a["x"][:, 0], a["x"][:, 1])  # the shape moves
    assert not torch.equal(dm.val_set[3]["x"], a["x"])
    batch = next(iter(dm.predict_dataloader()))
    assert batch["y"].tolist() == [0, 1, 2, 3, 4, 5, 0, 1] and dm.sample_shape == (3, 4, 16, 16)
    with pytest.raises(ValueError, match="num_classes"):
        SyntheticVideoDataModule(num_classes=9)


def test_folder_data_images_videos_latents(tmp_path):
    from PIL import Image
    from safetensors.torch import save_file

    for cls in ("cats", "dogs"):
        (tmp_path / "img" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.random.randint(0, 255, (20, 30, 3), dtype=np.uint8)).save(
                tmp_path / "img" / cls / f"{i}.png")
    dm = FolderDataModule(str(tmp_path / "img"), size=16, val_fraction=0.3)
    assert dm.num_classes == 2 and dm.sample_shape == (3, 1, 16, 16)
    assert len(dm.train_set) + len(dm.val_set) == 6 and len(dm.val_set) >= 1
    assert {dm.train_set[i]["y"] for i in range(len(dm.train_set))} <= {0, 1}

    (tmp_path / "vid").mkdir()
    frames = [Image.fromarray(np.full((12, 12, 3), 40 * i, dtype=np.uint8)) for i in range(5)]
    frames[0].save(tmp_path / "vid" / "a.gif", save_all=True, append_images=frames[1:])
    np.save(tmp_path / "vid" / "b.npy", np.zeros((6, 12, 12, 3), dtype=np.uint8))
    dm = FolderDataModule(str(tmp_path / "vid"), size=8, frames=4, val_fraction=0.0)
    assert dm.sample_shape == (3, 4, 8, 8) and len(dm.train_set) == 2

    (tmp_path / "lat").mkdir()
    save_file({"latent": torch.randn(4, 2, 8, 8), "label": torch.tensor(1)}, str(tmp_path / "lat" / "a.safetensors"))
    torch.save({"latent": torch.randn(4, 2, 8, 8)}, tmp_path / "lat" / "b.pt")
    dm = FolderDataModule(str(tmp_path / "lat"), val_fraction=0.0)
    items = sorted((dm.train_set[i]["y"], tuple(dm.train_set[i]["x"].shape)) for i in range(2))
    assert items == [(-1, (4, 2, 8, 8)), (1, (4, 2, 8, 8))]

    with pytest.raises(FileNotFoundError, match="not a folder"):
        FolderDataModule(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="data.size"):
        FolderDataModule(str(tmp_path / "img"))


def test_write_samples_png_gif_and_latents(tmp_path):
    from PIL import Image

    png = write_samples(torch.rand(4, 3, 1, 8, 8) * 2 - 1, tmp_path / "img")
    gif = write_samples(torch.rand(3, 1, 5, 8, 8) * 2 - 1, tmp_path / "vid")
    pt = write_samples(torch.rand(2, 4, 2, 8, 8), tmp_path / "lat")
    assert (png.suffix, gif.suffix, pt.suffix) == (".png", ".gif", ".pt")
    with Image.open(gif) as im:
        assert im.n_frames == 5
    assert not list(tmp_path.glob("*.tmp"))


def test_sparsity_ramp():
    ramp = VSASparsityRamp(rate=0.25, every_n_steps=10)
    assert [ramp.sparsity_at(s, 0.875) for s in (0, 9, 10, 25, 30, 40, 1000)] == [0, 0, 0.25, 0.5, 0.75, 0.875, 0.875]
    with pytest.raises(ValueError, match="every_n_steps"):
        VSASparsityRamp(every_n_steps=0)
