"""The formulas of the ADM evaluation suite, on feature arrays.

Dhariwal & Nichol's evaluator (openai/guided-diffusion, ``evaluations/evaluator.py``) is what
DiT, LaMamba-Diff and most class-conditional ImageNet papers report: FID, sFID, IS, and
Kynkäänniemi et al.'s (2019) improved precision and recall. This module holds the arithmetic
only, on NumPy arrays, so that each figure can be checked against its definition on small
hand-made inputs; the Inception features come from elsewhere.

- FID / sFID: Fréchet distance of Gaussians fitted with the mean and ``np.cov(rowvar=False)``;
  ``scipy.linalg.sqrtm`` of the covariance product, with ``eps`` added to both diagonals when
  that product is singular (the evaluator's fallback).
- IS: the class probabilities of each image, scored in consecutive splits of ``split_size``
  images (5,000 in the evaluator) as exp(mean KL(p(y|x) || p(y))), averaged over splits.
- Precision / recall (k = 3): a point's radius is the squared Euclidean distance to its k-th
  nearest *other* point of its own set; a point lies in the other set's manifold when its
  squared distance to some point there is at most that point's radius. Precision is the
  fraction of samples inside the reference manifold, recall the fraction of reference points
  inside the sample manifold. The evaluator computes distances in float16 and falls back to
  float32 when they overflow; we compute them in float32 throughout (``float64`` on request),
  so a point lying on a radius to within float16 rounding may be classed differently.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterator, NamedTuple, Optional

import numpy as np

from harness import UserError


class Statistics(NamedTuple):
    mu: np.ndarray
    sigma: np.ndarray


def statistics(features: np.ndarray) -> Statistics:
    """Mean and unbiased covariance of (N, D) features, as the evaluator fits them."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"statistics need (N >= 2, D) features, got shape {features.shape}")
    return Statistics(features.mean(axis=0), np.cov(features, rowvar=False))


