"""ShortGPT's block influence (the ``block-influence`` criterion) against a direct computation on
a hooked model, on a DiT, a LaMamba-Diff and a U-Net; and a DiT cell pruned by it and retrained,
run end to end through ``harness run``."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

import harness
from harness.cli import main
from harness.context import CellContext
from harness.suite import CellConfig
from harness_compress.stages import PruneSpec, prune

BATCH, TIMESTEPS = 4, 3


def _ctx(backbone: dict) -> CellContext:
    config = CellConfig.model_validate({"backbone": backbone, "metrics": ["params"], "device": "cpu"})
    return CellContext("t", "cell", 0, config)


def _perturb(model: torch.nn.Module, seed: int = 1, std: float = 0.1) -> None:
    """adaLN-Zero makes every DiT block the identity at initialisation (BI 0 everywhere): give
    every parameter that starts all-zero random values, so each block turns its tokens."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if (p == 0).all():
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _hooked_bi(model: torch.nn.Module, modules: dict[str, torch.nn.Module], batches: list[dict],
               channel_dim: int) -> dict[str, float]:
    """1 - cos(input, output) per token along ``channel_dim``, averaged over the tokens of a batch,
    then over batches: written here without the criterion's code."""
    per_batch: dict[str, list[float]] = {name: [] for name in modules}

    def hook(name):
        def fn(module, inputs, output):
            x = inputs[0]
            cos = (x * output).sum(channel_dim) / (x.norm(dim=channel_dim) * output.norm(dim=channel_dim))
            per_batch[name].append(float((1 - cos).mean()))
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    try:
        with torch.no_grad():
            for batch in batches:
                model(**batch["inputs"])
    finally:
        for h in handles:
            h.remove()
    return {n: sum(v) / len(v) for n, v in per_batch.items()}


def _score(ctx, model, units=None, batch_size=BATCH, timesteps=TIMESTEPS):
    units = units if units is not None else [u for u in harness.discover_units(model) if u.removable]
    crit = harness.create("criterion", "block-influence", batch_size=batch_size, timesteps=timesteps)
    return crit.score(model, units, ctx)


def _batches(ctx, model, batch_size=BATCH, timesteps=TIMESTEPS):
    return harness.calibration_inputs(ctx, model, harness.Calibration(batch_size, timesteps))


def test_dit_scores_equal_a_hooked_computation():
    ctx = _ctx({"name": "dit", "size": "tiny", "input_size": 8, "in_channels": 4, "num_classes": 3, "patch": 2,
                "depth": 4, "hidden_size": 32, "num_heads": 2})
    model = ctx.model.eval()
    _perturb(model)
    scores = _score(ctx, model)
    expected = _hooked_bi(model, {f"blocks.{i}": b for i, b in enumerate(model.blocks)}, _batches(ctx, model), -1)
    assert set(scores) == set(expected) == {f"blocks.{i}" for i in range(4)}
    for name in expected:
        assert scores[name] == pytest.approx(expected[name], abs=1e-6)
    assert all(0 < v < 2 for v in scores.values()) and len(set(scores.values())) == 4  # perturbed: all differ


def test_it_compares_token_by_token_not_whole_samples():
    """One token reversed, the others kept: per token BI is 2/N (N tokens); ``similarity``, on the
    flattened sample, sees a small angle that depends on the token's share of the norm."""

    class FlipFirst(torch.nn.Module):
        def forward(self, x, c, hw):
            return torch.cat([-x[:, :1], x[:, 1:]], dim=1)

    class Flipper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([FlipFirst()])

        def forward(self, x, t, y=None):
            return self.blocks[0](x, None, None)

    model = Flipper()
    unit = harness.Unit("blocks.0", "block", 0)
    x = torch.randn(2, 8, 16)

    class Ctx:  # the criterion reads only its calibration batches and the record's extras
        extra: dict = {}

    crit = harness.create("criterion", "block-influence")
    crit.calibration = lambda ctx, model: [{"inputs": {"x": x, "t": torch.zeros(2)}, "noise": x}]
    assert crit.score(model, [unit], Ctx())["blocks.0"] == pytest.approx(2 / 8, abs=1e-12)


