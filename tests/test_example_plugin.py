"""examples/harness-example installed as a real distribution, then used from a suite."""
from __future__ import annotations

import pytest
import torch

import harness
from harness.cli import main
from harness.records import load_records

from conftest import REPO, pip_install_target

EXAMPLE = REPO / "examples" / "harness-example"


@pytest.fixture(scope="module")
def example_site(tmp_path_factory):
    return pip_install_target(EXAMPLE, tmp_path_factory.mktemp("site-example"))


@pytest.fixture
def registry(example_site, with_site):
    return with_site(example_site)


def test_entry_point_registers_backbone_and_mixer(registry):
    info = {p.name: p for p in registry.plugins()}["example"]
    assert (info.distribution, info.version) == ("harness-example", "0.1.0")
    assert registry.get("backbone", "uvit").plugin == "example"
    assert registry.get("mixer", "dwconv").plugin == "example"
    model = harness.create("backbone", "uvit", input_size=8, depth=3, width=32, heads=2, mixer="dwconv")
    x = torch.randn(2, 4, 8, 8)
    assert model(x, torch.tensor([1, 500]), torch.tensor([3, 7])).shape == x.shape
    mixer = harness.create("mixer", "dwconv", dim=16, kernel_size=3)
    assert mixer(torch.randn(2, 12, 16), (3, 4)).shape == (2, 12, 16)


def test_example_suite_runs(registry, tmp_path, capsys):
    results = tmp_path / "results"
    assert main(["run", str(EXAMPLE / "suite.yaml"), "--results", str(results)]) == 0
    records = load_records(results / "example-uvit")
    assert len(records) == 4 and {r["status"] for r in records} == {"ok"}
    assert all(r["plugins"]["example"] == "harness-example 0.1.0" for r in records)
    cost = {(r["config"]["backbone"]["mixer"], r["config"]["backbone"]["width"]): r["metrics"] for r in records}
    for width in (64, 128):  # a depthwise conv is cheaper than attention's q, k, v and output projections
        assert cost[("dwconv", width)]["gflops"]["value"] < cost[("attention", width)]["gflops"]["value"]
        assert cost[("dwconv", width)]["params"]["value"] < cost[("attention", width)]["params"]["value"]
        assert not cost[("dwconv", width)]["gflops"]["uncounted_ops"]


def test_example_options_are_checked(registry, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text((EXAMPLE / "suite.yaml").read_text().replace("depth: 3", "depht: 3"))
    assert main(["validate", str(bad)]) == 2
    assert "did you mean 'depth'" in capsys.readouterr().err
