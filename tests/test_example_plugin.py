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


# -- an outside criterion and distillation loss, written from the contract alone -----------------
def _cell(backbone: dict):
    from harness import CellConfig, CellContext

    config = CellConfig.model_validate({"backbone": backbone, "data": {"name": "shapes", "resolution": 8, "size": 16},
                                        "metrics": ["params"], "device": "cpu"})
    return CellContext("example", "c", 0, config)


def _update(module, args, output):
    x, y = args[0], output
    return ((y - x).pow(2).flatten(1).sum(1) / x.pow(2).flatten(1).sum(1)).mean().item()


def test_example_criterion_hooks_its_units_on_the_cells_calibration_set(registry):
    """On a DiT, update-norm's score of a block is that block's update on the calibration set
    the stage asks for (the cell's training images), measured here by hand."""
    assert registry.get("criterion", "update-norm").plugin == "example"
    ctx = _cell({"name": "dit", "size": "tiny", "input_size": 8, "depth": 3})
    ctx.calibration = harness.Calibration(batch_size=4, timesteps=2)  # what the prune stage sets
    model = ctx.model.eval()
    units = [u for u in harness.discover_units(model) if u.removable]
    scores = harness.create("criterion", "update-norm").score(model, units, ctx)
    assert set(scores) == {"blocks.0", "blocks.1", "blocks.2"}
    seen: list[float] = []
    handle = model.blocks[1].register_forward_hook(lambda m, a, o: seen.append(_update(m, a, o)))
    with torch.no_grad():
        for batch in harness.calibration_inputs(ctx, model):
            model(**batch["inputs"])
    handle.remove()
    assert len(seen) == 2 and scores["blocks.1"] == pytest.approx(sum(seen) / 2)


def test_example_criterion_covers_a_unets_units_and_skip_pairs(registry):
    ctx = _cell({"name": "unet", "preset": "adm-small", "input_size": 8})
    ctx.calibration = harness.Calibration(batch_size=2, timesteps=1)
    model = ctx.model.eval()
    units = [u for u in harness.discover_units(model) if u.removable]
    pairs = [u for u in units if "+" in u.name]
    assert pairs and all(len(u.modules) >= 2 for u in pairs)
    scores = harness.create("criterion", "update-norm").score(model, units, ctx)
    assert set(scores) == {u.name for u in units}
    assert all(v > 0 and v == v for v in scores.values())  # every unit hooked and measured, none NaN


def test_example_loss_reads_features(registry):
    loss = harness.create("loss", "cosine-kd")
    s, t = torch.ones(2, 4, 2, 2), -torch.ones(2, 4, 2, 2)
    feats_t = {"a": torch.ones(2, 8), "b": torch.ones(2, 3)}
    feats_s = {"a": torch.ones(2, 8), "b": -torch.ones(2, 3)}
    assert loss(s, t, None, feats_s, feats_t).item() == pytest.approx(0 + 2)  # 1 - cos: 0 and 2
    assert loss.needs_features


@pytest.mark.slow  # a teacher per backbone, pruned and distilled
def test_example_compression_suite_runs_on_a_unet_and_a_dit(registry, tmp_path):
    results = tmp_path / "results"
    assert main(["run", str(EXAMPLE / "compress.yaml"), "--results", str(results)]) == 0
    records = load_records(results / "example-compress")
    assert {r["config"]["backbone"]["name"] for r in records} == {"dit", "unet"}
    for r in records:
        assert r["status"] == "ok", r.get("error")
        assert r["prune"]["criterion"] == "update-norm" and r["prune"]["removed"]
        shares = r["distill"]["shares"]
        assert set(shares["losses"]) == {"task", "cosine-kd"}
        assert shares["features"]["cosine-kd"]  # the stage hooked features for it
        assert r["metrics"]["output_loss"]["value"] > 0
