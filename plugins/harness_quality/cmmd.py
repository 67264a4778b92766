"""CMMD (Jayasumana et al. 2024, "Rethinking FID: Towards a Better Evaluation Metric for Image
Generation"): the maximum mean discrepancy of CLIP image embeddings.

The definition is google-research's ``cmmd`` (``distance.py``, ``embedding.py``), which the
paper's figures come from:

- embeddings: CLIP ViT-L/14 at 336 px (``vit_l14_336px``), the projected image embedding
  normalised to unit length (scenic's ``encode_image`` normalises by default); here
  ``openai/clip-vit-large-patch14-336`` through transformers' ``CLIPVisionModelWithProjection``
  and its ``CLIPImageProcessor`` (bicubic resize to 336, centre crop, CLIP's mean and std);
- kernel: Gaussian RBF ``k(a, b) = exp(-|a - b|^2 / (2 sigma^2))`` with sigma = 10;
- estimator: ``1000 * (mean k(x, x') + mean k(y, y') - 2 mean k(x, y))``, every mean over *all*
  pairs, the diagonal (k(x, x) = 1) included. Their ``mmd`` says so ("the minimum-variance/biased
  version of the estimator described in Eq. (5)" of Gretton et al. 2012): not the unbiased
  estimator, which leaves the diagonal out. So CMMD(x, x) is exactly 0 and a figure is never
  negative up to rounding.

Their squared distances are ``-2 a.b + |a|^2 + |b|^2`` (not clipped at 0) and so are ours; the
means are taken over blocks of rows and columns, so 50,000 embeddings never need a 50,000^2
matrix. Differences from their tool, none in the formula: they drop the images of a last
incomplete batch (for TPU batching) and we keep every image; they centre-crop non-square images
before resizing where the processor resizes the short side and then crops (the same pixels for
square images, the usual case).
"""
from __future__ import annotations

import hashlib
import json
import sys
from functools import lru_cache
from pathlib import Path
from typing import Iterable, NamedTuple, Optional

import numpy as np
import torch

SIGMA = 10.0      # google-research cmmd/distance.py _SIGMA
SCALE = 1000.0    # ... _SCALE
DEFAULT_MODEL = "openai/clip-vit-large-patch14-336"
BLOCK = 4096      # rows and columns per kernel block: 4096^2 float64 is 128 MiB
VERSION = 1       # in every cache key: bump when what an entry holds changes


def _kernel_mean(a: np.ndarray, b: np.ndarray, gamma: float, block: int) -> float:
    """mean over all (i, j) of exp(-gamma * |a_i - b_j|^2), summed block by block."""
    a_sq, b_sq = (a * a).sum(1), (b * b).sum(1)
    total = 0.0
    for r in range(0, len(a), block):
        for c in range(0, len(b), block):
            d = -2 * (a[r:r + block] @ b[c:c + block].T) + a_sq[r:r + block, None] + b_sq[None, c:c + block]
            total += np.exp(-gamma * d).sum()
    return total / (len(a) * len(b))