def frechet_distance(a: Statistics, b: Statistics, eps: float = 1e-6) -> float:
    """||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^1/2)."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(a.mu).astype(np.float64), np.atleast_1d(b.mu).astype(np.float64)
    s1, s2 = np.atleast_2d(a.sigma).astype(np.float64), np.atleast_2d(b.sigma).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"statistics of different sizes: mean {mu1.shape} vs {mu2.shape}, "
                         f"covariance {s1.shape} vs {s2.shape}")
    diff = mu1 - mu2
    with np.errstate(all="ignore"), warnings.catch_warnings():  # singular: handled below, as the evaluator does
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"singular covariance product; adding {eps} to the diagonals", RuntimeWarning)
        offset = np.eye(len(s1)) * eps
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"matrix square root has an imaginary part of {np.abs(covmean.imag).max():.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def inception_score(probs: np.ndarray, split_size: int = 5000) -> float:
    """Mean over consecutive splits of exp(mean_x KL(p(y|x) || mean_x p(y|x)))."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or len(probs) == 0:
        raise ValueError(f"inception_score needs (N, classes) probabilities, got shape {probs.shape}")
    if split_size < 1:
        raise ValueError(f"split_size must be >= 1, got {split_size}")
    scores = []
    for start in range(0, len(probs), split_size):
        part = probs[start:start + split_size]
        marginal = part.mean(axis=0, keepdims=True)
        # 0 * log 0 = 0: a class an image rules out adds nothing to its divergence
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(marginal)), 0.0)
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores))


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) squared Euclidean distances, ||a||^2 - 2 a.b + ||b||^2, clipped at 0."""
    d = (a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None, :]
    return np.maximum(d, 0)


def _blocks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def manifold_radii(features: np.ndarray, k: int = 3, block: int = 10_000,
                   dtype=np.float32) -> np.ndarray:
    """Squared distance from each point to its k-th nearest other point of the same set."""
    x = np.asarray(features, dtype=dtype)
    if len(x) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} points per set, got {len(x)}")
    radii = np.empty(len(x), dtype=dtype)
    for rows in _blocks(len(x), block):
        d = np.concatenate([_squared_distances(x[rows], x[cols]) for cols in _blocks(len(x), block)], axis=1)
        # Position 0 of each sorted row is the point itself (distance 0), so position k is the
        # k-th nearest other point, as in the evaluator (duplicates count as neighbours).
        radii[rows] = np.partition(d, k, axis=1)[:, k]
    return radii


def _inside(points: np.ndarray, centres: np.ndarray, radii: np.ndarray, block: int) -> np.ndarray:
    """For each point: is it within the radius of at least one centre?"""
    inside = np.zeros(len(points), dtype=bool)
    for rows in _blocks(len(points), block):
        for cols in _blocks(len(centres), block):
            inside[rows] |= (_squared_distances(points[rows], centres[cols]) <= radii[cols][None, :]).any(axis=1)
    return inside


def precision_recall(reference: np.ndarray, samples: np.ndarray, k: int = 3, block: int = 10_000,
                     dtype=np.float32) -> tuple[float, float]:
    """(precision, recall) of ``samples`` against ``reference`` features, k-NN manifolds."""
    ref, smp = np.asarray(reference, dtype=dtype), np.asarray(samples, dtype=dtype)
    if ref.ndim != 2 or smp.ndim != 2 or ref.shape[1] != smp.shape[1]:
        raise ValueError(f"precision/recall need two (N, D) feature arrays of one width, got {ref.shape} "
                         f"and {smp.shape}")
    ref_radii, smp_radii = manifold_radii(ref, k, block, dtype), manifold_radii(smp, k, block, dtype)
    precision = _inside(smp, ref, ref_radii, block).mean()
    recall = _inside(ref, smp, smp_radii, block).mean()
    return float(precision), float(recall)


# -- ADM batches ---------------------------------------------------------------------------
class Batch(NamedTuple):
    """An ADM ``.npz`` batch: images (N, H, W, 3) uint8 and, for a reference batch, the
    precomputed statistics it may carry (pool: ``mu``/``sigma``, spatial: ``mu_s``/``sigma_s``)."""

    images: Optional[np.ndarray]
    pool: Optional[Statistics]
    spatial: Optional[Statistics]


def _stored_array(path: Path, member: str) -> Optional[np.ndarray]:
    """``member`` of an uncompressed zip (what ``np.savez`` writes) as a read-only memory map,
    so a 50,000-image batch is read batch by batch instead of whole; None when compressed."""
    import zipfile

    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(member)
        if info.compress_type != zipfile.ZIP_STORED:
            return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
        f.seek(start)
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
    if dtype.hasobject:
        raise ValueError("Object arrays cannot be loaded when allow_pickle=False")
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


def read_npz(path: str | Path, what: str = "npz") -> Batch:
    """Read an ADM batch without unpickling anything (``allow_pickle=False``); images stay on
    disk (memory-mapped) when the file is uncompressed."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            keys = set(data.files)
            images = None
            if "arr_0" in keys:
                images = _stored_array(path, "arr_0.npy")
                if images is None:  # np.savez_compressed: no way around reading it whole
                    images = data["arr_0"]
            pool = Statistics(data["mu"], data["sigma"]) if {"mu", "sigma"} <= keys else None
            spatial = Statistics(data["mu_s"], data["sigma_s"]) if {"mu_s", "sigma_s"} <= keys else None
    except FileNotFoundError:
        raise UserError(f"{what} {path}: file not found") from None
    except ValueError as exc:  # object arrays need pickle: refused
        raise UserError(f"{what} {path}: not a plain .npz of arrays ({exc})") from None
    except (OSError, EOFError, KeyError) as exc:
        raise UserError(f"{what} {path}: not a readable .npz ({exc})") from None
    if images is None and pool is None:
        raise UserError(f"{what} {path}: no 'arr_0' images and no 'mu'/'sigma' statistics "
                        f"(keys: {', '.join(sorted(keys)) or 'none'})")
    if images is not None and (images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8):
        raise UserError(f"{what} {path}: 'arr_0' must be (N, H, W, 3) uint8 images, got "
                        f"{images.dtype} {tuple(images.shape)}")
    return Batch(images, pool, spatial)
