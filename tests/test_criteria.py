"""Pruning criteria on a tiny DiT (every block a unit) and a tiny SD U-Net."""
from __future__ import annotations

import copy

import pytest
import torch

import harness
from harness.context import CellContext
from harness.suite import CellConfig
from harness_compress.calibration import calibration_inputs, output_loss, reference_outputs
from harness_compress.units import apply_plan, discover


@pytest.fixture
def ctx():
    config = CellConfig.model_validate({
        "backbone": {"name": "dit", "size": "tiny", "input_size": 8, "in_channels": 4, "num_classes": 3,
                     "patch": 2, "depth": 3, "hidden_size": 32, "num_heads": 2},
        "metrics": ["params"], "device": "cpu"})
    c = CellContext("t", "cell", 0, config)
    model = c.model.eval()
    # DiT blocks start as the identity (adaLN-Zero); give blocks 1 and 2 growing gates
    for i, scale in ((1, 0.05), (2, 0.5)):
        torch.nn.init.normal_(model.blocks[i].adaLN_modulation[-1].weight, std=scale)
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)  # zero-initialised: output would be 0
    return c


def _score(name, ctx, **options):
    model = ctx.model
    units = discover(model)
    crit = harness.create("criterion", name, **options)
    return crit.score(model, units, ctx)


def test_laptop_is_the_output_loss_of_removing_the_unit(ctx):
    scores = _score("laptop", ctx, batch_size=4, timesteps=3)
    assert scores["blocks.0"] == pytest.approx(0.0, abs=1e-10)  # an identity block costs nothing
    assert scores["blocks.2"] > scores["blocks.1"] > 0
    batches = calibration_inputs(ctx, ctx.model, 4, 3)
    refs = reference_outputs(ctx.model, batches, 4)
    pruned = apply_plan(copy.deepcopy(ctx.model), {"skip": ["blocks.2"], "drop": []})
    assert output_loss(pruned, batches, refs, 4) == pytest.approx(scores["blocks.2"], rel=1e-5)


def test_similarity_ranks_like_the_gates(ctx):
    scores = _score("similarity", ctx, batch_size=4, timesteps=2)
    assert scores["blocks.0"] == pytest.approx(0.0, abs=1e-3)
    assert scores["blocks.2"] > scores["blocks.1"] > scores["blocks.0"]


def test_magnitude_and_taylor(ctx):
    with torch.no_grad():
        for p in ctx.model.blocks[1].parameters():
            p.mul_(10)
    mag = _score("magnitude", ctx)
    assert max(mag, key=mag.get) == "blocks.1"
    taylor = _score("taylor", ctx, batch_size=4, timesteps=2)
    assert all(v >= 0 for v in taylor.values()) and taylor["blocks.1"] > 0
    assert all(p.grad is None for p in ctx.model.parameters())  # leaves no gradients behind


def test_random_is_seeded(ctx):
    a, b = _score("random", ctx, seed=1), _score("random", ctx, seed=1)
    assert a == b and a != _score("random", ctx, seed=2)


def test_bksdm_ranks_pairs_first_and_needs_a_unet(ctx):
    from diffusers import UNet2DConditionModel

    with pytest.raises(harness.UserError, match="U-Net"):
        _score("bk-sdm", ctx)
    unet = UNet2DConditionModel(sample_size=16, layers_per_block=2, block_out_channels=(16, 32, 32, 32),
                                cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8)
    units = [u for u in discover(unet) if u.removable]
    scores = harness.create("criterion", "bk-sdm").score(unet, units, ctx)
    lowest = sorted(scores, key=scores.get)[:4]
    assert all("+" in n for n in lowest)  # the down/up pairs BK-SDM removes


def test_criteria_leave_the_model_in_its_mode(ctx):
    from harness_compress.calibration import evaluating

    model = ctx.model.train()
    for name in ("laptop", "taylor", "similarity"):
        _score(name, ctx, batch_size=2, timesteps=1)
        assert model.training, name
    with pytest.raises(RuntimeError):
        with evaluating(model):
            assert not model.training
            raise RuntimeError("boom")
    assert model.training
