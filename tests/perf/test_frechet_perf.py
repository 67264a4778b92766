"""The Fréchet distance of 2048-d statistics (Inception pool3, FID's width): the eigenvalue
route of harness_quality.adm against scipy.linalg.sqrtm (the ADM evaluator's), side by side.

CPU time of this process (both routes use every BLAS thread; CPU time is not moved by other
jobs of a shared machine the way wall time is). The eigenvalue route must be at least 4x faster
and give the same figure; `make bench` tracks its own time against the saved baseline.

    python -m pytest tests/perf/test_frechet_perf.py -q -s -p no:cacheprovider --benchmark-disable
"""
from __future__ import annotations

import time
import warnings

import numpy as np
import pytest
from scipy import linalg

from harness_quality import adm

D = 2048
MIN_SPEEDUP = 4.0


def sqrtm_distance(a: adm.Statistics, b: adm.Statistics) -> float:
    diff = a.mu - b.mu
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        covmean = linalg.sqrtm(a.sigma @ b.sigma)
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.trace(covmean).real)


@pytest.fixture(scope="module")
def stats():
    """Two full-rank 2048-d Gaussians with correlated, unequal spectra, as Inception features have."""
    rng = np.random.default_rng(0)

    def one(scale):
        x = rng.standard_normal((D, D)) * scale
        return adm.Statistics(rng.standard_normal(D) * 0.1, x @ x.T / D + 1e-3 * np.eye(D))

    return one(1.0), one(0.8)


def _cpu(fn):
    t0 = time.process_time()
    out = fn()
    return out, time.process_time() - t0


@pytest.mark.slow  # one sqrtm of a 2048 x 2048 matrix: about 14 s of CPU on two cores
def test_eigenvalue_route_is_4x_faster_than_sqrtm(benchmark, stats):
    a, b = stats
    adm.frechet_distance(a, b)  # warm: BLAS threads started, pages touched
    ours, ours_s = min((_cpu(lambda: adm.frechet_distance(a, b)) for _ in range(2)), key=lambda r: r[1])
    theirs, theirs_s = _cpu(lambda: sqrtm_distance(a, b))
    speedup = theirs_s / ours_s
    print(f"\nFréchet distance, {D}-d: sqrtm {theirs_s:.2f} s CPU, eigenvalues {ours_s:.2f} s CPU, "
          f"{speedup:.1f}x; relative difference {abs(ours - theirs) / abs(theirs):.1e}")
    benchmark.extra_info.update(sqrtm_cpu_s=theirs_s, eigen_cpu_s=ours_s, speedup=speedup)
    benchmark.pedantic(adm.frechet_distance, args=(a, b), rounds=3, warmup_rounds=0, iterations=1)
    assert ours == pytest.approx(theirs, rel=1e-9, abs=0)
    assert speedup >= MIN_SPEEDUP, f"eigenvalue route only {speedup:.1f}x faster than sqrtm ({ours_s:.2f}s vs " \
                                   f"{theirs_s:.2f}s CPU)"
