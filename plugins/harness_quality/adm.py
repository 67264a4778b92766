"""The formulas of the ADM evaluation suite, on feature arrays.

Dhariwal & Nichol's evaluator (openai/guided-diffusion, ``evaluations/evaluator.py``) is what
DiT, LaMamba-Diff and most class-conditional ImageNet papers report: FID, sFID, IS, and
Kynkäänniemi et al.'s (2019) improved precision and recall. This module holds the arithmetic
only, on NumPy arrays, so that each figure can be checked against its definition on small
hand-made inputs; the Inception features come from elsewhere.

- FID / sFID: Fréchet distance of Gaussians fitted with the mean and ``np.cov(rowvar=False)``.
  The evaluator takes ``scipy.linalg.sqrtm`` of the covariance product; we take the trace of
  that square root from symmetric eigendecompositions (:func:`trace_sqrt_product`), the same
  figure about 5x faster at 2048-d, and exact where sqrtm loses digits (singular covariances).
  The evaluator's fallback, ``eps`` added to both diagonals when the square root comes out
  non-finite, is kept for a decomposition that fails.
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


def _significant(eigenvalues: np.ndarray) -> np.ndarray:
    """Eigenvalues with those below the decomposition's own rounding set to 0.

    A symmetric eigensolver returns each eigenvalue to within about n * eps * ||A||; anything
    smaller (negative ones included) is indistinguishable from 0, and its square root, up to
    1e-8 of the largest one's, would otherwise add noise to the trace."""
    floor = len(eigenvalues) * np.finfo(eigenvalues.dtype).eps * max(float(eigenvalues.max(initial=0.0)), 0.0)
    return np.where(eigenvalues > floor, eigenvalues, 0.0)


def trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    """tr((S1 S2)^1/2) for covariance (symmetric positive semi-definite) matrices.

    S1 S2 is similar to a symmetric positive semi-definite matrix M, so its eigenvalues are
    real and non-negative and the trace of its square root is the sum of their square roots,
    the eigenvalues of M (``eigvalsh``) rounded below the solver's resolution to 0:

    - S1 positive definite (the usual case: more samples than dimensions): S1 = L L^T
      (Cholesky) and M = L^T S2 L, similar to S1 S2 through L;
    - S1 singular (fewer samples than dimensions): S1 = V diag(w) V^T and
      M = diag(sqrt w) V^T S2 V diag(sqrt w), which is S1^1/2 S2 S1^1/2 in V's basis.

    A product of two positive semi-definite matrices is always diagonalisable, so its principal
    square root exists and its trace is this sum, singular or not. Either route costs a few
    n^3 operations against scipy's Schur-based sqrtm of the non-symmetric product (about 25 n^3,
    complex when the rounded spectrum is).
    """
    try:
        lower = np.linalg.cholesky(s1)
        m = lower.T @ s2 @ lower
    except np.linalg.LinAlgError:  # not positive definite
        w, v = np.linalg.eigh(s1)
        root = np.sqrt(_significant(w))
        m = root[:, None] * (v.T @ s2 @ v) * root[None, :]
    return float(np.sqrt(_significant(np.linalg.eigvalsh(m))).sum())


def frechet_distance(a: Statistics, b: Statistics, eps: float = 1e-6) -> float:
    """||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^1/2).

    The trace of the square root comes from :func:`trace_sqrt_product`; on full-rank
    statistics it agrees with the evaluator's ``np.trace(scipy.linalg.sqrtm(S_a @ S_b))`` to
    about 1e-15 relative. If the decomposition fails or gives a non-finite value, ``eps`` is
    added to both diagonals and it is tried once more, as the evaluator does when its square
    root is non-finite.
    """
    mu1, mu2 = np.atleast_1d(a.mu).astype(np.float64), np.atleast_1d(b.mu).astype(np.float64)
    s1, s2 = np.atleast_2d(a.sigma).astype(np.float64), np.atleast_2d(b.sigma).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"statistics of different sizes: mean {mu1.shape} vs {mu2.shape}, "
                         f"covariance {s1.shape} vs {s2.shape}")
    diff = mu1 - mu2
    try:
        tr_covmean = trace_sqrt_product(s1, s2)
    except np.linalg.LinAlgError:
        tr_covmean = float("nan")
    if not np.isfinite(tr_covmean):
        warnings.warn(f"singular covariance product; adding {eps} to the diagonals", RuntimeWarning)
        offset = np.eye(len(s1)) * eps
        tr_covmean = trace_sqrt_product(s1 + offset, s2 + offset)
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


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


class Member(NamedTuple):
    """One array of an ``.npz`` as its ``.npy`` header describes it (nothing of it read)."""

    shape: tuple
    dtype: np.dtype
    fortran: bool
    stored: bool          # uncompressed (np.savez), so it can be memory-mapped
    offset: int           # where its data starts in the file, when stored


