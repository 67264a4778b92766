"""Prunable units: discovery, removal, save/load, BK-SDM presets, budgeted selection."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import harness
from harness_compress.selection import additivity, select_units
from harness_compress.units import (apply_plan, bksdm_plan, conflicts, discover, load_pruned, merge_plans,
                                    save_pruned)

SD15 = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768, attention_head_dim=8)
TINY = dict(SD15, block_out_channels=(16, 32, 32, 32), cross_attention_dim=16, attention_head_dim=4,
            norm_num_groups=8, sample_size=16)


def _unet(cfg, device="cpu"):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device(device):
        return UNet2DConditionModel(**cfg)


def _params(m):
    return sum(p.numel() for p in m.parameters())


def _run(unet):
    x, ctx = torch.randn(2, 4, 16, 16), torch.randn(2, 5, 16)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 500]), encoder_hidden_states=ctx, return_dict=False)[0]


def test_discovery_reports_unremovable_with_reasons():
    units = {u.name: u for u in discover(_unet(TINY))}
    assert units["down_blocks.0.resnets.0"].removable
    assert not units["down_blocks.1.resnets.0"].removable
    assert "channels" in units["down_blocks.1.resnets.0"].reason
    assert not units["up_blocks.1.resnets.1"].removable
    assert "skip" in units["up_blocks.1.resnets.1"].reason
    assert units["down_blocks.0.attentions.1"].kind == "attention"
    pairs = [u for u in units.values() if u.kind == "skip-pair"]
    assert len(pairs) == 4 and all(len(u.drop) >= 2 for u in pairs)


def test_removal_runs_saves_and_loads(tmp_path):
    unet = _unet(TINY)
    units = [u for u in discover(unet) if u.removable]
    chosen = [u for u in units if u.kind == "skip-pair"][:1]
    for u in units:
        if len(chosen) < 3 and not any(conflicts(u, c) for c in chosen):
            chosen.append(u)
    assert not any(conflicts(a, b) for i, a in enumerate(chosen) for b in chosen[i + 1:])
    plan = merge_plans(chosen)
    before = _params(unet)
    apply_plan(unet, plan)
    assert _params(unet) == before - sum(u.params for u in chosen)
    out = _run(unet)
    assert out.shape == (2, 4, 16, 16) and torch.isfinite(out).all()
    save_pruned(unet, plan, tmp_path / "pruned")
    again = load_pruned(_unet(TINY), tmp_path / "pruned")
    torch.testing.assert_close(_run(again), out)


@pytest.mark.parametrize("preset,reference", [
    ("bk-sdm-base", dict(layers_per_block=1)),
    ("bk-sdm-small", dict(layers_per_block=1, mid_block_type=None)),
    ("bk-sdm-tiny", dict(layers_per_block=1, mid_block_type=None, block_out_channels=(320, 640, 1280),
                         down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3)),
])
def test_bksdm_presets_equal_the_bksdm_architectures(preset, reference):
    """Removing BK-SDM's blocks from SD-1.5 gives exactly the U-Net diffusers builds from
    BK-SDM's configuration: same parameter names, shapes and count."""
    full = _unet(SD15, "meta")
    pruned = apply_plan(full, bksdm_plan(full, preset))
    ref = _unet(dict(SD15, **reference), "meta")
    assert {k: v.shape for k, v in pruned.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert _params(pruned) == _params(ref)


def test_bksdm_tiny_runs_on_a_small_sd_unet():
    unet = _unet(TINY)
    apply_plan(unet, bksdm_plan(unet, "bk-sdm-tiny"))
    assert _run(unet).shape == (2, 4, 16, 16)


def test_dit_blocks_are_units():
    model = harness.create("backbone", "dit", size="tiny", input_size=8, in_channels=4, num_classes=3, patch=2)
    units = discover(model)
    assert [u.name for u in units] == [f"blocks.{i}" for i in range(4)]
    apply_plan(model, {"skip": ["blocks.1"], "drop": []})
    out = model(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 1]))
    assert out.shape == (2, 8, 8, 8)


