"""The ``deepcache`` stage: DeepCache (Ma, Fang & Wang, CVPR 2024) on the diffusers U-Nets and
its block-residual analogue on DiT, checked against the plain model, against their own helper
(or a transcription of its split), and inside a suite."""
from __future__ import annotations

import copy
import math
import string
import textwrap

import numpy as np
import pytest
import torch

import harness
from harness import sample_batch
from harness.cli import main
from harness.errors import UserError
from harness.records import load_records
from harness_accel import deepcache as dc
from harness_accel.deepcache import DeepCacheSpec, enable

STEPS = 7  # full steps 0, 3, 6 at interval 3: a trajectory ends on a full step and has two cached runs


pytestmark = pytest.mark.usefixtures("one_thread")


def _sd_unet():
    """SD-1.5's block types and two layers per block (the layout DeepCache's helper numbers
    branches for) at the smallest width: skips conv_in, 3 in block 0, 2 in block 1."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
                                block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=32,
                                attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()


def _sd():
    from harness_unet import TextUNet

    return TextUNet(_sd_unet()).eval()


def _adm():
    return harness.create("backbone", "unet", preset="adm-tiny", input_size=8, num_classes=10).eval()


def _dit():
    model = harness.create("backbone", "dit", size="tiny", input_size=8, patch=2, num_classes=10).eval()
    with torch.no_grad():  # adaLN-Zero starts as the identity: perturb it, or every block is a no-op
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


BACKBONES = {"sd-tiny": _sd, "adm-tiny": _adm, "dit-tiny": _dit}


def _sample(model, name, steps=STEPS, cfg=2.0, indices=(0, 1)):
    """A whole DDIM trajectory with guidance (two passes a step) from the harness's sampler."""
    kwargs = dict(shape=(4, 8, 8), sampler="ddim", steps=steps, cfg_scale=cfg, seed=3)
    if name == "sd-tiny":
        g = torch.Generator().manual_seed(1)
        kwargs.update(cond=torch.randn(len(indices), 77, 32, generator=g),
                      null_cond=torch.zeros(len(indices), 77, 32), guided_channels=None)
    else:
        kwargs.update(num_classes=10, labels=[1, 2][:len(indices)])
    return sample_batch(model, list(indices), **kwargs)[0]


# -- parity with the plain model ------------------------------------------------------------------
@pytest.mark.parametrize("name", BACKBONES)
def test_interval_one_is_the_plain_model_bit_for_bit(name):
    # Every step is full: each module runs its own forward in the order the model calls it, so
    # the trajectory is not merely close but identical (no op is reordered).
    torch.manual_seed(0)
    plain = BACKBONES[name]()
    cached = copy.deepcopy(plain)
    enable(cached, DeepCacheSpec(interval=1, branch=1))
    assert torch.equal(_sample(plain, name), _sample(cached, name))


@pytest.mark.parametrize("name", BACKBONES)
def test_deep_blocks_run_on_full_steps_only(name):
    torch.manual_seed(0)
    plain = BACKBONES[name]()
    model = copy.deepcopy(plain)
    cache = enable(model, DeepCacheSpec(interval=3, branch=1))
    deep, shallow = _probes(model, name)
    counts = {"deep": 0, "shallow": 0}
    hooks = [deep.register_forward_hook(lambda *_: counts.__setitem__("deep", counts["deep"] + 1)),
             shallow.register_forward_hook(lambda *_: counts.__setitem__("shallow", counts["shallow"] + 1))]
    try:
        out = _sample(model, name)
    finally:
        for h in hooks:
            h.remove()
    full = [s for s in range(STEPS) if s % 3 == 0]
    assert cache.trajectory.full == [s in full for s in range(STEPS)]
    assert counts == {"deep": 2 * len(full), "shallow": 2 * STEPS}  # two passes a step (guidance)
    assert not torch.allclose(out, _sample(plain, name))  # the cached steps do change the result


