"""The Fréchet distance through symmetric eigendecompositions, against scipy.linalg.sqrtm (the
ADM evaluator's route) and, where sqrtm itself loses digits, against a closed form.

For features A (n x D) and B (m x D), centred, S_a = A^T A / (n - 1) and S_b = B^T B / (m - 1), so
the non-zero eigenvalues of S_a S_b are the squared singular values of A B^T / sqrt((n-1)(m-1)):
tr((S_a S_b)^1/2) is that small matrix's nuclear norm. With fewer samples than dimensions this
is exact where sqrtm of the singular D x D product is not."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import linalg

from harness_quality import adm


def sqrtm_distance(a: adm.Statistics, b: adm.Statistics, eps: float = 1e-6) -> float:
    """The evaluator's own route (openai/guided-diffusion evaluations/evaluator.py)."""
    diff = a.mu - b.mu
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        covmean = linalg.sqrtm(a.sigma @ b.sigma)
        if not np.isfinite(covmean).all():
            offset = np.eye(len(a.sigma)) * eps
            covmean = linalg.sqrtm((a.sigma + offset) @ (b.sigma + offset))
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.trace(covmean).real)


def exact_trace(x: np.ndarray, y: np.ndarray) -> float:
    """tr((S_x S_y)^1/2) in closed form: the nuclear norm of the centred cross product."""
    xc, yc = x - x.mean(0), y - y.mean(0)
    cross = xc @ yc.T / np.sqrt((len(x) - 1) * (len(y) - 1))
    return float(np.linalg.svd(cross, compute_uv=False).sum())


def features(rng, n: int, d: int, mix: bool) -> np.ndarray:
    x = rng.standard_normal((n, d))
    return x @ rng.standard_normal((d, d)) * 0.3 if mix else x * 0.7 + 0.1


@pytest.mark.parametrize("n, m, d", [(500, 400, 64), (3000, 2000, 256), (40, 40, 8)])
def test_full_rank_statistics_equal_sqrtm(n, m, d):
    rng = np.random.default_rng(d)
    a, b = adm.statistics(features(rng, n, d, True)), adm.statistics(features(rng, m, d, False))
    ours, theirs = adm.frechet_distance(a, b), sqrtm_distance(a, b)
    assert ours == pytest.approx(theirs, rel=1e-9, abs=0)
    assert adm.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9 * np.trace(a.sigma))  # a set against itself


@pytest.mark.parametrize("n, m, d", [(10, 10, 64), (30, 50, 64), (2, 3, 8), (100, 100, 512), (5, 700, 512)])
def test_singular_covariances_are_exact_where_sqrtm_loses_digits(n, m, d):
    """Fewer samples than dimensions: both covariances (or one) are singular. Our trace equals
    the closed form to ~1e-15; sqrtm's is off by up to ~1e-7 relative here, so the figures are
    compared with sqrtm to the digits sqrtm has and with the closed form to 1e-12."""
    rng = np.random.default_rng(n + m + d)
    x, y = features(rng, n, d, True), features(rng, m, d, False)
    a, b = adm.statistics(x), adm.statistics(y)
    exact = float((a.mu - b.mu) @ (a.mu - b.mu) + np.trace(a.sigma) + np.trace(b.sigma) - 2 * exact_trace(x, y))
    assert adm.trace_sqrt_product(a.sigma, b.sigma) == pytest.approx(exact_trace(x, y), rel=1e-12, abs=0)
    assert adm.frechet_distance(a, b) == pytest.approx(exact, rel=1e-12, abs=0)
    assert adm.frechet_distance(b, a) == pytest.approx(exact, rel=1e-12, abs=0)  # symmetric
    theirs = sqrtm_distance(a, b)
    assert adm.frechet_distance(a, b) == pytest.approx(theirs, rel=1e-6, abs=0)
    assert abs(theirs - exact) >= abs(adm.frechet_distance(a, b) - exact)  # never further from it than sqrtm


@pytest.mark.parametrize("n, d", [(10, 64), (3, 16)])
def test_eps_offset_figure_equals_sqrtm(n, d):
    """The evaluator's fallback figure, eps on both diagonals inside the root, computed both
    ways on singular covariances: with the offset the product is non-singular and sqrtm exact."""
    rng = np.random.default_rng(n * d)
    a, b = adm.statistics(features(rng, n, d, True)), adm.statistics(features(rng, n, d, False))
    for eps in (1e-6, 1e-2):
        offset = np.eye(d) * eps
        ours = adm.trace_sqrt_product(a.sigma + offset, b.sigma + offset)
        theirs = np.trace(linalg.sqrtm((a.sigma + offset) @ (b.sigma + offset))).real
        assert ours == pytest.approx(theirs, rel=1e-9, abs=0)


def test_tiny_negative_eigenvalues_are_clamped():
    """A covariance rounded to slightly indefinite (as float32 statistics read back can be)
    gives a real, finite distance."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((4, 32))
    s = np.cov(x, rowvar=False) - 1e-13 * np.eye(32)  # 28 eigenvalues at -1e-13
    assert np.linalg.eigvalsh(s).min() < 0
    d = adm.frechet_distance(adm.Statistics(np.zeros(32), s), adm.Statistics(np.zeros(32), s))
    assert np.isfinite(d) and abs(d) < 1e-9