def test_an_identity_block_scores_zero_and_is_removed_first():
    ctx = _ctx({"name": "dit", "size": "tiny", "input_size": 8, "in_channels": 4, "num_classes": 3, "patch": 2,
                "depth": 3, "hidden_size": 32, "num_heads": 2})
    model = ctx.model.eval()
    _perturb(model)
    with torch.no_grad():  # block 1's gates back to 0: it returns its input unchanged
        model.blocks[1].adaLN_modulation[-1].weight.zero_()
        model.blocks[1].adaLN_modulation[-1].bias.zero_()
    scores = _score(ctx, model)
    assert scores["blocks.1"] == pytest.approx(0.0, abs=1e-12)
    assert min(scores["blocks.0"], scores["blocks.2"]) > 1e-3
    block = sum(p.numel() for p in model.blocks[0].parameters())
    total = sum(p.numel() for p in model.parameters())
    spec = PruneSpec(criterion={"name": "block-influence"}, ratio=0.9 * block / total, calibration_batch=BATCH,
                     calibration_timesteps=TIMESTEPS)
    plan, info = prune(ctx, model, model, spec)
    assert plan == {"skip": ["blocks.1"], "drop": []} and info["removed"] == ["blocks.1"]


def test_depth_keeps_the_blocks_of_highest_influence():
    ctx = _ctx({"name": "dit", "size": "tiny", "input_size": 8, "in_channels": 4, "num_classes": 3, "patch": 2,
                "depth": 4, "hidden_size": 32, "num_heads": 2})
    model = ctx.model.eval()
    _perturb(model)
    scores = _score(ctx, model)
    spec = PruneSpec(criterion="block-influence", depth=2, calibration_batch=BATCH, calibration_timesteps=TIMESTEPS)
    plan, info = prune(ctx, model, model, spec)
    assert sorted(plan["skip"]) == sorted(sorted(scores, key=scores.get)[:2]) and len(model.blocks) == 4
    assert sum(type(b).__name__ == "DiTBlock" for b in model.blocks) == 2  # the other two are Skips now


def test_lamamba_blocks_compare_tokens_along_channels():
    # attention in place of the SS2D branch: the block and its (B, L, C) layout are LaMamba-Diff's,
    # and a CPU scan would make this test take half a minute
    ctx = _ctx({"name": "lamamba", "size": "tiny", "input_size": 8, "num_classes": 3, "ssm": "attention",
                "widths": [16, 32, 64, 64], "num_heads": 2})
    model = ctx.model.eval()
    _perturb(model)
    blocks = {n: m for n, m in model.named_modules() if type(m).__name__ == "LaMambaBlock"}
    scores = _score(ctx, model, batch_size=2, timesteps=2)
    expected = _hooked_bi(model, blocks, _batches(ctx, model, 2, 2), -1)  # (B, L, C) tokens
    assert set(scores) == set(expected) and len(expected) > 4
    for name in expected:
        assert scores[name] == pytest.approx(expected[name], abs=1e-6)


def test_unet_units_compare_positions_along_channels_and_skip_pairs_are_never_removed():
    ctx = _ctx({"name": "unet", "preset": "adm-small", "input_size": 8, "num_classes": 3})
    model = ctx.model.eval()
    _perturb(model, std=0.05)
    units = [u for u in harness.discover_units(model) if u.removable]
    pairs = [u.name for u in units if u.drop]
    single = {u.name: u.submodules(model)[0] for u in units if not u.drop}
    assert pairs and single
    resnets = {n: m for n, m in single.items() if type(m).__name__ == "ResnetBlock2D"}
    scores = _score(ctx, model, units, batch_size=2, timesteps=2)
    assert set(scores) == set(single)  # the pairs are left out, not scored 0
    assert set(ctx.extra["block_influence"]["unscored"]) == set(pairs)
    assert all("skip" in reason for reason in ctx.extra["block_influence"]["unscored"].values())
    batches = _batches(ctx, model, 2, 2)
    # ResNets: forward(input_tensor, temb) on (B, C, H, W); the cosine along C at each position
    expected = _hooked_bi(model, resnets, batches, 1)
    for name in resnets:
        assert scores[name] == pytest.approx(expected[name], abs=1e-6)
    assert len(scores) > len(resnets)  # attention units are scored too

    spec = PruneSpec(criterion="block-influence", ratio=0.3, calibration_batch=2, calibration_timesteps=2)
    student = ctx.model
    plan, info = prune(ctx, student, student, spec)
    assert plan["drop"] == [] and plan["skip"] and not set(info["removed"]) & set(pairs)


