"""Distillation losses, feature hooks with renamed (pruned) students, and loss shares."""
from __future__ import annotations

import copy

import pytest
import torch

import harness
from harness_compress.distill import DistillObjective, FeatureTap, feature_points
from harness_compress.units import apply_plan, bksdm_plan


def _loss(name, **kw):
    return harness.create("loss", name, **kw)


def test_loss_values():
    s, t, noise = torch.zeros(2, 3), torch.ones(2, 3), torch.full((2, 3), 2.0)
    feats_s = {"a": torch.zeros(2, 4), "b": torch.ones(2, 4)}
    feats_t = {"a": torch.ones(2, 4), "b": torch.full((2, 4), 3.0)}
    assert _loss("task")(s, t, noise, {}, {}).item() == pytest.approx(4.0)
    assert _loss("output-kd")(s, t, noise, {}, {}).item() == pytest.approx(1.0)
    assert _loss("feature-kd")(s, t, noise, feats_s, feats_t).item() == pytest.approx(1.0 + 4.0)
    # ||t - s||^2 / ||t||^2 per term: 8/8 + 32/72; the large feature no longer dominates
    assert _loss("normalized-feature-kd")(s, t, noise, feats_s, feats_t).item() == pytest.approx(1 + 32 / 72)


def _dit():
    torch.manual_seed(0)
    model = harness.create("backbone", "dit", size="tiny", input_size=8, in_channels=4, num_classes=3, patch=2,
                           depth=3, hidden_size=32, num_heads=2, learn_sigma=False)
    for block in model.blocks:
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.1)
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)
    return model


def test_objective_trains_a_pruned_student_and_keeps_shares():
    teacher = _dit().eval().requires_grad_(False)
    student = apply_plan(copy.deepcopy(teacher), {"skip": ["blocks.1"], "drop": []}).requires_grad_(True)
    losses = [("task", _loss("task"), 1.0), ("output-kd", _loss("output-kd"), 1.0),
              ("normalized-feature-kd", _loss("normalized-feature-kd"), 2.0)]
    objective = DistillObjective(losses, channels=4, teacher=teacher)
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t, y = torch.tensor([10, 700]), torch.tensor([0, 2])
    loss, terms = objective(student, x0, t, y, noise, 0.5 * x0 + 0.5 * noise, teacher)
    loss.backward()
    assert set(terms) == {"task", "output-kd", "normalized-feature-kd"}
    assert loss.item() == pytest.approx(sum(float(v) for v in terms.values()), rel=1e-5)
    assert student.blocks[0].attn.qkv.weight.grad is not None
    shares = objective.shares()
    assert sum(shares["losses"].values()) == pytest.approx(1.0)
    feats = shares["features"]["normalized-feature-kd"]
    assert set(feats) == {"blocks.0", "blocks.1", "blocks.2"} and sum(feats.values()) == pytest.approx(1.0)
    objective.close()


def _lamamba():
    torch.manual_seed(0)
    model = harness.create("backbone", "lamamba", size="tiny", input_size=8, num_classes=3, learn_sigma=False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # leave adaLN-Zero's zero gates, so every stage changes its input
        for p in model.parameters():
            if (p == 0).all():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


LAMAMBA_STAGES = ["encoder.0", "encoder.1", "encoder.2", "encoder.3", "mid",
                  "decoder.0", "decoder.1", "decoder.2", "decoder.3"]


def test_lamamba_features_are_one_per_stage():
    assert feature_points(_lamamba()) == LAMAMBA_STAGES  # not the blocks inside them as well


@pytest.mark.parametrize("loss_name", ["feature-kd", "normalized-feature-kd"])
def test_lamamba_feature_loss_is_the_sum_over_its_stages(loss_name):
    teacher = _lamamba().eval().requires_grad_(False)
    student = apply_plan(copy.deepcopy(teacher), {"skip": ["encoder.1.blocks.0", "decoder.0.blocks.1"], "drop": []})
    x_t, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 700]), torch.tensor([0, 2])

    def stage_outputs(model):  # hooked here by hand, on the stage modules themselves
        stages = [*model.encoder, model.mid, *model.decoder]
        out, handles = [], [s.register_forward_hook(lambda m, a, o: out.append(o)) for s in stages]
        with torch.no_grad():
            model(x_t, t, y)
        for h in handles:
            h.remove()
        return out

    pairs = list(zip(stage_outputs(student), stage_outputs(teacher)))
    assert len(pairs) == 9
    if loss_name == "feature-kd":
        expected = sum(float((s - f).pow(2).mean()) for s, f in pairs)
    else:
        expected = sum(float((f - s).pow(2).sum() / f.pow(2).sum()) for s, f in pairs)
    objective = DistillObjective([(loss_name, _loss(loss_name), 1.0)], channels=4, teacher=teacher)
    _, terms = objective(student, x_t, t, y, torch.randn(2, 4, 8, 8), x_t, teacher)
    assert expected > 0
    assert float(terms[loss_name]) == pytest.approx(expected, rel=1e-5)
    assert list(objective.shares()["features"][loss_name]) == LAMAMBA_STAGES
    objective.close()