def mmd(x: np.ndarray, y: np.ndarray, sigma: float = SIGMA, scale: float = SCALE, block: int = BLOCK) -> float:
    """``scale`` x the squared MMD of embeddings ``x`` (n, d) and ``y`` (m, d) under a Gaussian
    kernel of bandwidth ``sigma``: google-research's biased estimator (diagonals included).
    Computed in float64; the two sets may differ in size."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or not len(x) or not len(y):
        raise ValueError(f"cmmd needs two non-empty (N, D) embedding arrays of one width, got {x.shape} and "
                         f"{y.shape}")
    if not sigma > 0 or block < 1:
        raise ValueError(f"cmmd needs sigma > 0 and block >= 1, got sigma={sigma}, block={block}")
    gamma = 1.0 / (2.0 * sigma ** 2)
    # each term on its own arguments, even when x is y: then the figure is exactly 0
    k_xx, k_yy, k_xy = _kernel_mean(x, x, gamma, block), _kernel_mean(y, y, gamma, block), \
        _kernel_mean(x, y, gamma, block)
    return float(scale * (k_xx + k_yy - 2 * k_xy))


# -- CLIP embeddings ------------------------------------------------------------------------------
class ClipFeatures(NamedTuple):
    clip: np.ndarray   # (N, D) float32, unit rows (768 for ViT-L/14)


class ClipEmbedder:
    """A CLIP vision tower with its projection, and its image processor, from a hub id or a
    folder; ``embedder(images)`` maps (B, H, W, 3) uint8 to unit-length (B, D) float32 rows."""

    def __init__(self, source: str, model, processor):
        self.source, self.model, self.processor = source, model.eval().requires_grad_(False), processor
        self._identity: Optional[str] = None

    @property
    def identity(self) -> str:
        """What the cache keys use: a hash of the weights and of the preprocessing, so another
        checkpoint, or the same one under another name, never reads a stale entry."""
        if self._identity is None:
            h = hashlib.sha256()
            h.update(json.dumps(self.processor.to_dict(), sort_keys=True, default=str).encode())
            with torch.no_grad():
                for name, t in sorted(self.model.state_dict().items()):
                    h.update(name.encode())
                    h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            self._identity = f"clip-{h.hexdigest()[:16]}"
        return self._identity

    @property
    def dim(self) -> int:
        return int(self.model.config.projection_dim)

    @torch.inference_mode()
    def __call__(self, images: np.ndarray, batch_size: int = 32, device="cpu") -> np.ndarray:
        model = self.model.to(device)
        out = []
        for s in range(0, len(images), batch_size):
            chunk = [np.array(im, dtype=np.uint8) for im in images[s:s + batch_size]]  # a copy: maps are read-only
            pixels = self.processor(images=chunk, return_tensors="pt")["pixel_values"].to(device)
            emb = model(pixel_values=pixels.to(next(model.parameters()).dtype)).image_embeds.float()
            out.append((emb / emb.norm(dim=-1, keepdim=True)).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)


@lru_cache(maxsize=2)  # the sample stage and the metric of one cell load it once
def load_embedder(source: str = DEFAULT_MODEL) -> ClipEmbedder:
    """The CLIP vision model and image processor at ``source`` (hub id or local folder); offline
    without them, MetricUnavailable with the reason, as pickscore and clip_score report it."""
    from transformers import AutoConfig, CLIPImageProcessor, CLIPVisionModelWithProjection

    from harness_t2i import load_pretrained

    config = found = load_pretrained("CLIP vision model", AutoConfig.from_pretrained, source)
    if getattr(found, "model_type", None) == "clip":
        # A whole CLIP repository (the paper's model is one): its vision tower and projection are
        # read from it, and the projection's width is the top-level projection_dim, which the
        # vision sub-config need not carry (its own default, 512, would misshape the projection).
        config = found.vision_config
        config.projection_dim = found.projection_dim
    model = load_pretrained("CLIP vision model",
                            lambda s: CLIPVisionModelWithProjection.from_pretrained(s, config=config), source)
    processor = load_pretrained("CLIP image processor", CLIPImageProcessor.from_pretrained, source)
    return ClipEmbedder(source, model, processor)


def embed_batches(embedder: ClipEmbedder, batches: Iterable[np.ndarray], *, device="cpu", batch_size: int = 32,
                  progress=None) -> ClipFeatures:
    """Embeddings of every image in ``batches`` (each (B, H, W, 3) uint8), in order."""
    out = []
    for batch in batches:
        out.append(embedder(batch, batch_size=batch_size, device=device))
        if progress is not None:
            progress(len(batch))
    if not out:
        raise ValueError("no images to embed")
    return ClipFeatures(np.concatenate(out))


def cached_embeddings(source, embedder: ClipEmbedder, *, cache: Path, device="cpu",
                      batch_size: int = 32) -> np.ndarray:
    """The CLIP embeddings of the images of ``source`` (a :class:`harness_quality.evaluate.Source`:
    a folder or an ADM npz; the reference, or a cell's kept samples), cached by the images'
    content and the model's identity as ``.safetensors`` with a digest (:func:`harness.save_cache`):
    a torn or altered entry is computed again, and every cell naming the same reference embeds it once."""
    from harness import load_cache, save_cache

    path = Path(cache) / f"{source.content_key()}-{source.count}-{embedder.identity}-v{VERSION}.safetensors"
    entry = load_cache(path)
    if entry is not None and "clip" in entry and len(entry["clip"]) == source.count:
        return entry["clip"].numpy()
    step = max(1, source.count // 20)

    def tick(n, done=[0]):  # noqa: B006 - a counter local to this call
        done[0] += n
        if done[0] % step < n or done[0] == source.count:
            print(f"cmmd: CLIP embeddings of {source.arg} {done[0]}/{source.count}", file=sys.stderr, flush=True)

    got = embed_batches(embedder, source.batches(0, source.count, batch_size), device=device,
                        batch_size=batch_size, progress=tick).clip
    save_cache(path, {"clip": torch.from_numpy(got)}, what=f"the CMMD embedding cache {path.name}")
    return got
