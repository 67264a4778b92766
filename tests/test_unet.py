"""U-Net backbones: ADM-style class-conditional and Stable Diffusion presets (diffusers)."""
from __future__ import annotations

import pytest
import torch

import harness
from harness import UserError


def _meta(**options):
    with torch.device("meta"):
        return harness.create("backbone", "unet", **options)


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_sd15_parameter_count_on_meta():
    model = _meta(preset="sd15", input_size=64)
    assert _params(model) == 859_520_964
    assert type(model.unet).__name__ == "UNet2DConditionModel"  # reachable for pruning


@pytest.mark.parametrize("preset, native", [("sd15", 64), ("sdxl", 128), ("adm-tiny", 32)])
def test_default_input_is_the_presets_native_size(preset, native):
    assert _meta(preset=preset).input_size == native
    assert _meta(preset=preset, input_size=24).input_size == 24  # an explicit size wins


def test_cell_input_spec_reads_the_native_size_from_the_model():
    """`harness flops unet --preset sd15` measures SD-1.5 at its 64x64 latent, not 32."""
    from harness.context import CellContext
    from harness.suite import CellConfig

    def spec(**options):
        config = CellConfig.model_validate({"backbone": {"name": "unet", "preset": "sd-tiny", **options},
                                            "metrics": ["params"], "device": "cpu"})
        ctx = CellContext("s", "c", 0, config)
        return ctx.input_spec["input_size"], ctx.example_inputs(1)["x"].shape[-1]

    assert spec() == (16, 16)  # sd-tiny's sample_size
    assert spec(input_size=8) == (8, 8)


def test_sdxl_builds_on_meta_with_its_extra_inputs():
    model = _meta(preset="sdxl", input_size=128)
    assert 2.5e9 < _params(model) < 2.7e9  # SDXL's U-Net is 2.6B
    inputs = model.example_inputs(2)
    assert inputs["x"].shape == (2, 4, 128, 128)
    assert inputs["y"].shape == (2, 77, 2048)
    assert inputs["text_embeds"].shape == (2, 1280)
    assert inputs["time_ids"].shape == (2, 6)


@pytest.mark.parametrize("preset,kwargs", [("adm-tiny", {}), ("sd-tiny", {}), ("sdxl-tiny", {})])
def test_tiny_shapes_and_gradients(preset, kwargs):
    torch.manual_seed(0)
    model = harness.create("backbone", "unet", preset=preset, input_size=16, **kwargs)
    inputs = model.example_inputs(2, generator=torch.Generator().manual_seed(1))
    out = model(**inputs)
    channels = 8 if preset == "adm-tiny" else 4  # ADM learns the variance too
    assert out.shape == (2, channels, 16, 16)
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(int(g.abs().sum() > 0) for g in grads) > 0.9 * len(grads)


def test_deterministic_given_the_seed():
    def run():
        torch.manual_seed(3)
        model = harness.create("backbone", "unet", preset="sd-tiny", input_size=16).eval()
        return model(**model.example_inputs(1, generator=torch.Generator().manual_seed(4)))

    assert torch.equal(run(), run())


def test_adm_labels_matter_and_none_is_the_null_class():
    torch.manual_seed(0)
    model = harness.create("backbone", "unet", preset="adm-tiny", input_size=16, num_classes=10).eval()
    for p in model.parameters():  # leave the zero-initialised output behind
        torch.nn.init.normal_(p, std=0.05)
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([10, 500])
    a = model(x, t, torch.tensor([1, 2]))
    b = model(x, t, torch.tensor([3, 4]))
    null = model(x, t, torch.tensor([10, 10]))
    assert not torch.allclose(a, b)
    assert torch.equal(model(x, t, None), null)


@pytest.mark.parametrize("preset", ["sd-tiny", "sdxl-tiny", "adm-tiny"])
def test_pretrained_round_trip_through_save_pretrained(tmp_path, preset):
    torch.manual_seed(0)
    model = harness.create("backbone", "unet", preset=preset, input_size=16).eval()
    # A pipeline folder (unet/ inside) and a bare U-Net folder both load.
    model.unet.save_pretrained(tmp_path / "pipe" / "unet")
    model.unet.save_pretrained(tmp_path / "bare")
    inputs = model.example_inputs(1)
    ref = model(**inputs)
    for where in ("pipe", "bare"):
        loaded = harness.create("backbone", "unet", preset=preset, pretrained=str(tmp_path / where)).eval()
        assert torch.allclose(loaded(**inputs), ref, atol=1e-6)


def test_bad_preset_and_missing_weights_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="sd15"):
        harness.create("backbone", "unet", preset="sd-15")
    with pytest.raises(UserError, match="config.json"):
        harness.create("backbone", "unet", preset="sd15", pretrained=str(tmp_path))
    with pytest.raises(UserError, match="learn_sigma"):
        harness.create("backbone", "unet", preset="sd-tiny", learn_sigma=True)
    with pytest.raises(UserError, match="context_dim"):
        harness.create("backbone", "unet", preset="adm-tiny", context_dim=768)


def test_sdxl_needs_its_extra_inputs():
    model = harness.create("backbone", "unet", preset="sdxl-tiny", input_size=16)
    inputs = model.example_inputs(1)
    del inputs["time_ids"]
    with pytest.raises(ValueError, match="time_ids"):
        model(**inputs)


@pytest.mark.slow
def test_sd15_gflops_with_the_sdpa_handle():
    """SD-1.5 at a 64x64 latent: fvcore counts 402 G once SDPA's attention products are
    counted, 339 G without (BK-SDM prints about 339 G, from thop, which skips them)."""
    from harness.flops import count_flops
    from harness.plugins import registry

    model = harness.create("backbone", "unet", preset="sd15", input_size=64).eval()
    fc = count_flops(model, model.example_inputs(1), registry().flop_handles())
    assert fc.total / 1e9 == pytest.approx(402, rel=0.01)


def test_a_pretrained_unet_on_meta_takes_the_checkpoints_structure_and_reads_no_weight(tmp_path):
    # What `validate --costs` and the meta FLOP count build: the folder's config.json alone (the
    # weights file is gone here, so reading it would fail), with the checkpoint's own structure
    # (one block per stage fewer than the preset, as BK-SDM's U-Nets), not the preset's.
    from conftest import weightless_unet

    from harness import backbone_context
    from harness.weights import counting_structure

    config, preset = weightless_unet(tmp_path / "pruned")
    with counting_structure():  # as `harness validate --costs` builds it
        meta = backbone_context("unet", {"preset": "sd-tiny", "pretrained": str(tmp_path / "pruned")}).build_backbone(
            device="meta")
    assert all(p.is_meta for p in meta.parameters())
    expected = sum(p.numel() for p in type(preset).from_config(config).parameters())
    assert sum(p.numel() for p in meta.parameters()) == expected < sum(p.numel() for p in preset.parameters())
    with pytest.raises(Exception):  # built for real, the missing weights are an error
        harness.create("backbone", "unet", preset="sd-tiny", pretrained=str(tmp_path / "pruned"))
