"""DiT forward latency, tracked by `make bench` against a saved baseline.

HARNESS_BENCH_SLOWDOWN=N runs N extra forwards per timed call. It exists only here, to
show that `make bench` fails on a regression (N=1 doubles the median):

    HARNESS_BENCH_SLOWDOWN=1 make bench    # fails: median regressed beyond BENCH_THRESHOLD
"""
from __future__ import annotations

import os

import pytest
import torch

import harness

SLOWDOWN = int(os.environ.get("HARNESS_BENCH_SLOWDOWN", "0"))


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: on a shared machine, intra-op threads fighting other jobs for cores made
    the median swing by 10x between runs; a single thread is what a baseline can hold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Mean and mean |.| of the timed forward's output, measured with the current model: a change
# to the model (or to what is timed) moves them.
EXPECTED = {"tiny": (-0.0118864, 0.179899), "S": (-0.0226611, 0.287314)}


@pytest.mark.parametrize("size,patch", [("tiny", 2), ("S", 2)])
def test_dit_forward(benchmark, size, patch):
    torch.manual_seed(0)
    model = harness.create("backbone", "dit", size=size, patch=patch).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # adaLN-Zero would make the output exactly 0: nothing to check
        for p in model.parameters():
            if p.requires_grad and (p == 0).all():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    x = torch.randn(1, 4, 32, 32)  # the 32x32x4 latent of a 256x256 image, batch 1
    t, y = torch.tensor([500]), torch.tensor([207])

    def forward():
        with torch.inference_mode():
            for _ in range(1 + SLOWDOWN):
                out = model(x, t, y)
        return out

    benchmark.extra_info.update(size=size, patch=patch, threads=torch.get_num_threads(), slowdown=SLOWDOWN)
    out = benchmark.pedantic(forward, rounds=10, warmup_rounds=2, iterations=1)
    assert out.shape == (1, 8, 32, 32) and torch.isfinite(out).all()
    mean, mean_abs = EXPECTED[size]
    assert (out.mean().item(), out.abs().mean().item()) == pytest.approx((mean, mean_abs), rel=1e-4)
