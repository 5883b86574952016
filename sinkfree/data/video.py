"""Images and videos for diffusion: `SyntheticVideoDataModule` (procedural moving shapes, no download) and
`FolderDataModule` (a folder of images, GIF/.npy videos, or precomputed latents).

Every batch is `{"x": FloatTensor (B, C, T, H, W), "y": LongTensor (B,)}`; pixels are in [-1, 1], images
have T = 1 and `y` is -1 where there is no label. `sample_shape` (C, T, H, W) tells the sampler what to draw.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Optional

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

SHAPES = ("square", "disc", "triangle", "ring", "cross", "diamond")
PALETTE = torch.tensor([[1.0, 0.25, 0.2], [0.2, 0.8, 0.3], [0.25, 0.45, 1.0], [1.0, 0.85, 0.2],
                        [0.9, 0.3, 0.9], [0.2, 0.9, 0.9]])
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
VIDEO_SUFFIXES = (".gif", ".npy")
LATENT_SUFFIXES = (".safetensors", ".pt")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def shape_mask(kind: int, dx: torch.Tensor, dy: torch.Tensor, r: float) -> torch.Tensor:
    """Bool mask of shape `SHAPES[kind]` of radius r from offsets dx, dy to its centre."""
    ax, ay = dx.abs(), dy.abs()
    name = SHAPES[kind]
    if name == "square":
        return torch.maximum(ax, ay) <= r * 0.85
    if name == "disc":
        return dx * dx + dy * dy <= r * r
    if name == "triangle":  # apex up
        return (dy <= r * 0.8) & (dy >= -r) & (ax <= (dy + r) * 0.6)
    if name == "ring":
        d2 = dx * dx + dy * dy
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    if name == "cross":
        return ((ax <= r / 3) & (ay <= r)) | ((ay <= r / 3) & (ax <= r))
    return ax + ay <= r  # diamond


def _bounce(p0: torch.Tensor, v: torch.Tensor, t: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Positions at times t of a point moving at speed v from p0, reflected inside [lo, hi]."""
    span = max(hi - lo, 1e-6)
    u = torch.remainder(p0 - lo + v * t, 2 * span)
    return lo + torch.where(u <= span, u, 2 * span - u)


