"""CPU selective scan against the sequential loop, side by side (B 2, D 384, N 16, L 1024).

`make bench` times both; each speed test also times the loop in the same run, interleaved
with ours, and checks the issue's floor on the ratio of medians (forward >= 5x, forward
plus backward >= 3x). Under --benchmark-disable (`make test`) ours runs once and the loop
runs only on a slice of 16 channels (channels are independent given B and C), against
which ours is checked, to keep that run quick.

What stands between ours and the FLOP bound: the scan is 9 * B * L * D * N = 113 M
multiply-adds, about a millisecond of AVX-512 arithmetic on two cores. Each (batch, channel)
row is a recurrence over L: every step waits on the previous one (exp, multiply, add:
tens of cycles of latency) and is only N = 16 floats wide, one vector, so the cores run far
below their throughput; the exp itself costs several multiply-adds not in the 9; and the
backward recomputes the states, stores them, and sums per-chunk dB/dC partials in torch.
"""
from __future__ import annotations

import statistics
import time

import pytest
import torch

from harness_mixers.scan import native_available, selective_scan, selective_scan_ref

SHAPE = dict(batch=2, width=384, nstate=16, length=1024)
FLOPS = 9 * SHAPE["batch"] * SHAPE["length"] * SHAPE["width"] * SHAPE["nstate"]


def _inputs(grad: bool):
    g = torch.Generator().manual_seed(0)
    b, d, n, l = SHAPE.values()
    x = dict(u=torch.randn(b, d, l, generator=g), delta=torch.randn(b, d, l, generator=g) * 0.5,
             A=-torch.rand(d, n, generator=g) * 4, B=torch.randn(b, n, l, generator=g),
             C=torch.randn(b, n, l, generator=g), D=torch.randn(d, generator=g), z=torch.randn(b, d, l, generator=g),
             delta_bias=torch.randn(d, generator=g) * 0.1)
    return {k: v.requires_grad_(grad) for k, v in x.items()}


def _forward(fn, x):
    with torch.no_grad():
        return fn(**x, delta_softplus=True)


def _forward_backward(fn, x):
    out = fn(**x, delta_softplus=True)
    return dict(zip(x, torch.autograd.grad(out.square().sum(), list(x.values()))))


SLICE = 16  # channels the loop checks ours on, in float64


def _check_against_loop(step, x, got):
    """Ours on all channels against the loop on the first SLICE: out, or every gradient
    that belongs to those channels (B and C sum over all channels: not sliceable)."""
    per_channel = {"u": 1, "delta": 1, "z": 1, "A": 0, "D": 0, "delta_bias": 0}
    sl = {k: (v.detach()[:, :SLICE] if per_channel.get(k) == 1 else v.detach()[:SLICE] if k in per_channel
              else v.detach()).double().requires_grad_(v.requires_grad) for k, v in x.items()}
    ref = step(selective_scan_ref, sl)
    if step is _forward:
        assert got.shape == (SHAPE["batch"], SHAPE["width"], SHAPE["length"])
        torch.testing.assert_close(got[:, :SLICE].double(), ref, rtol=1e-4, atol=1e-4)
        return
    for k, axis in per_channel.items():
        mine = got[k][:, :SLICE] if axis == 1 else got[k][:SLICE]
        torch.testing.assert_close(mine.double(), ref[k], rtol=1e-3, atol=1e-3, msg=lambda m: f"d{k}: {m}")


def _interleaved_medians(a, b, runs: int) -> tuple[float, float]:
    """Median seconds of a and b, run alternately so that load on a shared machine hits both."""
    ta, tb = [], []
    a(), b()  # warm-up (first call builds the native library)
    for _ in range(runs):
        for fn, times in ((a, ta), (b, tb)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(ta), statistics.median(tb)


def _check_speedup(benchmark, step, grad: bool, floor: float, runs: int):
    x = _inputs(grad)
    benchmark.extra_info.update(SHAPE, gflop=FLOPS / 1e9, native=native_available(), threads=torch.get_num_threads())
    got = benchmark.pedantic(step, args=(selective_scan, x), rounds=runs, warmup_rounds=1)
    _check_against_loop(step, x, got)
    if benchmark.disabled:
        return
    loop, ours = _interleaved_medians(lambda: step(selective_scan_ref, x), lambda: step(selective_scan, x), runs)
    benchmark.extra_info.update(loop_median_s=loop, ours_median_s=ours, speedup=loop / ours,
                                gflops_achieved=FLOPS / ours / 1e9)
    assert loop / ours >= floor, f"{loop / ours:.1f}x faster than the loop, below {floor}x"


@pytest.mark.benchmark(group="scan-forward")
def test_scan_forward_5x_the_loop(benchmark):
    _check_speedup(benchmark, _forward, grad=False, floor=5.0, runs=7)


@pytest.mark.benchmark(group="scan-forward-backward")
def test_scan_forward_backward_3x_the_loop(benchmark):
    _check_speedup(benchmark, _forward_backward, grad=True, floor=3.0, runs=5)


@pytest.mark.parametrize("step", [_forward, _forward_backward], ids=["forward", "forward-backward"])
def test_loop_for_the_side_by_side_table(benchmark, step):
    """The loop alone, in the same groups, so the saved benchmark table shows both."""
    if benchmark.disabled:
        pytest.skip("the loop takes seconds; timed only under make bench")
    benchmark.group = "scan-" + ("forward" if step is _forward else "forward-backward")
    benchmark.pedantic(step, args=(selective_scan_ref, _inputs(step is not _forward)), rounds=3, warmup_rounds=1)
