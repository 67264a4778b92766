"""The ``tome`` stage: Token Merging for Stable Diffusion through the tomesd package, on tiny
diffusers U-Nets (the ``sd-tiny`` / ``sdxl-tiny`` presets and a saved tiny pipeline)."""
from __future__ import annotations

import json
import textwrap

import pytest
import torch

import harness
from harness.cli import main
from harness.context import CellContext
from harness.records import load_records
from harness.suite import CellConfig
from harness_accel import tome
from test_pickscore import tiny_pipeline  # noqa: F401  (fixture: a saved tiny SD pipeline)


def cell(backbone: dict, **blocks) -> CellContext:
    config = {"backbone": backbone, "metrics": ["params"], "device": "cpu", **blocks}
    return CellContext("t", "c", 0, CellConfig.model_validate(config))


def unet(preset: str = "sd-tiny", seed: int = 0):
    torch.manual_seed(seed)
    return harness.create("backbone", "unet", preset=preset, input_size=8).eval()


def small_unet():
    """Smaller than sd-tiny (two levels, one transformer block per down level): the tests
    that need no preset run in a fraction of the time."""
    from diffusers import UNet2DConditionModel
    from harness_unet import TextUNet

    torch.manual_seed(0)
    return TextUNet(UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        norm_num_groups=8, cross_attention_dim=32, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )).eval()


def inputs(model, batch: int = 2) -> dict:
    return model.example_inputs(batch, generator=torch.Generator().manual_seed(1))


def forward(model, batch: int = 2) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs(model, batch))


class Recording:
    """An attention processor that notes the length of the token sequence it is given."""

    def __init__(self, name, processor, seen):
        self.name, self.processor, self.seen = name, processor, seen

    def __call__(self, attn, hidden_states, *args, **kwargs):
        self.seen[self.name] = hidden_states.shape[1]
        return self.processor(attn, hidden_states, *args, **kwargs)


def attended_tokens(model) -> dict[str, int]:
    """Tokens each self-attention's processor receives in one forward, by block."""
    seen: dict[str, int] = {}
    blocks = tome.transformer_blocks(model.unet)
    for name, block in blocks:
        block.attn1.set_processor(Recording(name, block.attn1.processor, seen))
    forward(model)
    for _, block in blocks:  # the processors as they were
        block.attn1.set_processor(block.attn1.processor.processor)
    return seen


# -- parity: ratio 0 is the unmodified model -------------------------------------------------------
@pytest.mark.parametrize("preset", ["sd-tiny", "sdxl-tiny"])
def test_ratio_zero_outputs_equal_the_unpatched_models_exactly(preset):
    model = unet(preset)
    plain = forward(model)
    # every block through tomesd's forward (max_downsample 8), random destinations on
    tome.patch(model, tome.ToMeSpec(ratio=0, max_downsample=8, merge_crossattn=True, merge_mlp=True), seed=0)
    assert tome.is_patched(model)
    assert torch.equal(forward(model), plain)


# -- merging ------------------------------------------------------------------------------------
def test_half_ratio_merges_tokens_before_attention_lowers_gflops_and_changes_outputs():
    ctx = cell({"name": "unet", "preset": "sd-tiny", "input_size": 8}, tome={"ratio": 0.5})
    model = ctx.model.eval()
    plain_out, plain_tokens = forward(model), attended_tokens(model)
    plain_gflops = harness.count_flops(model, inputs(model, 1), ctx.registry.flop_handles()).total / 1e9
    harness.run_stages(ctx, ctx.specs, ctx.registry.stages())
    merged_tokens = attended_tokens(model)
    # the blocks on the undownsampled 8x8 latent (max_downsample 1) see half their 64 tokens
    full = {n for n, t in plain_tokens.items() if t == 8 * 8}
    assert full and all(merged_tokens[n] == 32 for n in full)
    assert all(merged_tokens[n] == plain_tokens[n] for n in plain_tokens if n not in full)
    assert not torch.allclose(forward(model), plain_out)
    record = ctx.extra["tome"]
    assert record["gflops_unmerged"] == pytest.approx(plain_gflops)  # counted as harness.count_flops counts
    assert record["gflops"] < record["gflops_unmerged"]
    assert record["blocks"] == len(plain_tokens) and record["blocks_merging"] == len(full)
    assert {n: t["self_attention"] for n, t in record["tokens"].items()} == {n: t // 2 if n in full else t
                                                                             for n, t in plain_tokens.items()}
    assert all(t["cross_attention"] == t["feed_forward"] == t["in"] for t in record["tokens"].values())
    # tomesd's matching ops have no fvcore rule: they are named, not hidden
    assert "aten::argsort" in record["uncounted_ops"]
    assert ctx.sampling_changes["tome"].startswith(f"ToMe (tomesd): 50% of the tokens merged before "
                                                   f"self-attention in {len(full)} of {len(plain_tokens)}")