def test_lamamba_blocks_are_units_and_the_pruned_model_saves_and_loads(tmp_path):
    def build():
        torch.manual_seed(0)
        return harness.create("backbone", "lamamba", size="tiny", input_size=16, in_channels=4, num_classes=3)

    model = build().eval()
    units = discover(model)
    assert units and all(u.removable and u.kind == "block" for u in units)
    assert {"mid.blocks.0", "encoder.0.blocks.0", "decoder.3.blocks.1"} <= {u.name for u in units}
    before = _params(model)
    plan = {"skip": ["mid.blocks.0", "decoder.1.blocks.1"], "drop": []}
    apply_plan(model, plan)
    removed = sum(u.params for u in units if u.name in plan["skip"])
    assert _params(model) == before - removed
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([3, 700]), torch.tensor([0, 2])
    with torch.no_grad():
        out = model(x, t, y)
    assert out.shape[0] == 2 and out.shape[2:] == (16, 16) and torch.isfinite(out).all()
    save_pruned(model, plan, tmp_path / "pruned")
    with torch.no_grad():
        torch.testing.assert_close(load_pruned(build(), tmp_path / "pruned").eval()(x, t, y), out)


def test_adm_small_can_lose_half_its_parameters_and_still_runs():
    """The compression suite's U-Net: skip pairs and attention make a 50% budget reachable
    (adm-tiny, one ResNet per stage, stops near a third)."""
    model = harness.create("backbone", "unet", preset="adm-small", input_size=16, in_channels=3, num_classes=4)
    total = _params(model)
    units = [u for u in discover(model) if u.removable]
    assert any(u.kind == "skip-pair" for u in units) and any(u.kind == "attention" for u in units)
    clashes = [(a.name, b.name) for i, a in enumerate(units) for b in units[i + 1:] if conflicts(a, b)]
    chosen = select_units({u.name: 1.0 for u in units}, {u.name: float(u.params) for u in units}, 0.5 * total,
                          "knapsack", clashes)
    pruned = apply_plan(model, merge_plans([u for u in units if u.name in chosen]))
    assert _params(pruned) <= 0.5 * total
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert pruned(x, torch.tensor([10, 500]), torch.tensor([0, 3])).shape == (2, 6, 16, 16)
    tiny = harness.create("backbone", "unet", preset="adm-tiny", input_size=16, in_channels=3, num_classes=4)
    tiny_units = [u for u in discover(tiny) if u.removable]
    with pytest.raises(harness.UserError, match="not reachable"):
        select_units({u.name: 1.0 for u in tiny_units}, {u.name: float(u.params) for u in tiny_units},
                     0.5 * _params(tiny), "knapsack")


def test_knapsack_beats_greedy_where_greedy_is_wrong():
    # Greedy by score per parameter takes the two cheap halves (1.2 in all); the exact
    # solution removes 'a' alone (0.9).
    scores = {"a": 0.9, "b": 0.6, "c": 0.6}
    weights = {"a": 10.0, "b": 6.0, "c": 6.0}
    exact = select_units(scores, weights, 10.0, "knapsack")
    greedy = select_units(scores, weights, 10.0, "greedy")
    assert sorted(exact) == ["a"]
    assert sum(scores[n] for n in greedy) > sum(scores[n] for n in exact)
    assert sum(weights[n] for n in greedy) >= 10


def test_selection_respects_clashes_and_unreachable_budgets():
    scores = {"a": 0.1, "b": 0.1, "c": 5.0}
    weights = {"a": 5.0, "b": 5.0, "c": 5.0}
    for method in ("knapsack", "greedy"):
        chosen = select_units(scores, weights, 10.0, method, clashes=[("a", "b")])
        assert "c" in chosen and not {"a", "b"} <= set(chosen)
    with pytest.raises(harness.UserError, match="not reachable"):
        select_units(scores, weights, 16.0)