def _probes(model, name):
    """A module inside the part cached steps skip, and one on the path every step runs."""
    if name == "dit-tiny":
        return model.blocks[2].mlp, model.blocks[0].mlp  # depth 4, branch 1: blocks 1-2 are the middle
    unet = model.unet
    return unet.mid_block.resnets[0], unet.conv_in


def test_branch_is_the_skip_index_the_reference_helper_numbers():
    # sd-tiny (two layers per block, four blocks): skip 0 is conv_in, then three per block but
    # the last. Branch 4 = block 1, layer 1: its first ResNet and attention run, the second not.
    unet = harness.create("backbone", "unet", preset="sd-tiny", input_size=8).unet
    assert dc.skip_count(unet) == 12
    cache = dc.DeepCache(DeepCacheSpec(interval=3, branch=4), "unet")
    dc.split_unet(unet, cache, 4)
    patched = {m._deepcache_key for m in unet.modules() if "_deepcache" in m.__dict__}
    assert ("down", 0) not in patched and ("down", 1, 0, 0) not in patched and ("down", 1, 1, 0) in patched
    assert {("down", 2), ("down", 3), ("mid",), ("up", 0), ("up", 1)} <= patched
    # up block 2 (block 1's side) consumes skips 6, 5, 4: the first of its three layers is cached
    assert ("up", 2, 0, 0) in patched and ("up", 2, 1, 0) not in patched and ("up", 3) not in patched
    with pytest.raises(UserError, match="6 skip branches"):
        enable(_sd(), DeepCacheSpec(branch=6))


# -- trajectories ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["adm-tiny", "dit-tiny"])
def test_every_trajectory_starts_with_a_full_step(name):
    torch.manual_seed(0)
    model = BACKBONES[name]()
    cache = enable(model, DeepCacheSpec(interval=3, branch=1))
    first = _sample(model, name)
    second = _sample(model, name)  # the same inputs again: a new trajectory, not step 7
    assert torch.equal(first, second)
    third = _sample(model, name, steps=4, indices=(5,))  # another batch, another length
    assert cache.finished[-2:] == [[s % 3 == 0 for s in range(STEPS)]] * 2
    assert cache.trajectory.full == [True, False, False, True] and third.shape[0] == 1


@pytest.mark.parametrize("name", BACKBONES)
def test_outside_a_trajectory_a_forward_is_the_full_model(name):
    torch.manual_seed(0)
    plain = BACKBONES[name]()
    model = copy.deepcopy(plain)
    enable(model, DeepCacheSpec(interval=5, branch=0))
    inputs = plain.example_inputs(2) if hasattr(plain, "example_inputs") else \
        harness.example_inputs(plain, {"input_size": 8, "in_channels": 4, "num_classes": 10}, 2, "cpu")
    with torch.no_grad():
        ref = plain(**inputs)
        for _ in range(3):  # the latency metric: one call, repeated
            assert torch.equal(model(**inputs), ref)
        # timesteps that differ within the batch (a denoising loss) or go up are no trajectory
        for t in ([999, 10], [10, 10], [500, 500]):
            batch = dict(inputs, t=torch.tensor(t))
            assert torch.equal(model(**batch), plain(**batch))
    model.train()
    batch = dict(inputs, t=torch.tensor([400, 400]))
    with torch.no_grad():
        model(**dict(inputs, t=torch.tensor([500, 500])))
        assert torch.equal(model(**batch), plain.train()(**batch))  # training is never cached


def test_reset_and_a_repeated_timestep():
    torch.manual_seed(0)
    model = _adm()
    cache = enable(model, DeepCacheSpec(interval=2, branch=0))
    x = torch.randn(1, 4, 8, 8)
    y = torch.tensor([3])
    with torch.no_grad():
        model(x, torch.tensor([900]), y)
        model(x + 1, torch.tensor([800]), y)
        assert cache.trajectory.full == [True, False]
        model(x + 2, torch.tensor([800]), y)  # PNDM evaluates one timestep twice: the next step
        assert cache.trajectory.full == [True, False, True]
        dc.reset(model)
        model(x, torch.tensor([700]), y)
        assert cache.trajectory.full == [True]