def test_features_follow_renamed_modules_after_drops():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(sample_size=16, layers_per_block=2, block_out_channels=(16, 32, 32, 32),
                                cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8)
    teacher_points = feature_points(unet)
    assert "down_blocks.0" in teacher_points and "mid_block" in teacher_points and "up_blocks.3" in teacher_points
    student = apply_plan(copy.deepcopy(unet), bksdm_plan(unet, "bk-sdm-tiny"))
    tap = FeatureTap(student, teacher_points)
    with torch.no_grad():
        student(torch.randn(1, 4, 16, 16), torch.tensor([3]), encoder_hidden_states=torch.randn(1, 3, 16))
    feats = tap.pop()
    # the tiny student's first up block is the teacher's second one; its innermost stage is gone
    assert "up_blocks.1" in feats and "up_blocks.0" not in feats and "down_blocks.3" not in feats
    assert feats["up_blocks.1"].shape[1] == 32
    tap.close()


def test_a_compression_cell_end_to_end(tmp_path):
    """Teacher trained and cached, pruned by laptop, retrained with two losses, measured."""
    from harness.runner import CellJob, execute_cell

    config = {"backbone": {"name": "dit", "size": "tiny", "patch": 2, "depth": 3, "hidden_size": 32, "num_heads": 2},
              "data": {"name": "shapes", "resolution": 8, "size": 32},
              "train": {"steps": 2, "batch_size": 4},
              "prune": {"criterion": "laptop", "ratio": 0.3, "calibration_batch": 2, "calibration_timesteps": 2,
                        "additivity": 3},
              "distill": {"losses": ["task", {"name": "normalized-feature-kd", "weight": 0.5}], "steps": 2,
                          "batch_size": 4},
              "metrics": ["params", {"name": "output_loss", "batch_size": 2, "timesteps": 2}], "device": "cpu"}
    job = CellJob("t", "t.yaml", "c1", "base", 0, config, str(tmp_path / "t"))
    record = execute_cell(job)
    assert record["status"] == "ok", record.get("traceback")
    prune = record["prune"]
    assert prune["criterion"] == "laptop" and prune["removed_params_ratio"] >= 0.3
    assert len(prune["plan"]["skip"]) >= 1 and prune["additivity"]["subsets"] == 3
    assert set(record["distill"]["shares"]["losses"]) == {"task", "normalized-feature-kd"}
    assert (tmp_path / "t" / "teachers").is_dir() and (tmp_path / "t" / "c1" / "pruned" / "plan.json").is_file()
    assert not (tmp_path / "t" / "c1" / "teacher-checkpoint.safetensors").exists()  # cached: no longer needed

    # The figures again, by hand, from what the cell saved: the cached teacher, the pruned and
    # distilled student, and the held-out inputs (a suite-wide seed stream: same draw here).
    from safetensors.torch import load_file

    from harness.context import CellContext
    from harness.suite import CellConfig
    from harness_compress.calibration import calibration_inputs
    from harness_compress.units import load_pruned

    ctx = CellContext("t", "c1", 0, CellConfig.model_validate(config))
    teacher = ctx.model.eval()
    (cache,) = (tmp_path / "t" / "teachers").glob("*.safetensors")
    teacher.load_state_dict(load_file(str(cache)))
    student = load_pruned(copy.deepcopy(teacher), tmp_path / "t" / "c1" / "pruned").eval()
    removed = sum(p.numel() for n in prune["plan"]["skip"] for p in teacher.get_submodule(n).parameters())
    assert prune["removed_params_ratio"] == pytest.approx(removed / sum(p.numel() for p in teacher.parameters()))
    batches = calibration_inputs(ctx, teacher, 2, 2, split="val", purpose="output-loss")
    with torch.no_grad():
        errors = [(student(**b["inputs"])[:, :3] - teacher(**b["inputs"])[:, :3]).pow(2).mean() for b in batches]
    expected = float(sum(errors)) / 2
    assert expected > 0 and record["metrics"]["output_loss"]["value"] == pytest.approx(expected, rel=1e-5)


