"""Image data sets for diffusion training: synthetic shapes, a user's folder, CIFAR-10.

Every data set yields ``(image in [-1, 1] of shape (C, H, W), label)`` and reports
``num_classes`` (0 when unlabelled), ``channels`` and ``resolution``. Images are held in one
uint8 tensor (these are small sets; large ones belong in latent mode or a real loader), which
also gives the content hash that latent and FID-reference caches are keyed by.
"""
from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from harness import UserError

from .text import maybe_captioned

SPLITS = ("train", "val")


def cache_root(cache_dir: str | None = None) -> Path:
    """Where encoded latents and reference statistics live: option, $HARNESS_CACHE, ~/.cache."""
    root = cache_dir or os.environ.get("HARNESS_CACHE") or Path.home() / ".cache" / "harness"
    return Path(root)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise UserError(f"dataset split {split!r} is not known; expected one of {', '.join(SPLITS)}")


class ImageTensorDataset(torch.utils.data.Dataset):
    """uint8 images (N, C, H, W) and labels (N,), served as floats in [-1, 1]."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int, name: str):
        self.images, self.labels = images, labels
        self.num_classes, self.name = num_classes, name
        self.channels, self.resolution = images.shape[1], images.shape[-1]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i].float() / 127.5 - 1.0, int(self.labels[i])

    def uint8_images(self) -> torch.Tensor:
        """(N, 3, H, W) uint8: what FID feature extractors take as reference images."""
        return self.images if self.channels == 3 else self.images[:, :1].expand(-1, 3, -1, -1)

    @property
    def content_hash(self) -> str:
        h = hashlib.sha256()
        h.update(self.images.numpy().tobytes())
        h.update(self.labels.numpy().tobytes())
        return h.hexdigest()[:16]


# -- shapes -------------------------------------------------------------------------------
# Ten classes: five outlines at two sizes. Colour, position, rotation and background texture
# vary per image, so a model must learn the shape and size from the label to denoise well.
SHAPES = ("circle", "square", "triangle", "diamond", "cross")


def _shape_mask(kind: str, u: torch.Tensor, v: torch.Tensor, r: float) -> torch.Tensor:
    if kind == "circle":
        return u ** 2 + v ** 2 <= r ** 2
    if kind == "square":
        return (u.abs() <= r * 0.85) & (v.abs() <= r * 0.85)
    if kind == "triangle":
        return (v <= r * 0.7) & (v >= -r + 1.7 * u.abs())
    if kind == "diamond":
        return u.abs() + v.abs() <= r
    return ((u.abs() <= r * 0.3) & (v.abs() <= r)) | ((v.abs() <= r * 0.3) & (u.abs() <= r))


def _render_shape(label: int, resolution: int, gen: torch.Generator) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, resolution), torch.linspace(-1, 1, resolution), indexing="ij")
    # Background: a random linear gradient plus a sine texture of random frequency.
    c0, c1 = torch.rand(3, 1, 1, generator=gen), torch.rand(3, 1, 1, generator=gen)
    ang, freq = torch.rand(2, generator=gen) * torch.tensor([np.pi, 6.0]) + torch.tensor([0.0, 2.0])
    ramp = (xs * torch.cos(ang) + ys * torch.sin(ang) + 1) / 2
    img = (c0 * (1 - ramp) + c1 * ramp) * 0.6 + 0.1 * torch.sin(freq * np.pi * (xs - ys))
    # Foreground: shape kind from the label, size from the label's half, random pose and colour.
    kind, large = SHAPES[label % len(SHAPES)], label >= len(SHAPES)
    r = (0.55 if large else 0.3) * (0.9 + 0.2 * torch.rand((), generator=gen).item())
    cx, cy = ((torch.rand(2, generator=gen) * 2 - 1) * (0.9 - r)).tolist()
    rot = torch.rand((), generator=gen).item() * 2 * np.pi
    u = (xs - cx) * np.cos(rot) + (ys - cy) * np.sin(rot)
    v = -(xs - cx) * np.sin(rot) + (ys - cy) * np.cos(rot)
    mask = _shape_mask(kind, u, v, r)
    colour = torch.rand(3, 1, 1, generator=gen) * 0.6 + 0.4
    img = torch.where(mask, colour.expand_as(img), img)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


def shapes(*, resolution: int = 32, split: str = "train", seed: int = 0, size: int | None = None,
           num_classes: int = 10, vae: str | None = None, cache_dir: str | None = None,
           captions: bool = False, text_encoder: str | None = None):
    """Synthetic coloured shapes on textured backgrounds: 10 classes, any resolution, seeded.
    ``captions`` ("a large circle") with ``text_encoder`` serve text-conditioned U-Nets."""
    _check_split(split)
    if not 1 <= num_classes <= 2 * len(SHAPES):
        raise UserError(f"shapes: num_classes must be 1..{2 * len(SHAPES)}, got {num_classes}")
    if resolution < 8:
        raise UserError(f"shapes: resolution must be at least 8, got {resolution}")
    n = size if size is not None else (2000 if split == "train" else 256)
    images, labels = _render_shapes(resolution, split, seed, n, num_classes)
    ds = ImageTensorDataset(images, labels, num_classes, f"shapes-{split}")
    texts = [shape_caption(int(y)) for y in labels] if captions else None
    return maybe_captioned(_maybe_latent(ds, vae, cache_dir), texts, text_encoder, "shapes")


def shape_caption(label: int) -> str:
    return f"a {'large' if label >= len(SHAPES) else 'small'} {SHAPES[label % len(SHAPES)]}"


@lru_cache(maxsize=8)  # every cell of a suite asks for the same set; render it once per process
def _render_shapes(resolution: int, split: str, seed: int, n: int, num_classes: int):
    # Each image draws from its own generator keyed by (seed, split, index): the set is the
    # same whatever its size, and the held-out split never repeats a training image.
    from harness import derive_seed

    labels = torch.arange(n) % num_classes
    images = torch.stack([_render_shape(int(labels[i]), resolution,
                                        torch.Generator().manual_seed(derive_seed(seed, "shapes", split, i)))
                          for i in range(n)])
    return images, labels


# -- image folder ---------------------------------------------------------------------------
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def center_crop(img: Image.Image, resolution: int) -> Image.Image:
    """ADM/DiT preprocessing: halve with BOX while large, resize the short side with BICUBIC,
    then crop the centre square."""
    while min(img.size) >= 2 * resolution:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = resolution / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)
    left, top = (img.size[0] - resolution) // 2, (img.size[1] - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def image_folder(*, resolution: int = 32, split: str = "train", seed: int = 0, root: str = "",
                 val_fraction: float = 0.1, vae: str | None = None, cache_dir: str | None = None,
                 captions: bool = False, text_encoder: str | None = None):
    """A folder of images: one sub-folder per class, or unlabelled; ADM-style centre crop.
    ``captions``: each image's caption is the text file beside it (``cat.png`` -> ``cat.txt``),
    encoded by ``text_encoder`` (a pipeline's hub id or folder) for text-conditioned U-Nets."""
    _check_split(split)
    base = Path(root).expanduser()
    if not root or not base.is_dir():
        raise UserError(f"image-folder: root {root!r} is not a folder; give data.root: /path/to/images")
    if not 0 < val_fraction < 1:
        raise UserError(f"image-folder: val_fraction must be between 0 and 1, got {val_fraction}")
    classes = sorted(d.name for d in base.iterdir() if d.is_dir())
    files = sorted(p for p in base.rglob("*") if p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise UserError(f"image-folder: no images ({', '.join(IMAGE_EXTS)}) under {base}")
    labelled = bool(classes) and all(p.parent != base for p in files)
    # A fixed permutation (seed) decides the held-out images, so both splits agree on it.
    perm = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(len(files) * val_fraction))
    chosen = sorted(perm[:n_val] if split == "val" else perm[n_val:])
    images, labels = [], []
    from harness import open_regular

    for i in chosen:
        # open_regular: a FIFO named like an image would block forever, a device never end
        with open_regular(files[i], "image-folder: image") as fh, Image.open(fh) as img:
            arr = np.asarray(center_crop(img.convert("RGB"), resolution))
        images.append(torch.from_numpy(arr.copy()).permute(2, 0, 1))
        labels.append(classes.index(files[i].relative_to(base).parts[0]) if labelled else 0)
    ds = ImageTensorDataset(torch.stack(images), torch.tensor(labels), len(classes) if labelled else 0,
                            f"image-folder-{split}")
    texts = [_sidecar_caption(files[i]) for i in chosen] if captions else None
    return maybe_captioned(_maybe_latent(ds, vae, cache_dir), texts, text_encoder, "image-folder")


def _sidecar_caption(image: Path) -> str:
    text = image.with_suffix(".txt")
    if not text.is_file():
        raise UserError(f"image-folder: captions: true, but {text} (the caption of {image.name}) is missing")
    return text.read_text().strip()


# -- CIFAR-10 ---------------------------------------------------------------------------------
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


def cifar10(*, resolution: int = 32, split: str = "train", seed: int = 0, root: str | None = None,
            download: bool = True, vae: str | None = None, cache_dir: str | None = None):
    """CIFAR-10 via torchvision (train: 50k, val: the 10k test set); downloads where online."""
    _check_split(split)
    from torchvision.datasets import CIFAR10

    where = Path(root or os.environ.get("HARNESS_DATA") or cache_root(cache_dir) / "data").expanduser()
    try:
        tv = CIFAR10(str(where), train=split == "train", download=False)
    except RuntimeError:
        if not download:
            raise UserError(f"cifar10: no data under {where / 'cifar-10-batches-py'}; download {CIFAR_URL}, "
                            f"extract it in {where} (or set data.root / $HARNESS_DATA)") from None
        from harness import network_timeout

        try:
            with network_timeout():  # torchvision's urlopen has no timeout: a stalled server must not hang the cell
                tv = CIFAR10(str(where), train=split == "train", download=True)
        except Exception as exc:  # offline, or timed out: urllib errors of several kinds
            raise UserError(f"cifar10: cannot download ({type(exc).__name__}) and no data under "
                            f"{where / 'cifar-10-batches-py'}; fetch {CIFAR_URL} and extract it in {where} "
                            "(or set data.root / $HARNESS_DATA)") from None
    images = torch.from_numpy(tv.data).permute(0, 3, 1, 2).contiguous()
    if resolution != images.shape[-1]:
        images = torch.nn.functional.interpolate(images.float(), size=resolution, mode="bicubic",
                                                 antialias=True).clamp(0, 255).round().to(torch.uint8)
    ds = ImageTensorDataset(images, torch.tensor(tv.targets), 10, f"cifar10-{split}")
    return _maybe_latent(ds, vae, cache_dir)


def _maybe_latent(ds: ImageTensorDataset, vae: str | None, cache_dir: str | None):
    if not vae:
        return ds
    from .latents import LatentDataset

    return LatentDataset(ds, vae, cache_root(cache_dir))