def test_each_part_merges_only_when_asked_and_is_counted_where_it_merges():
    model = small_unet()
    tome.patch(model, tome.ToMeSpec(ratio=0.5, merge_attn=False, merge_mlp=True), seed=0)
    _, tokens = tome.count(model, inputs(model, 1))
    merged = {n: t for n, t in tokens.items() if t["in"] == 8 * 8}
    assert merged and all(t == {"in": 64, "self_attention": 64, "cross_attention": 64, "feed_forward": 32}
                          for t in merged.values())


def test_the_same_seed_draws_the_same_destinations(tiny_pipeline):  # noqa: F811
    spec = tome.ToMeSpec(ratio=0.5, use_rand=True)
    model = small_unet()
    tome.patch(model, spec, seed=7)
    first = forward(model)
    tome.patch(model, spec, seed=7)  # reapplying restarts tomesd's generator from the seed
    assert torch.equal(forward(model), first)
    tome.patch(model, spec, seed=8)
    assert not torch.equal(forward(model), first)
    # a rerun of the same cell: the stage seeds from the cell, so its outputs repeat
    runs = []
    for _ in range(2):
        ctx = cell({"name": "unet", "preset": "sd-tiny", "pretrained": tiny_pipeline}, tome={"ratio": 0.5})
        harness.run_stages(ctx, ctx.specs, ctx.registry.stages())
        runs.append(forward(ctx.model.eval()))
    assert torch.equal(*runs)


def test_remove_restores_the_diffusers_blocks_and_apply_patches_again():
    from diffusers.models.attention import BasicTransformerBlock

    model = small_unet()
    plain = forward(model)
    spec = tome.ToMeSpec(ratio=0.5)
    tome.patch(model, spec, seed=3)
    merged = forward(model)
    tome.remove(model)
    assert not tome.is_patched(model) and not model.unet._forward_pre_hooks
    assert all(type(b) is BasicTransformerBlock for _, b in tome.transformer_blocks(model.unet))
    assert torch.equal(forward(model), plain)
    assert tome.apply(model, {**spec.settings(), "seed": 3})["ratio"] == 0.5  # the other ranks' way in
    assert torch.equal(forward(model), merged)


def test_options_are_tomesds_and_bad_ones_are_one_line():
    assert tome.ToMeSpec().settings() == dict(ratio=0.5, max_downsample=1, sx=2, sy=2, use_rand=True,
                                              merge_attn=True, merge_crossattn=False, merge_mlp=False)
    assert tome.ToMeSpec.model_validate(0.3).ratio == 0.3  # `tome: 0.3`
    with pytest.raises(ValueError, match="at most 0.75"):
        tome.ToMeSpec(ratio=0.8)
    assert tome.ToMeSpec(ratio=0.8, sx=4).ratio == 0.8
    with pytest.raises(ValueError):
        tome.ToMeSpec(ratio=1.0, sx=8, sy=8)
    with pytest.raises(ValueError, match="extra"):
        tome.ToMeSpec.model_validate({"ratios": 0.5})
    with pytest.raises(harness.UserError, match="--tome 'oops': Input should be a valid dictionary"):
        tome.apply(small_unet(), "oops")


# -- in a suite -----------------------------------------------------------------------------------
SUITE = """\
suite: merged
seed: 0
base:
  backbone: {name: unet, preset: sd-tiny, pretrained: PIPE}
  metrics:
    - params
    - gflops
    - {name: sample_latency, steps: 1, warmup: 0, runs: 1, batch_size: 2, pipeline: PIPE}
  device: cpu
matrix:
  tome: [null, {ratio: 0.5}]
"""