# -- their code ------------------------------------------------------------------------------------
def _tokenizer():
    from transformers import CLIPTokenizer

    chars = list(string.ascii_lowercase)
    tokens = ["<|startoftext|>", "<|endoftext|>", "<unk>"] + chars + [c + "</w>" for c in chars]
    vocab = {t: i for i, t in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], unk_token="<unk>", bos_token="<|startoftext|>",
                         eos_token="<|endoftext|>", pad_token="<|endoftext|>", model_max_length=77)


def _pipeline(unet):
    """A Stable Diffusion pipeline at CPU scale, built in memory around ``unet``."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    text = CLIPTextConfig(vocab_size=55, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                          pad_token_id=1)
    vae = AutoencoderKL(block_out_channels=(8, 16), norm_num_groups=8, latent_channels=4, sample_size=16,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=CLIPTextModel(text), tokenizer=_tokenizer(), unet=unet,
                                   scheduler=DDIMScheduler(clip_sample=False), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _latents(pipe, steps=STEPS):
    return pipe("a red circle", num_inference_steps=steps, guidance_scale=7.5, height=16, width=16,
                generator=torch.Generator().manual_seed(0), output_type="latent").images


@pytest.mark.parametrize("branch", range(6))
def test_equal_to_deepcache_sd_helper_in_a_diffusers_pipeline(branch):
    """DeepCache's own ``DeepCacheSDHelper`` (PyPI ``DeepCache``) and ours, on one pipeline with
    the same interval and branch: the same latents, bit for bit."""
    from DeepCache import DeepCacheSDHelper  # the test extra's pinned DeepCache==0.1.1

    torch.manual_seed(0)
    pipe = _pipeline(_sd_unet())
    plain = _latents(pipe)
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=3, cache_branch_id=branch)
    helper.enable()
    try:
        theirs = _latents(pipe)
    finally:
        helper.disable()
    assert torch.equal(_latents(pipe), plain)  # their disable() left the U-Net as it was
    cache = enable(pipe.unet, DeepCacheSpec(interval=3, branch=branch))
    ours = _latents(pipe)
    assert cache.trajectory.full == [s % 3 == 0 for s in range(STEPS)]
    assert not torch.equal(ours, plain)
    assert torch.equal(ours, theirs)


def _their_quad_center(total_numbers, n_samples, center, pow=1.2):
    """``sample_from_quad_center`` of DeepCache/sd/pipeline_stable_diffusion.py, transcribed (the
    reference of the non-uniform schedule; their helper implements the uniform one only)."""
    import warnings

    while pow > 1:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numpy warns as it drops the imaginary part, as theirs does
            x_values = np.linspace((-center) ** (1 / pow), (total_numbers - center) ** (1 / pow), n_samples + 1)
            indices = [0] + [x + center for x in np.unique(np.int32(x_values ** pow))[1:-1]]
        if len(indices) == n_samples:
            break
        pow -= 0.02
    if pow <= 1:
        raise ValueError("Cannot find suitable pow")
    return sorted(int(i) for i in indices)


@pytest.mark.parametrize("total,interval,center", [(50, 3, 15), (50, 5, 20), (100, 4, 40), (25, 2, 10), (20, 3, 0)])
def test_non_uniform_schedule_is_theirs(total, interval, center):
    n = math.ceil(total / interval)
    assert dc.quad_center_steps(total, n, center) == _their_quad_center(total, n, center)
    spec = DeepCacheSpec(interval=interval, schedule="non-uniform", steps=total, center=center)
    assert spec.full_steps(total) == _their_quad_center(total, n, center)
    assert [s for s in range(total) if spec.is_full(s)] == spec.full_steps(total)
    assert spec.full_steps(total + 2)[-2:] == [total, total + 1]  # past its layout: full


def test_schema():
    assert DeepCacheSpec.model_validate(4).interval == 4
    assert DeepCacheSpec().model_dump() == {"interval": 3, "branch": 0, "schedule": "uniform", "steps": None,
                                            "center": None, "power": 1.2}
    for bad, match in [({"interval": 0}, "greater than or equal to 1"), ({"schedule": "non-uniform"}, "needs steps"),
                       ({"center": 3}, "belong to schedule: non-uniform"), ({"cache": 2}, "Extra inputs"),
                       ({"schedule": "non-uniform", "steps": 10, "center": 10}, "below steps")]:
        with pytest.raises(ValueError, match=match):
            DeepCacheSpec.model_validate(bad)


# -- FLOPs and the suite -------------------------------------------------------------------------------
def test_a_cached_step_counts_the_branch_only():
    model = _sd()
    enable(model, DeepCacheSpec(interval=3, branch=0))
    inputs = model.example_inputs(1)
    full, cached = dc.step_gflops(model, inputs)
    plain = harness.count_flops(_sd(), inputs).total / 1e9
    assert full == pytest.approx(plain, rel=1e-9) and 0 < cached < 0.2 * full


def test_flops_command_reports_both_steps(capsys):
    import json

    assert main(["flops", "dit", "--size", "tiny", "--input-size", "8", "--json", "--deepcache",
                 '{"interval": 3, "branch": 1}']) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["deepcache"]["gflops_full_step"] == pytest.approx(out["gflops"])
    assert 0 < out["deepcache"]["gflops_cached_step"] < out["gflops"]
    assert main(["flops", "dit", "--size", "tiny", "--deepcache", "often"]) == 2
    assert "expected an interval" in capsys.readouterr().err
    assert main(["flops", "dit", "--size", "tiny", "--input-size", "8", "--deepcache", "3"]) == 0
    out = capsys.readouterr().out  # not "0.0% of N parameters removed": nothing was to be removed
    assert "deepcache  3: applied; parameters unchanged" in out and "removed" not in out


SUITE = """\
suite: accel
seed: 0
base:
  backbone: {name: unet, preset: adm-tiny, input_size: 8, in_channels: 3, num_classes: 10}
  metrics: [params, gflops, {name: sample_latency, steps: 4, runs: 1, warmup: 0}]
  device: cpu