def moving_shape(index: int, seed: int, frames: int, size: int, channels: int, num_classes: int,
                 max_speed: float) -> tuple[torch.Tensor, int]:
    """One seeded clip (C, T, size, size) in [-1, 1]: a shape of class `index`'s label, random colour, size and
    position, moving at constant velocity and bouncing off the borders, on a dark background."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    label = int(torch.randint(num_classes, (1,), generator=g))
    colour = PALETTE[int(torch.randint(len(PALETTE), (1,), generator=g))]
    r = size * (0.16 + 0.1 * float(torch.rand(1, generator=g)))
    p0 = r + torch.rand(2, generator=g) * (size - 2 * r)
    angle = float(torch.rand(1, generator=g)) * 2 * math.pi
    speed = max_speed * (0.5 + 0.5 * float(torch.rand(1, generator=g)))
    v = torch.tensor([math.cos(angle), math.sin(angle)]) * speed
    t = torch.arange(frames, dtype=torch.float32)
    cx = _bounce(p0[0], v[0], t, r, size - 1 - r)
    cy = _bounce(p0[1], v[1], t, r, size - 1 - r)
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    mask = shape_mask(label, xx - cx[:, None, None], yy - cy[:, None, None], r).float()  # (T, H, W)
    background = torch.full((3,), 0.1)
    rgb = background[:, None, None, None] + (colour - background)[:, None, None, None] * mask  # (3, T, H, W)
    x = rgb.mean(0, keepdim=True) if channels == 1 else rgb
    return x * 2 - 1, label


class SyntheticVideos(Dataset):
    """`length` seeded clips of moving shapes; item i is always the same clip."""

    def __init__(self, length: int, seed: int, frames: int, size: int, channels: int, num_classes: int,
                 max_speed: float):
        self.length, self.args = length, (seed, frames, size, channels, num_classes, max_speed)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        x, y = moving_shape(i, *self.args)
        return {"x": x, "y": y}


class _PredictItems(Dataset):
    """Labels and seeds for `predict`: item i has label i % num_classes (or -1) and seed seed + i."""

    def __init__(self, n: int, num_classes: int, seed: int):
        self.n, self.num_classes, self.seed = n, num_classes, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"y": i % self.num_classes if self.num_classes else -1, "seed": self.seed + i}


class _DiffusionData(L.LightningDataModule):
    """Loaders shared by the diffusion data modules (train shuffled, validation fixed, predict labels)."""

    train_set: Dataset
    val_set: Dataset
    num_classes: int = 0

    def __init__(self, batch_size: int, num_workers: int, predict_samples: int, seed: int):
        super().__init__()
        _check(batch_size >= 1, f"data.batch_size: must be at least 1, got {batch_size}")
        _check(num_workers >= 0, f"data.num_workers: must be >= 0, got {num_workers}")
        _check(predict_samples >= 1, f"data.predict_samples: must be at least 1, got {predict_samples}")
        self.batch_size, self.num_workers = batch_size, num_workers
        self.predict_samples, self.seed = predict_samples, seed

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True, generator=g,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        """One batch of `predict_samples` labels (cycling through the classes) and seeds: one grid."""
        items = _PredictItems(self.predict_samples, self.num_classes, self.seed)
        return DataLoader(items, batch_size=self.predict_samples)

    def probe_batch(self, num_sequences: int = 8, seq_len: Optional[int] = None) -> dict:
        """The sink probe's fixed clean batch {"x": (N, C, T, H, W), "y": (N,)}: the first `num_sequences`
        validation items (training items when there is no validation split), cycling when there are fewer;
        deterministic. `seq_len` is ignored: the clips keep their training shape. The task noises them
        (`RectifiedFlow.probe_inputs`)."""
        items = self.val_set if len(self.val_set) else self.train_set
        _check(num_sequences >= 1 and len(items) >= 1, f"probe_batch: num_sequences={num_sequences} must be "
               f">= 1 and the data must hold an item")
        picked = [items[i % len(items)] for i in range(num_sequences)]
        return {"x": torch.stack([p["x"] for p in picked]),
                "y": torch.tensor([int(p["y"]) for p in picked], dtype=torch.long)}


class SyntheticVideoDataModule(_DiffusionData):
    """Procedurally generated, seeded clips (or images with frames=1) of one moving shape each: the label is
    the shape (square, disc, triangle, ring, cross, diamond), colour, size, start and velocity are random and
    the shape bounces off the borders. Learnable structure, no download; item i is the same on every run.

    Args:
        frames: Frames per clip (1 = images).
        size: Height and width in pixels.
        channels: 3 (RGB) or 1 (grey).
        num_classes: Shape classes used (1 to 6); the label `y` is the shape.
        max_speed: Largest speed in pixels per frame.
        train_size: Clips per training epoch.
        val_size: Clips in the fixed validation set (generated with a different seed).
        batch_size: Clips per batch (per device).
        num_workers: DataLoader worker processes (0 = load in the main process).
        seed: Seed of the clips and of the training shuffle.
        predict_samples: `predict` only: clips drawn in one sample grid.
    """

    def __init__(self, frames: int = 8, size: int = 32, channels: int = 3, num_classes: int = 6,
                 max_speed: float = 2.0, train_size: int = 100_000, val_size: int = 256, batch_size: int = 16,
                 num_workers: int = 0, seed: int = 0, predict_samples: int = 8):
        super().__init__(batch_size, num_workers, predict_samples, seed)
        _check(frames >= 1 and size >= 4, f"data: frames={frames} must be >= 1 and size={size} >= 4")
        _check(channels in (1, 3), f"data.channels: must be 1 or 3, got {channels}")
        _check(1 <= num_classes <= len(SHAPES), f"data.num_classes: must be 1 to {len(SHAPES)}, got {num_classes}")
        _check(train_size >= batch_size and val_size >= 1,
               f"data: train_size={train_size} must be >= batch_size and val_size={val_size} >= 1")
        self.save_hyperparameters()
        self.num_classes = num_classes
        args = (frames, size, channels, num_classes, max_speed)
        self.train_set = SyntheticVideos(train_size, seed, *args)
        self.val_set = SyntheticVideos(val_size, seed + 7919, *args)  # disjoint seeds from training
        self.sample_shape = (channels, frames, size, size)


def _resize_crop(img, size: int):
    """PIL image -> RGB, shorter side resized to `size`, centre-cropped to size x size."""
    from PIL import Image

    img = img.convert("RGB")
    scale = size / min(img.size)
    img = img.resize((max(size, round(img.width * scale)), max(size, round(img.height * scale))), Image.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return img.crop((left, top, left + size, top + size))


def _pixels(frames: list, size: Optional[int]) -> torch.Tensor:
    """List of PIL frames or HWC uint8 arrays -> (3, T, H, W) in [-1, 1]."""
    from PIL import Image

    arrays = []
    for f in frames:
        if isinstance(f, np.ndarray):
            f = Image.fromarray(f.astype(np.uint8))
        f = _resize_crop(f, size) if size else f.convert("RGB")
        arrays.append(np.asarray(f, dtype=np.float32))
    x = torch.from_numpy(np.stack(arrays)).permute(3, 0, 1, 2)  # (3, T, H, W)
    return x / 127.5 - 1


def load_latent(path: Path) -> tuple[torch.Tensor, int]:
    """A latent file -> ((C, T, H, W) float, label or -1): `.safetensors` with tensor `latent` (and optional
    `label`), or `.pt` holding a tensor or a dict {"latent": tensor, "label": int}. (C, H, W) means T = 1."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        data = load_file(str(path))
    else:
        data = torch.load(path, map_location="cpu", weights_only=True)
        data = data if isinstance(data, dict) else {"latent": data}
    _check("latent" in data, f"{path}: no tensor named 'latent' (keys: {sorted(data)})")
    x = data["latent"].float()
    x = x.unsqueeze(1) if x.dim() == 3 else x
    _check(x.dim() == 4, f"{path}: latent must be (C, T, H, W) or (C, H, W), got {tuple(x.shape)}")
    label = data.get("label", -1)
    return x, int(label.item() if torch.is_tensor(label) else label)