def test_a_backbone_with_no_unit_in_the_definition_is_refused_at_validation(tmp_path, capsys, monkeypatch):
    import harness_compress.criteria as criteria

    suite = tmp_path / "s.yaml"
    suite.write_text("suite: s\nbase:\n  backbone: {name: dit, size: tiny, input_size: 8, depth: 2}\n"
                     "  data: {name: shapes, resolution: 8, size: 8}\n  train: {steps: 1, batch_size: 2}\n"
                     "  prune: {criterion: block-influence, ratio: 0.3}\n  metrics: [params]\n  device: cpu\n")
    assert main(["validate", str(suite)]) == 0  # a DiT: every block is inside the definition
    capsys.readouterr()
    only_pairs = [harness.Unit("down.1+up.1", "skip-pair", 10, drop=("down.1", "up.1"))]
    monkeypatch.setattr(criteria, "discover_units", lambda model: only_pairs)
    criteria._KINDS.clear()
    try:
        assert main(["validate", str(suite)]) == 2
    finally:
        criteria._KINDS.clear()
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "s.yaml:6" in err and "block influence" in err and "skip pair" in err, err


def test_a_dit_pruned_by_block_influence_and_retrained_runs(tmp_path):
    """The issue's acceptance run: a tiny DiT trained on `shapes`, half its parameters pruned by
    block influence, then retrained against the teacher."""
    suite = {
        "suite": "bi-retrain", "seed": 0,
        "base": {
            "backbone": {"name": "dit", "size": "tiny", "input_size": 8, "depth": 4, "hidden_size": 32,
                         "num_heads": 2},
            "data": {"name": "shapes", "resolution": 8, "size": 32},
            "train": {"steps": 4, "batch_size": 4, "lr": 0.001},
            "prune": {"criterion": "block-influence", "ratio": 0.5, "calibration_batch": 4,
                      "calibration_timesteps": 2},
            "distill": {"losses": ["task", "output-kd"], "steps": 3, "batch_size": 4},
            "metrics": ["params", {"name": "output_loss", "batch_size": 4, "timesteps": 1}],
            "device": "cpu", "threads": 1,
        },
    }
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    results = tmp_path / "results"
    assert main(["run", str(path), "--results", str(results)]) == 0
    (record_path,) = (results / "bi-retrain").glob("*.json")
    record = json.loads(record_path.read_text())
    assert record["status"] == "ok", record["error"]
    pruned = record["prune"]
    assert pruned["criterion"] == "block-influence"
    scores = pruned["scores"]
    assert set(scores) == {f"blocks.{i}" for i in range(4)}
    removed = sorted(pruned["plan"]["skip"])
    assert pruned["plan"]["drop"] == [] and removed == sorted(pruned["removed"])
    # the blocks are equal: the fewest that hold half the parameters go, those of lowest influence
    block = (pruned["params_before"] - pruned["params_after"]) / len(removed)
    k = len(removed)
    assert (k - 1) * block < 0.5 * pruned["params_before"] <= k * block and 0 < k < 4
    assert removed == sorted(sorted(scores, key=scores.get)[:k])
    assert record["prune"]["removed_params_ratio"] >= 0.5
    curve = record["distill"]["loss_curve"]
    assert [step for step, *_ in curve][-1] == 3 and all(loss > 0 for _, loss, *_ in curve)
    assert record["metrics"]["params"]["value"] == pruned["params_after"]
    assert record["metrics"]["output_loss"]["value"] > 0


def test_the_depth_pruning_study_suite_validates(monkeypatch):
    """suites/depth-pruning.yaml (docs/studies/depth-pruning.md): every cell is valid, and the
    U-Net cell that block influence cannot reach (50% of adm-small) is excluded."""
    from pathlib import Path

    from harness.suite import load_suite

    repo = Path(__file__).resolve().parent.parent
    monkeypatch.chdir(repo)
    assert main(["validate", "suites/depth-pruning.yaml"]) == 0
    cells = [c.config for c in load_suite(repo / "suites" / "depth-pruning.yaml").cells()]
    assert not [c for c in cells if c["backbone"]["name"] == "unet" and c["prune"]["criterion"] == "block-influence"
                and c["prune"]["ratio"] == 0.5]
    assert {c["prune"]["criterion"] if isinstance(c["prune"]["criterion"], str) else c["prune"]["criterion"]["name"]
            for c in cells} == {"block-influence", "tinyfusion", "laptop", "similarity", "random"}