def _npy_header(f, name: str) -> tuple[tuple, bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise ValueError(f"member {name!r} is .npy format {version[0]}.{version[1]}, expected 1.0 or 2.0")
    return shape, fortran, dtype


def npz_members(path: str | Path, what: str = "npz") -> dict[str, Member]:
    """Every array of the ``.npz`` at ``path`` by key, from the ``.npy`` headers inside the zip
    (numpy.lib.format): shapes and dtypes known before a byte of data is read, so a wrong
    input is refused before any work. Object arrays (pickles) are refused here."""
    import zipfile

    from harness import open_regular

    path = Path(path)
    members = {}
    try:
        with open_regular(path, what) as fh, zipfile.ZipFile(fh) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                key = info.filename[:-4]
                with zf.open(info) as f:
                    shape, fortran, dtype = _npy_header(f, key)
                    header_size = f.tell()
                if dtype.hasobject:
                    raise ValueError(f"{key!r} is an object array, which only unpickling could read")
                stored = info.compress_type == zipfile.ZIP_STORED
                offset = 0
                if stored:  # the local header's own name and extra lengths place the data
                    fh.seek(info.header_offset)
                    local = fh.read(30)
                    offset = (info.header_offset + 30 + int.from_bytes(local[26:28], "little")
                              + int.from_bytes(local[28:30], "little") + header_size)
                    need = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                    if offset + need > path.stat().st_size:
                        raise ValueError(f"{key!r} is truncated ({tuple(shape)} {dtype} needs {need} bytes)")
                members[key] = Member(tuple(shape), dtype, fortran, stored, offset)
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        raise UserError(f"{what} {path}: not a readable .npz ({type(exc).__name__}: {exc})") from None
    except ValueError as exc:
        raise UserError(f"{what} {path}: not a plain .npz of arrays ({exc})") from None
    return members


def _check_members(members: dict[str, Member], path: Path, what: str) -> None:
    """The shapes ADM's evaluator gives its batches, checked on the headers alone."""
    keys = set(members)
    for mu, sigma in (("mu", "sigma"), ("mu_s", "sigma_s")):
        if (mu in keys) != (sigma in keys):
            raise UserError(f"{what} {path}: has {mu if mu in keys else sigma!r} without "
                            f"{sigma if mu in keys else mu!r}; expected both or neither")
        if mu not in keys:
            continue
        m, s = members[mu], members[sigma]
        for key, member in ((mu, m), (sigma, s)):
            if member.dtype.kind not in "fiu":
                raise UserError(f"{what} {path}: {key!r} is {member.dtype}, expected numbers")
        if len(m.shape) != 1 or s.shape != (m.shape[0], m.shape[0]):
            raise UserError(f"{what} {path}: {mu!r} {m.shape} and {sigma!r} {s.shape} are not a mean (D,) and "
                            f"its covariance (D, D)")
    if "arr_0" not in keys and not {"mu", "sigma"} <= keys:
        raise UserError(f"{what} {path}: no 'arr_0' images and no 'mu'/'sigma' statistics "
                        f"(keys: {', '.join(sorted(keys)) or 'none'})")
    images = members.get("arr_0")
    if images is not None and (len(images.shape) != 4 or images.shape[-1] != 3 or images.dtype != np.uint8):
        raise UserError(f"{what} {path}: 'arr_0' must be (N, H, W, 3) uint8 images, got "
                        f"{images.dtype} {images.shape}")


def check_statistics(batch: "Batch", dims: dict[str, int], path: str | Path, what: str = "npz") -> None:
    """Precomputed statistics of ``batch`` against the feature widths they will be compared
    with (``{"pool": 2048, "spatial": 2023}`` for the evaluator's Inception): one line naming
    the key and both widths, before any feature is extracted."""
    for name, stats, keys in (("pool", batch.pool, "'mu'/'sigma'"), ("spatial", batch.spatial, "'mu_s'/'sigma_s'")):
        if stats is not None and name in dims and stats.mu.shape[0] != dims[name]:
            raise UserError(f"{what} {path}: {keys} have dimension {stats.mu.shape[0]}, but the {name} features "
                            f"they are compared with have {dims[name]}; expected statistics of the same "
                            f"extractor (ADM's Inception: {dims[name]})")


def read_npz(path: str | Path, what: str = "npz") -> Batch:
    """Read an ADM batch without unpickling anything: every member's header is checked first
    (:func:`npz_members`), then the statistics are read and the images memory-mapped when the
    file is uncompressed (a 50,000-image batch is read batch by batch, not whole)."""
    import zipfile
    import zlib

    path = Path(path)
    if not path.exists():
        raise UserError(f"{what} {path}: file not found")
    members = npz_members(path, what)
    _check_members(members, path, what)
    try:
        with np.load(path, allow_pickle=False) as data:
            images = None
            if "arr_0" in members:
                m = members["arr_0"]
                images = (np.memmap(path, dtype=m.dtype, mode="r", offset=m.offset, shape=m.shape,
                                    order="F" if m.fortran else "C") if m.stored
                          else data["arr_0"])  # np.savez_compressed: no way around reading it whole
            pool = Statistics(data["mu"], data["sigma"]) if "mu" in members else None
            spatial = Statistics(data["mu_s"], data["sigma_s"]) if "mu_s" in members else None
    except ValueError as exc:
        raise UserError(f"{what} {path}: not a plain .npz of arrays ({exc})") from None
    except (OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:  # a corrupt or truncated member
        raise UserError(f"{what} {path}: not a readable .npz ({type(exc).__name__}: {exc})") from None
    for name, stats in (("mu/sigma", pool), ("mu_s/sigma_s", spatial)):
        if stats is not None and not (np.isfinite(stats.mu).all() and np.isfinite(stats.sigma).all()):
            raise UserError(f"{what} {path}: {name} hold NaN or infinite values")
    return Batch(images, pool, spatial)