class FolderFiles(Dataset):
    """Files of one kind from a folder: images, videos (.gif, or .npy uint8 (T, H, W, 3)) or latents."""

    def __init__(self, files: list[Path], labels: list[int], kind: str, size: Optional[int],
                 frames: Optional[int], frame_stride: int):
        self.files, self.labels, self.kind = files, labels, kind
        self.size, self.frames, self.stride = size, frames, frame_stride

    def __len__(self) -> int:
        return len(self.files)

    def _video_frames(self, path: Path) -> list:
        if path.suffix == ".npy":
            arr = np.load(path)
            _check(arr.ndim == 4 and arr.shape[-1] == 3, f"{path}: a .npy video must be uint8 (T, H, W, 3)")
            frames = list(arr)
        else:
            from PIL import Image, ImageSequence

            with Image.open(path) as im:
                frames = [f.convert("RGB") for f in ImageSequence.Iterator(im)]
        frames = frames[::self.stride]
        if self.frames:
            _check(len(frames) >= self.frames, f"{path}: {len(frames)} frames (stride {self.stride}) but "
                   f"data.frames={self.frames}")
            frames = frames[:self.frames]
        return frames

    def __getitem__(self, i: int) -> dict:
        path = self.files[i]
        label = self.labels[i]
        if self.kind == "latents":
            x, file_label = load_latent(path)
            label = file_label if file_label >= 0 else label
        elif self.kind == "images":
            from PIL import Image

            with Image.open(path) as im:
                x = _pixels([im], self.size)
        else:
            x = _pixels(self._video_frames(path), self.size)
        return {"x": x, "y": label}