def test_additivity_of_an_additive_loss_is_one():
    single = {f"u{i}": float(i + 1) for i in range(8)}
    result = additivity(list(single), single, lambda chosen: sum(single[n] for n in chosen), subsets=10)
    assert result["pearson"] == pytest.approx(1.0)
    assert result["pearson_ci95"] == pytest.approx([1.0, 1.0])
    result = additivity(list(single), single, lambda chosen: float(len(chosen) % 2), subsets=10)
    assert result["pearson"] < 0.9


def test_additivity_reports_bootstrap_intervals_that_narrow_with_more_subsets():
    single = {f"u{i}": float(i + 1) for i in range(12)}
    noise = np.random.default_rng(0)

    def noisy(chosen):
        return sum(single[n] for n in chosen) * float(noise.uniform(0.5, 1.5))

    small = additivity(list(single), single, noisy, subsets=12, seed=1)
    large = additivity(list(single), single, noisy, subsets=200, seed=1)
    for r in (small, large):
        lo, hi = r["pearson_ci95"]
        assert lo <= r["pearson"] <= hi < 1 and r["spearman_ci95"][0] <= r["spearman"] <= r["spearman_ci95"][1]
    assert np.diff(large["pearson_ci95"])[0] < np.diff(small["pearson_ci95"])[0]


def test_prune_command_lists_units(capsys):
    import json

    from harness.cli import main

    assert main(["prune", "dit", "--size", "tiny", "--depth", "3", "--input-size", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [u["name"] for u in out["units"]] == ["blocks.0", "blocks.1", "blocks.2"]
    assert all(u["removable"] and u["params"] > 0 for u in out["units"])
    assert main(["flops", "dit", "--size", "tiny", "--input-size", "8", "--prune", "bk-sdm-smal"]) == 2
    assert "did you mean 'bk-sdm-small'" in capsys.readouterr().err


def test_bksdm_presets_give_the_published_sizes():
    """BK-SDM prints sizes rounded up to 0.01B; with that rounding every preset's exact count
    is the published U-Net size, and the SD-1.x teacher is its 0.86B."""
    from harness_compress.units import BKSDM_PUBLISHED_B, SD1_UNET_PARAMS, bksdm_reference, bksdm_size

    full = _unet(SD15, "meta")
    assert _params(full) == SD1_UNET_PARAMS and bksdm_size(SD1_UNET_PARAMS) == 0.86
    for preset, published in BKSDM_PUBLISHED_B.items():
        pruned = _params(apply_plan(_unet(SD15, "meta"), bksdm_plan(_unet(SD15, "meta"), preset)))
        ref = bksdm_reference(preset, SD1_UNET_PARAMS, pruned)
        assert ref["match"] and ref["ours_b"] == published, preset
    assert bksdm_size(482_346_884) == 0.49 and round(482_346_884 / 1e9, 2) == 0.48  # why rounding matters
    assert bksdm_reference("bk-sdm-small", 1234, 1000) is None  # not an SD-1.x U-Net: no published size


def test_bksdm_rounding_reproduces_the_whole_pipeline_sizes():
    """The rounding convention, checked on figures we do not ship: text encoder + U-Net + VAE
    decoder of SD-1.4 and the three students are the model card's 1.04 / 0.76 / 0.66 / 0.50B."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    from harness_compress.units import bksdm_size

    with torch.device("meta"):
        decoder = AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4, layers_per_block=2,
                                down_block_types=("DownEncoderBlock2D",) * 4,
                                up_block_types=("UpDecoderBlock2D",) * 4).decoder
        text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                            num_hidden_layers=12, vocab_size=49408, max_position_embeddings=77))
    rest = _params(decoder) + _params(text)
    assert rest == 49_490_179 + 123_060_480
    sizes = {None: 1.04, "bk-sdm-base": 0.76, "bk-sdm-small": 0.66, "bk-sdm-tiny": 0.50}
    for preset, published in sizes.items():
        unet = _unet(SD15, "meta")
        if preset:
            unet = apply_plan(unet, bksdm_plan(unet, preset))
        assert bksdm_size(_params(unet) + rest) == published, preset
