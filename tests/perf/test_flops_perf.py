"""Counting the big models without running them (harness.flops counts on the meta device).

SDXL's count on real CPU tensors took 1m36s and 13.9 GB resident (8 minutes on a loaded
machine); on the meta device it must take under 10 s and 2 GB, build included. The U-Net
counts run in a child process, so that its peak resident memory is the count's alone; they
run under `make bench` only (diffusers' import alone takes seconds). DiT-XL/2 runs in
`make test` too, as a check of the figure and of the method.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import harness
from harness.flops import count_flops
from harness.plugins import registry

CHILD = """
import json, resource, sys, time
import torch
from harness.flops import count_flops
from harness.plugins import registry
reg = registry()
reg.components("backbone")  # plugin loading and imports are not the count
from diffusers import UNet2DConditionModel  # noqa: F401  (loads diffusers' whole unets package: ~4 s)
start = time.perf_counter()
with torch.device("meta"):
    model = reg.create("backbone", "unet", preset=sys.argv[1]).eval()
fc = count_flops(model, model.example_inputs(1, device="meta"), reg.flop_handles())
print(json.dumps({"flops": fc.total, "params": sum(p.numel() for p in model.parameters()), "method": fc.method,
                  "seconds": time.perf_counter() - start,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

UNETS = {  # exact integers of the trace on real tensors (tests/test_flops.py)
    "sd15": (402_039_521_280, 859_520_964),
    "sdxl": (3_382_980_116_480, 2_567_463_684),
}


def _child(preset: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", CHILD, preset], capture_output=True, text=True, env=env,
                         check=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.benchmark(group="flop-count")
@pytest.mark.parametrize("preset", list(UNETS))
def test_unet_counts_in_seconds_and_little_memory(benchmark, preset):
    if benchmark.disabled:
        pytest.skip("`make bench` only: a child process that imports diffusers")
    result = benchmark.pedantic(_child, args=(preset,), rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    assert (result["flops"], result["params"]) == UNETS[preset]
    assert result["method"] == "meta"
    assert result["seconds"] < 10, f"{preset}: counted in {result['seconds']:.1f}s"
    assert result["peak_rss_mb"] < 2048, f"{preset}: peak resident {result['peak_rss_mb']:.0f} MB"


# The harness's count and PyTorch's FlopCounterMode alone, on the same meta SDXL in one process,
# interleaved; each one's fastest of ROUNDS, in CPU seconds (wall time on this shared machine
# swings with other jobs). FlopCounterMode counts 2 FLOPs a multiply-add and has no norm or
# upsample rules: its figure is printed beside ours, not compared.
SIDE_BY_SIDE = """
import json, sys, time
import torch
from torch.utils.flop_counter import FlopCounterMode
from harness.flops import count_flops
from harness.plugins import registry
reg = registry()
reg.components("backbone")
from diffusers import UNet2DConditionModel  # noqa: F401
with torch.device("meta"):
    model = reg.create("backbone", "unet", preset=sys.argv[1]).eval()
inputs = model.example_inputs(1, device="meta")
handles = reg.flop_handles()

def harness_count():
    return count_flops(model, inputs, handles).total

def flop_counter_mode():
    with torch.no_grad(), FlopCounterMode(display=False) as mode:
        model(**inputs)
    return mode.get_total_flops()

best, figures = {}, {}
for _ in range(int(sys.argv[2])):
    for fn in (harness_count, flop_counter_mode):
        start = time.process_time()
        figures[fn.__name__] = fn()
        best[fn.__name__] = min(best.get(fn.__name__, float("inf")), time.process_time() - start)
print(json.dumps({"seconds": best, "figures": figures}))
"""
ROUNDS = 3
MAX_RATIO = 1.2


def _side_by_side(preset: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", SIDE_BY_SIDE, preset, str(ROUNDS)], capture_output=True, text=True,
                         env=env, check=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.benchmark(group="flop-count")
def test_sdxl_count_keeps_pace_with_flop_counter_mode(benchmark):
    """The issue's bar: SDXL on meta counted no slower than 1.2x FlopCounterMode alone."""
    if benchmark.disabled:
        pytest.skip("`make bench` only: a child process that imports diffusers")
    result = benchmark.pedantic(_side_by_side, args=("sdxl",), rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    ours, theirs = result["seconds"]["harness_count"], result["seconds"]["flop_counter_mode"]
    print(f"SDXL on meta, fastest of {ROUNDS} in CPU seconds: harness {ours:.2f}, FlopCounterMode {theirs:.2f} "
          f"({ours / theirs:.2f}x)")
    assert result["figures"]["harness_count"] == UNETS["sdxl"][0]
    assert ours <= MAX_RATIO * theirs, f"harness {ours:.2f}s against FlopCounterMode {theirs:.2f}s"


@pytest.mark.benchmark(group="flop-count")
def test_dit_xl_counts_on_meta(benchmark):
    def count():
        with torch.device("meta"):
            model = harness.create("backbone", "dit", size="XL", patch=2).eval()
        inputs = {"x": torch.randn(1, 4, 32, 32), "t": torch.tensor([500]), "y": torch.tensor([1])}
        return count_flops(model, inputs, registry().flop_handles())

    fc = benchmark.pedantic(count, rounds=1, iterations=1)
    assert (fc.total, fc.method) == (118_688_661_504, "meta")  # README: 118.689