def test_output_loss_is_measured_on_held_out_data(tmp_path):
    """The metric's default set is the val split with its own seeds, not the calibration set
    the criterion scored on (whose loss the prune record keeps as ``one_shot_output_loss``)."""
    from harness.runner import CellJob, execute_cell

    config = {"backbone": {"name": "dit", "size": "tiny", "patch": 2, "depth": 3, "hidden_size": 32, "num_heads": 2},
              "data": {"name": "shapes", "resolution": 8, "size": 16},
              "train": {"steps": 10, "batch_size": 4, "lr": 0.01},
              "prune": {"criterion": "magnitude", "ratio": 0.3, "calibration_batch": 4, "calibration_timesteps": 3},
              "metrics": [{"name": "output_loss", "batch_size": 4, "timesteps": 3}], "device": "cpu"}
    record = execute_cell(CellJob("t", "t.yaml", "c1", "base", 0, config, str(tmp_path / "t")))
    assert record["status"] == "ok", record.get("traceback")
    held = record["metrics"]["output_loss"]
    assert held["data"].startswith("held-out") and held["value"] > 0
    assert held["value"] != pytest.approx(record["prune"]["one_shot_output_loss"], rel=1e-3, abs=0)


def test_output_loss_inputs_held_out_or_in_sample():
    import copy

    from harness.context import CellContext
    from harness.suite import CellConfig
    from harness_compress.calibration import calibration_inputs, output_loss, reference_outputs
    from harness_compress.metrics import OutputLoss
    from harness_compress.units import apply_plan

    config = CellConfig.model_validate({
        "backbone": {"name": "dit", "size": "tiny", "input_size": 8, "in_channels": 3, "patch": 2, "depth": 2},
        "data": {"name": "shapes", "resolution": 8, "size": 16}, "metrics": ["params"], "device": "cpu"})
    ctx = CellContext("t", "c", 0, config)
    teacher = ctx.model.eval()
    torch.nn.init.normal_(teacher.final_layer.linear.weight, std=0.1)  # zero-initialised: output would be 0
    torch.nn.init.normal_(teacher.blocks[1].adaLN_modulation[-1].weight, std=0.5)
    ctx.teacher, ctx.model = teacher, apply_plan(copy.deepcopy(teacher), {"skip": ["blocks.1"], "drop": []})
    calib = calibration_inputs(ctx, teacher, 4, 2)
    held = calibration_inputs(ctx, teacher, 4, 2, split="val", purpose="output-loss")
    assert not torch.equal(calib[0]["inputs"]["x"], held[0]["inputs"]["x"])
    assert not torch.equal(calib[0]["noise"], held[0]["noise"])
    in_sample = output_loss(ctx.model, calib, reference_outputs(teacher, calib, 3), 3)
    assert OutputLoss(4, 2, held_out=False)(ctx)["value"] == pytest.approx(in_sample, rel=1e-6)
    assert OutputLoss(4, 2)(ctx)["value"] == pytest.approx(output_loss(ctx.model, held, reference_outputs(teacher, held, 3), 3), rel=1e-6)
    with pytest.raises(Exception, match="val split of 'shapes' has 16 images; 32 were asked"):
        OutputLoss(32, 2)(ctx)
