"""`harness validate --costs` for cells with a sample block: images, denoiser forward passes
(steps, twice under guidance), PFLOPs (denoiser x passes + VAE decode x images) and disk."""
from __future__ import annotations

import pytest
import torch

from harness.cli import main
from harness_sample.costs import VAEDecode, decode_gflops, sample_cost
from harness.flops import count_flops
from harness.plugins import registry
from harness.suite import CellConfig


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    from diffusers import AutoencoderKL

    folder = tmp_path_factory.mktemp("vae") / "tinyvae"
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                  layers_per_block=1).save_pretrained(folder)
    return folder


def _config(vae, **sample):
    return CellConfig.model_validate({
        "backbone": {"name": "dit", "size": "tiny", "patch": 2, "input_size": 8}, "metrics": ["params"],
        "sample": {"num_samples": 100, "steps": 10, "cfg_scale": 1.5, "vae": str(vae), **sample}})


def _cost(config, gflops, size):
    """The sample stage's cost of ``config``'s block, validated as the suite validates it."""
    spec = registry().stages()["sample"].schema.model_validate(config.blocks["sample"])
    return sample_cost(config, spec, gflops, size)


def test_passes_pflops_and_disk_follow_the_block(tiny_vae):
    from diffusers import AutoencoderKL

    cost = _cost(_config(tiny_vae), 0.5, 8)
    assert cost.images == 100 and cost.passes_per_image == 20 and cost.forward_passes == 2000  # 10 steps x 2 (cfg)
    # the decoder counted independently: the real (tiny) VAE on a 1x4x8x8 latent
    vae = AutoencoderKL.from_pretrained(tiny_vae).eval()
    with torch.no_grad():
        real = count_flops(VAEDecode(vae),
                           {"z": torch.zeros(1, 4, 8, 8)}, registry().flop_handles(), abstract=False).total / 1e9
    assert cost.decode_gflops == pytest.approx(real, rel=1e-9) and real > 0
    assert cost.pflops == pytest.approx((0.5 * 2000 + real * 100) / 1e6, rel=1e-12)
    assert cost.resolution == 16 and cost.disk_bytes == 100 * 16 * 16 * 3  # 8x8 latent, VAE factor 2
    unguided = _cost(_config(tiny_vae, cfg_scale=1.0, keep="none"), 0.5, 8)
    assert unguided.forward_passes == 1000 and unguided.disk_bytes == 0
    assert _cost(_config(tiny_vae, keep="npz"), 0.5, 8).disk_bytes == 2 * 100 * 16 * 16 * 3  # parts + npz
    assert decode_gflops(dict(AutoencoderKL.load_config(tiny_vae)), 8) == pytest.approx(real, rel=1e-9)


def test_validate_costs_prints_the_sampling_table(tiny_vae, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    suite = tmp_path / "s.yaml"
    suite.write_text(f"suite: s\nbase:\n  backbone: {{name: dit, size: tiny, patch: 2, input_size: 8}}\n"
                     f"  sample: {{num_samples: 50000, steps: 250, cfg_scale: 1.5, vae: {tiny_vae}, keep: none}}\n"
                     f"  metrics: [params, isc]\n  device: cpu\n")
    assert main(["validate", str(suite), "--costs"]) == 0
    out = capsys.readouterr().out
    assert "what the sample block costs" in out and "50,000" in out and "25M (500/image)" in out, out
    assert "0 (keep: none)" in out


def test_validate_costs_counts_a_pretrained_unet_from_its_own_config(tmp_path, capsys, monkeypatch):
    # A smaller checkpoint (one ResNet per stage where the preset has two, as BK-SDM removes
    # blocks) is costed from its config.json, without its weights; one whose config cannot be
    # read is n/a with the reason, never the preset's figure passed off as the checkpoint's.
    from conftest import weightless_unet

    monkeypatch.setenv("COLUMNS", "200")
    config, unet = weightless_unet(tmp_path / "small")
    suite = tmp_path / "s.yaml"
    suite.write_text(f"suite: s\nbase:\n  backbone: {{name: unet, preset: sd-tiny, input_size: 16}}\n"
                     f"  metrics: [params]\n  device: cpu\n"
                     f"include:\n  - {{backbone.pretrained: {tmp_path / 'small'}}}\n"
                     f"  - {{backbone.pretrained: {tmp_path / 'absent'}}}\n")  # no folder: not built
    assert main(["validate", str(suite), "--costs"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    from harness_unet.models import TextUNet

    small = TextUNet(type(unet).from_config(config))  # built for real, independently of the meta path
    expected = count_flops(small, small.example_inputs(1), registry().flop_handles(), abstract=False).total / 1e9
    by_label = {r[0].rsplit("/", 1)[-1]: r[1:] for r in rows if r and "pretrained=" in r[0]}
    assert by_label["small"][:2] == [f"{sum(p.numel() for p in small.parameters()) / 1e6:.2f}M", f"{expected:.3f}"]
    assert by_label["absent"][:2] == ["n/a", "n/a"] and "not built on meta here" in " ".join(by_label["absent"])


def test_validate_costs_costs_each_cell_with_its_own_block(tmp_path, capsys, monkeypatch):
    # Cells that share a backbone share its count, not their sample blocks: a guided cell makes
    # twice the passes of an unguided one (the table once gave both the first cell's block).
    monkeypatch.setenv("COLUMNS", "200")
    suite = tmp_path / "s.yaml"
    suite.write_text("suite: s\nbase:\n  backbone: {name: dit, size: tiny, patch: 2, input_size: 8}\n"
                     "  sample: {num_samples: 100, steps: 10, keep: none}\n  metrics: [params, isc]\n"
                     "  device: cpu\nmatrix:\n  sample.cfg_scale: [1.0, 1.5]\n")
    assert main(["validate", str(suite), "--costs"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if "/image)" in line}
    assert "1k (10/image)" in rows["sample.cfg_scale=1.0"] and "2k (20/image)" in rows["sample.cfg_scale=1.5"]
