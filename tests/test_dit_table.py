"""DiT's published parameters and GFLOPs (Table 4 of the paper) within 1%.

The convention (fvcore, one multiply-add = one FLOP, attention products counted through the
SDPA handle) is the one the paper's figures follow; a drift here means the FLOP counting or
the model changed."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import harness
from harness.flops import count_flops
from harness.plugins import registry

# Peebles & Xie, Table 4: GFLOPs at 256x256 (latent 32), and parameters in millions.
PAPER_GFLOPS = {
    ("S", 2): 6.06, ("B", 2): 23.01, ("L", 2): 80.71, ("XL", 2): 118.64,
    ("S", 4): 1.41, ("B", 4): 5.56, ("L", 4): 19.70, ("XL", 4): 29.05,
    ("S", 8): 0.36, ("B", 8): 1.42, ("L", 8): 5.01, ("XL", 8): 7.39,
}
PAPER_PARAMS_M = {"S": 33, "B": 130, "L": 458, "XL": 675}
SUITE = Path(__file__).parent.parent / "suites" / "dit-table.yaml"


def _gflops(size: str, patch: int) -> float:
    torch.manual_seed(0)
    model = harness.create("backbone", "dit", size=size, patch=patch).eval()
    inputs = {"x": torch.randn(1, 4, 32, 32), "t": torch.tensor([500]), "y": torch.tensor([1])}
    fc = count_flops(model, inputs, registry().flop_handles())
    assert not fc.uncounted_ops, fc.uncounted_ops
    return fc.total / 1e9


@pytest.mark.parametrize("size", ["S", "B", "L", "XL"])
def test_params_match_paper(size):
    with torch.device("meta"):
        model = harness.create("backbone", "dit", size=size, patch=2)
    params = sum(p.numel() for p in model.parameters())
    assert params / 1e6 == pytest.approx(PAPER_PARAMS_M[size], rel=0.01)


@pytest.mark.parametrize("size,patch", [(s, p) for s in ("S", "B") for p in (2, 4, 8)])
def test_gflops_match_paper(size, patch):
    assert _gflops(size, patch) == pytest.approx(PAPER_GFLOPS[size, patch], rel=0.01)


@pytest.mark.slow
@pytest.mark.parametrize("size,patch", [(s, p) for s in ("L", "XL") for p in (2, 4, 8)])
def test_gflops_match_paper_large(size, patch):
    assert _gflops(size, patch) == pytest.approx(PAPER_GFLOPS[size, patch], rel=0.01)


def test_suite_covers_the_table():
    from harness.suite import load_suite

    cells = load_suite(SUITE).cells()
    got = {(c.config["backbone"]["size"], c.config["backbone"]["patch"]) for c in cells}
    assert got == set(PAPER_GFLOPS)
    assert {"params", "gflops"} <= set(yaml.safe_load(SUITE.read_text())["base"]["metrics"])