class FolderDataModule(_DiffusionData):
    """A folder of training data for real use, one item per file (formats in docs/dit.md):

    - images: .png/.jpg/.jpeg/.bmp/.webp, resized (shorter side) and centre-cropped to `size`, T = 1;
    - videos: .gif, or .npy uint8 (T, H, W, 3); every `frame_stride`-th frame, the first `frames` of them;
    - latents: .safetensors with a tensor `latent` (C, T, H, W) or (C, H, W) (and optional int `label`), or
      .pt with a tensor or {"latent": ..., "label": ...}; used as stored (apply the VAE scaling before).
    Files in sub-folders `path/<class name>/...` get labels by sorted class name; otherwise `y` is -1.

    Args:
        path: The folder (searched recursively).
        kind: images, videos, latents, or auto (the kind of the first file found).
        size: Images/videos: output height and width (required for them; every item must share a shape).
        frames: Videos: frames per clip (None = all; then every clip must have the same length).
        frame_stride: Videos: keep every n-th frame.
        val_fraction: Fraction of files (chosen by hashing their paths) held out for validation.
        batch_size: Items per batch (per device).
        num_workers: DataLoader worker processes.
        seed: Seed of the training shuffle and of the predict noise.
        predict_samples: `predict` only: items drawn in one sample grid.
    """

    def __init__(self, path: str, kind: str = "auto", size: Optional[int] = None, frames: Optional[int] = None,
                 frame_stride: int = 1, val_fraction: float = 0.05, batch_size: int = 16, num_workers: int = 0,
                 seed: int = 0, predict_samples: int = 8):
        super().__init__(batch_size, num_workers, predict_samples, seed)
        root = Path(path).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"data.path={path!r} is not a folder")
        _check(kind in ("auto", "images", "videos", "latents"),
               f"data.kind: must be auto, images, videos or latents, got {kind!r}")
        _check(0.0 <= val_fraction < 1.0, f"data.val_fraction: must be in [0, 1), got {val_fraction}")
        _check(frame_stride >= 1, f"data.frame_stride: must be >= 1, got {frame_stride}")
        suffixes = {"images": IMAGE_SUFFIXES, "videos": VIDEO_SUFFIXES, "latents": LATENT_SUFFIXES}
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in sum(suffixes.values(), ()))
        if kind == "auto" and files:
            kind = next(k for k, s in suffixes.items() if files[0].suffix.lower() in s)
        files = [p for p in files if kind != "auto" and p.suffix.lower() in suffixes[kind]]
        if not files:
            raise FileNotFoundError(f"data.path={path!r}: no {kind if kind != 'auto' else ''} files "
                                    f"({', '.join(sum(suffixes.values(), ()))}) found")
        _check(kind == "latents" or size is not None, f"data.size: needed for {kind} (output height and width)")
        classes = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})
        index = {c: i for i, c in enumerate(classes)}
        labels = [index.get(p.relative_to(root).parts[0], -1) if len(p.relative_to(root).parts) > 1 else -1
                  for p in files]
        self.num_classes = len(classes)

        def is_val(p: Path) -> bool:
            h = int(hashlib.sha1(str(p.relative_to(root)).encode()).hexdigest()[:8], 16)
            return h / 2**32 < val_fraction

        split = [is_val(p) for p in files]
        if val_fraction > 0 and not any(split) and len(files) > 1:
            split[-1] = True  # at least one validation file
        args = (kind, size, frames, frame_stride)
        self.train_set = FolderFiles([f for f, v in zip(files, split) if not v],
                                     [y for y, v in zip(labels, split) if not v], *args)
        self.val_set = FolderFiles([f for f, v in zip(files, split) if v], [y for y, v in zip(labels, split) if v],
                                   *args)
        _check(len(self.train_set) >= 1, f"data.path={path!r}: no training files left after the validation split")
        self.sample_shape = tuple(self.train_set[0]["x"].shape)
