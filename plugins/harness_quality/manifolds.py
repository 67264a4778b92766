"""Density and coverage (Naeem et al. 2020, "Reliable Fidelity and Diversity Metrics for
Generative Models"), on the feature arrays the ADM protocol already extracted.

Each real point ``X_i`` gets a ball whose radius is the Euclidean distance to its k-th nearest
*other* real point (k = 5 in the paper). With ``M`` fake points ``Y_j``:

- density = 1/(kM) * sum_j #{i : Y_j inside ball(X_i)}: how many real neighbourhoods a sample
  sits in, on average, relative to k (about 1 when the two sets are alike; above 1 where
  samples crowd the dense parts of the real manifold);
- coverage = 1/N * #{i : some Y_j inside ball(X_i)}: the fraction of real neighbourhoods that
  hold at least one sample.

"Inside" is strict (distance < radius) and the radii are Euclidean, not squared, exactly as
the authors' ``prdc`` package (clovaai/generative-evaluation-prdc, ``compute_prdc``) computes
them; its figures are the test oracle. ``prdc`` holds every N x N and N x M distance in memory
(50,000 x 50,000 float64 is 20 GB); here they are computed in blocks, as ADM's
``ManifoldEstimator`` does for precision/recall, keeping only what each block contributes: the
k+1 smallest distances of each real row, the per-sample counts and the per-real minimum.
Distances are float64 and formed as prdc's (scikit-learn's ``euclidean_distances``) are:
``-2 a.b + |a|^2 + |b|^2``, clipped at 0, square-rooted, the self-distance set to 0.
"""
from __future__ import annotations

from typing import Iterator, NamedTuple

import numpy as np

DEFAULT_K = 5
BLOCK = 4096  # rows (and columns) per distance block: 4096 x 4096 float64 is 128 MiB


class DensityCoverage(NamedTuple):
    density: float
    coverage: float


def _blocks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _distances(a: np.ndarray, b: np.ndarray, a_sq: np.ndarray, b_sq: np.ndarray) -> np.ndarray:
    """Euclidean distances of float64 rows, in scikit-learn's order of operations."""
    d = -2 * (a @ b.T)
    d += a_sq[:, None]
    d += b_sq[None, :]
    np.maximum(d, 0, out=d)
    return np.sqrt(d, out=d)


def _check(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"density/coverage need k >= 1 nearest neighbours, got {k!r}")
    real, fake = np.asarray(real, dtype=np.float64), np.asarray(fake, dtype=np.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"density/coverage need two (N, D) feature arrays of one width, got {real.shape} and "
                         f"{fake.shape}")
    if len(real) <= k:
        raise ValueError(f"density/coverage with k={k} need more than {k} real points, got {len(real)}")
    if len(fake) == 0:
        raise ValueError("density/coverage need at least one fake point")
    return real, fake


def real_radii(real: np.ndarray, k: int = DEFAULT_K, block: int = BLOCK) -> np.ndarray:
    """Euclidean distance from each real point to its k-th nearest other real point.

    Each row keeps its k+1 smallest distances (the point itself, at 0, among them) across the
    column blocks, so memory is one block, whatever N."""
    x = np.asarray(real, dtype=np.float64)
    sq = (x * x).sum(1)
    radii = np.empty(len(x))
    for rows in _blocks(len(x), block):
        best = np.full((rows.stop - rows.start, 0), np.inf)
        for cols in _blocks(len(x), block):
            d = _distances(x[rows], x[cols], sq[rows], sq[cols])
            # the self-distance: scikit-learn sets it to exactly 0 when X is Y, and so do we
            lo, hi = max(rows.start, cols.start), min(rows.stop, cols.stop)
            if lo < hi:
                idx = np.arange(lo, hi)
                d[idx - rows.start, idx - cols.start] = 0.0
            both = np.concatenate([best, d], axis=1)
            keep = min(k + 1, both.shape[1])
            best = np.partition(both, keep - 1, axis=1)[:, :keep]
        radii[rows] = best.max(axis=1)  # the (k+1)-th smallest, self included: prdc's get_kth_value
    return radii


def density_coverage(real: np.ndarray, fake: np.ndarray, k: int = DEFAULT_K, block: int = BLOCK,
                     radii: np.ndarray | None = None) -> DensityCoverage:
    """Density and coverage of ``fake`` against ``real`` features, k-NN balls on the reals.

    ``radii``: the reals' k-NN radii when already known (:func:`real_radii`, e.g. from a cache)."""
    real, fake = _check(real, fake, k)
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    radii = real_radii(real, k, block) if radii is None else np.asarray(radii, dtype=np.float64)
    if radii.shape != (len(real),):
        raise ValueError(f"{radii.shape} radii for {len(real)} real points")
    real_sq, fake_sq = (real * real).sum(1), (fake * fake).sum(1)
    inside = np.zeros(len(fake), dtype=np.int64)   # per sample: how many real balls hold it
    nearest = np.full(len(real), np.inf)           # per real point: its nearest sample's distance
    for rows in _blocks(len(real), block):
        for cols in _blocks(len(fake), block):
            d = _distances(real[rows], fake[cols], real_sq[rows], fake_sq[cols])
            inside[cols] += (d < radii[rows, None]).sum(axis=0)
            np.minimum(nearest[rows], d.min(axis=1), out=nearest[rows])
    # the same operations, in the same order, as prdc on its full matrices: bit-identical figures
    density = (1.0 / float(k)) * inside.mean()
    coverage = (nearest < radii).mean()
    return DensityCoverage(float(density), float(coverage))