matrix:
  deepcache: [null, {interval: 2, branch: 1}]
"""


def test_a_suite_cell_records_what_deepcache_changed(tmp_path):
    path = tmp_path / "accel.yaml"
    path.write_text(SUITE)
    assert main(["run", str(path), "--results", str(tmp_path / "r")]) == 0
    recs = {bool(r["config"].get("deepcache")): r for r in load_records(tmp_path / "r" / "accel")}
    cached, plain = recs[True], recs[False]
    assert cached["status"] == "ok", cached.get("error")
    changed = cached["metrics"]["sample_latency"]["sampling_changed_by"]
    assert changed == {"deepcache": "DeepCache, branch 1: deep features reused on 1 of every 2 steps"}
    assert "sampling_changed_by" not in cached["metrics"]["gflops"]
    assert "sampling_changed_by" not in plain["metrics"]["sample_latency"]
    info = cached["deepcache"]
    assert info["trajectories"]["sample_latency"]["full_steps"] == [0, 2]
    assert info["gflops_full_step"] == pytest.approx(cached["metrics"]["gflops"]["value"])
    assert info["gflops_cached_step"] < info["gflops_full_step"]
    assert cached["metrics"]["params"]["value"] == plain["metrics"]["params"]["value"]


def test_validation_refuses_a_backbone_it_cannot_split(tmp_path, capsys):
    path = tmp_path / "lamamba.yaml"
    path.write_text(textwrap.dedent("""\
        suite: accel
        base:
          backbone: {name: lamamba, size: tiny}
          metrics: [params]
          deepcache: {interval: 3}
        """))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"{path}:5: deepcache: deepcache applies to the U-Net backbones" in err and "'lamamba'" in err
    path.write_text(textwrap.dedent("""\
        suite: accel
        base:
          backbone: {name: dit, size: tiny, input_size: 8}
          metrics: [params]
          deepcache:
            interval: 3
            branch: 2
        """))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{path}:7: deepcache.branch: deepcache.branch 2: this DiT has 4 blocks" in err
    path.write_text(path.read_text().replace("dit, size: tiny, input_size: 8", "unet, preset: sd15"))
    assert main(["validate", str(path)]) == 0, capsys.readouterr().err
    path.write_text(path.read_text().replace("branch: 2", "branch: 12"))
    assert main(["validate", str(path)]) == 2
    assert "deepcache.branch 12: this U-Net has 12 skip branches (0-11)" in capsys.readouterr().err


def test_the_sample_stage_runs_after_the_accelerations():
    from harness.stages import order

    stages = harness.registry().stages()
    specs = {"sample": stages["sample"].schema.model_validate({"num_samples": 2}),
             "deepcache": DeepCacheSpec(), "train": stages["train"].schema.model_validate({"steps": 1})}
    assert order(stages, specs) == ["train", "deepcache", "sample"]


def test_a_copy_caches_on_its_own_modules():
    # sample_latency in another dtype samples a deepcopy: its forwards must be bound to the copy
    torch.manual_seed(0)
    model = _adm()
    original = enable(model, DeepCacheSpec(interval=3, branch=0))
    clone = copy.deepcopy(model)
    cache = dc.cache_of(clone)
    assert cache is not original and clone.unet.mid_block.__dict__["forward"].__self__ is clone.unet.mid_block
    runs = []
    clone.unet.mid_block.resnets[0].register_forward_hook(lambda *_: runs.append(1))
    _sample(clone, "adm-tiny")
    assert len(runs) == 2 * 3 and cache.trajectory.full[:4] == [True, False, False, True]
    assert original.trajectory is None  # the original saw no call


def test_other_ranks_rebuild_it_from_the_record():
    torch.manual_seed(0)
    plain = _dit()
    model = copy.deepcopy(plain)
    recorded = DeepCacheSpec(interval=2, branch=1).model_dump(exclude_none=True)
    assert dc.apply(model, recorded) == {**recorded, "backbone": "dit"}  # nothing counted on a follower rank
    assert dc.cache_of(model).spec.interval == 2
    dc.unpatch(model)
    assert dc.cache_of(model) is None and torch.equal(_sample(model, "dit-tiny"), _sample(plain, "dit-tiny"))


def test_the_sampler_starts_a_trajectory_itself():
    # An unconditional model called once (the latency metric) at a timestep above the sampler's
    # first: by timesteps and conditioning alone the sampler's first step would continue it.
    torch.manual_seed(0)
    plain = harness.create("backbone", "dit", size="tiny", input_size=8, num_classes=0).eval()
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(0.02 * torch.randn_like(p))
    fresh, used = copy.deepcopy(plain), copy.deepcopy(plain)
    enable(fresh, DeepCacheSpec(interval=3, branch=1))
    cache = enable(used, DeepCacheSpec(interval=3, branch=1))
    kwargs = dict(shape=(4, 8, 8), sampler="ddim", steps=5, seed=0)
    with torch.no_grad():
        used(torch.randn(1, 4, 8, 8), torch.tensor([995]), None)
    assert torch.equal(sample_batch(used, [0], **kwargs)[0], sample_batch(fresh, [0], **kwargs)[0])
    assert cache.trajectory.full == [True, False, False, True, False]