def write(tmp_path, text: str, name: str = "suite.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_a_cell_with_tome_says_so_in_every_sampling_metric(tmp_path, tiny_pipeline):  # noqa: F811
    results = tmp_path / "results"
    assert main(["run", str(write(tmp_path, SUITE.replace("PIPE", tiny_pipeline))), "--results", str(results)]) == 0
    records = load_records(results / "merged")
    plain, = [r for r in records if "tome" not in r]
    merged, = [r for r in records if "tome" in r]
    assert merged["status"] == "ok", merged.get("error")
    changed = merged["metrics"]["sample_latency"]["sampling_changed_by"]
    assert set(changed) == {"tome"} and changed["tome"].startswith("ToMe (tomesd): 50% of the tokens merged")
    assert "sampling_changed_by" not in merged["metrics"]["params"]  # weights are untouched
    assert "sampling_changed_by" not in plain["metrics"]["sample_latency"]
    assert merged["tome"]["blocks_merging"] >= 1 and merged["tome"]["gflops"] < merged["tome"]["gflops_unmerged"]
    assert merged["metrics"]["params"]["value"] == plain["metrics"]["params"]["value"]
    # the cell's own gflops metric counts the patched model: the stage's figures, before and after
    assert merged["metrics"]["gflops"]["value"] == pytest.approx(merged["tome"]["gflops"])
    assert plain["metrics"]["gflops"]["value"] == pytest.approx(merged["tome"]["gflops_unmerged"])


@pytest.mark.parametrize("backbone, why", [
    ("{name: dit, size: tiny, patch: 4, input_size: 8}", "backbone 'dit' has none: it is not a diffusers model"),
    ("{name: unet, preset: adm-tiny, input_size: 8}",
     "backbone 'unet' (preset 'adm-tiny') has none: its diffusers UNet2DModel attends through plain Attention"),
])
def test_validation_refuses_a_backbone_without_transformer_blocks_at_the_blocks_line(tmp_path, capsys, backbone, why):
    text = f"suite: v\nbase:\n  backbone: {backbone}\n  metrics: [params]\n  device: cpu\n  tome: {{ratio: 0.5}}\n"
    path = write(tmp_path, text)
    code = main(["validate", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{path}:6: tome: ToMe merges tokens inside diffusers' BasicTransformerBlocks and {why}" in err
    ok = write(tmp_path, text.replace(backbone, "{name: unet, preset: sd-tiny, input_size: 8}"), "ok.yaml")
    assert main(["validate", str(ok)]) == 0, capsys.readouterr().err


def test_a_bad_option_fails_validation_at_its_key(tmp_path, capsys):
    path = write(tmp_path, "suite: v\nbase:\n  backbone: {name: unet, preset: sd-tiny}\n  metrics: [params]\n"
                           "  tome:\n    ratio: 0.9\n")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:" in err and "tome" in err and "at most 0.75" in err and err.count("\n") == 1, err


def test_listed_and_applied_by_the_flops_command(capsys):
    assert main(["ls", "stage"]) == 0
    assert "tome" in capsys.readouterr().out
    line = ["flops", "unet", "--preset", "sd-tiny", "--input-size", "8", "--json"]
    assert main(line) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(line + ["--tome", "{ratio: 0.5, max_downsample: 2}"]) == 0
    merged = json.loads(capsys.readouterr().out)
    assert merged["tome"]["max_downsample"] == 2 and merged["params"] == plain["params"]
    assert merged["gflops"] < plain["gflops"]


def test_with_deepcache_in_the_same_cell_both_apply_and_both_are_named(tiny_pipeline):  # noqa: F811
    ctx = cell({"name": "unet", "preset": "sd-tiny", "pretrained": tiny_pipeline},
               tome={"ratio": 0.5}, deepcache={"interval": 2})
    assert harness.run_stages(ctx, ctx.specs, ctx.registry.stages()) == ["deepcache", "tome"]
    assert set(ctx.sampling_changes) == {"deepcache", "tome"} and tome.is_patched(ctx.model)
    assert ctx.extra["tome"]["blocks_merging"] >= 1
    assert forward(ctx.model.eval()).shape == (2, 4, 16, 16)
