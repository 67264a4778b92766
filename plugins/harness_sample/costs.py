"""What a cell's ``sample`` block costs, before anything runs (``harness validate --costs``,
through :attr:`harness.Stage.costs`).

For a cell that makes images once for its quality metrics (``sample:``):

- images: ``num_samples`` (class-conditional), or the prompts it samples (text-to-image);
- denoiser forward passes, per image: ``steps``, twice that under classifier-free guidance
  (class-conditional: ``cfg_scale != 1``; text-to-image: diffusers guides when
  ``guidance_scale > 1``), each pass over one image;
- total PFLOPs: model GFLOPs x forward passes, plus the VAE decoder's GFLOPs x images
  (one multiply-add = one FLOP, the convention of the ``gflops`` metric);
- disk for what ``keep`` writes: ``png`` at most the raw 3 bytes per pixel (PNG compresses
  photographs to about half of that), ``npz`` exactly 3 bytes per pixel plus the per-shard
  copies it is assembled from, ``none`` no image at all (the features the metrics keep are
  not counted).

The denoiser is the backbone as the suite builds it, before any stage changes it (a pruning
stage makes the real figure smaller). Counts are taken on the meta device: nothing is
downloaded and no weight is read.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

# The Stable Diffusion VAE (AutoencoderKL of CompVis/stable-diffusion-v1-4's vae/config.json; the
# same decoder is in stabilityai/sd-vae-ft-ema and -mse, SD-2 and SDXL): what a VAE whose
# config.json is not on this machine is counted as, and the count says so.
SD_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
          "block_out_channels": [128, 256, 512, 512], "norm_num_groups": 32, "act_fn": "silu",
          "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4}


def vae_factor(config: dict) -> int:
    """How many pixels a latent's side stands for: 2 per down stage after the first (SD: 8)."""
    return 2 ** (len(config.get("block_out_channels", SD_VAE["block_out_channels"])) - 1)


@dataclass
class SampleCost:
    images: int
    passes_per_image: int
    resolution: int
    keep: str
    model_gflops: Optional[float] = None
    decode_gflops: Optional[float] = None
    notes: list[str] = field(default_factory=list)

    @property
    def forward_passes(self) -> int:
        return self.images * self.passes_per_image

    @property
    def pflops(self) -> Optional[float]:
        if self.model_gflops is None:
            return None
        total = self.model_gflops * self.forward_passes + (self.decode_gflops or 0.0) * self.images
        return total / 1e6

    @property
    def disk_bytes(self) -> int:
        raw = self.images * self.resolution * self.resolution * 3
        return {"png": raw, "npz": 2 * raw, "none": 0}[self.keep]

    def disk_text(self) -> str:
        if self.keep == "none":
            return "0 (keep: none)"
        if self.keep == "png":
            return f"≤ {size(self.disk_bytes)} png"
        return f"{size(self.disk_bytes // 2)} npz (2x while assembling)"


def size(n: float) -> str:
    """Bytes in decimal units: 9,830,400,000 -> 9.83 GB."""
    for unit, s in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= s:
            return f"{n / s:.3g} {unit}"
    return f"{n:.0f} B"


def _vae_config(source: Optional[str], subfolder: Optional[str] = None) -> tuple[dict, Optional[str]]:
    """The AutoencoderKL config of ``source`` (a folder, or a hub id already in the local cache),
    else the SD VAE's with a note saying so."""
    if source:
        folder = Path(source) / subfolder if subfolder else Path(source)
        if (folder / "config.json").is_file():
            return json.loads((folder / "config.json").read_text()), None
        try:
            import warnings

            from diffusers import AutoencoderKL

            with warnings.catch_warnings():  # huggingface_hub's deprecation notes: not the user's concern here
                warnings.simplefilter("ignore")
                return dict(AutoencoderKL.load_config(source, subfolder=subfolder, local_files_only=True)), None
        except Exception:  # not cached here (offline), or not a diffusers repository
            pass
    where = f"{source}{'/' + subfolder if subfolder else ''}" if source else "the data block's VAE"
    return SD_VAE, f"decoder counted as the SD VAE's ({where} has no config.json here)"


class VAEDecode(torch.nn.Module):
    """``module(z)`` is ``vae.decode(z).sample``: the decode alone, as a module to count."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, z):
        return self.vae.decode(z).sample


def decode_gflops(config: dict, latent_size: int) -> float:
    """GFLOPs of one VAE decode of a (1, C, latent_size, latent_size) latent, on the meta device."""
    from diffusers import AutoencoderKL

    from harness import count_flops, registry

    keys = set(AutoencoderKL.extract_init_dict(config)[0]) if hasattr(AutoencoderKL, "extract_init_dict") else None
    cfg = {k: v for k, v in config.items() if not k.startswith("_") and (keys is None or k in keys)}
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(cfg).eval()

    channels = int(cfg.get("latent_channels", 4))
    z = torch.zeros(1, channels, latent_size, latent_size, device="meta")
    with torch.no_grad():
        return count_flops(VAEDecode(vae), {"z": z}, registry().flop_handles()).total / 1e9


def _prompt_count(spec) -> tuple[int, Optional[str]]:
    try:
        prompts = spec.prompts
        if hasattr(prompts, "load"):
            n = len(prompts.load())
        else:
            from harness_t2i import read_prompt_set

            p = prompts if isinstance(prompts, (str, Path)) else getattr(prompts, "path", None)
            n = len(read_prompt_set(p)) if p is not None else 0
    except Exception as exc:  # a prompt set this machine cannot read yet: say so, do not guess
        return 0, f"prompts not counted ({type(exc).__name__})"
    return (min(n, spec.num_samples) if spec.num_samples else n), None


def sample_cost(config, spec, model_gflops: Optional[float], input_size: int) -> SampleCost:
    """The cost of ``config``'s sample block, ``spec`` validated. ``model_gflops``: the denoiser's
    GFLOPs per image (None when it could not be counted); ``input_size``: its latent side."""
    notes = []
    if getattr(spec, "text", False) or getattr(spec, "prompts", None) is not None:
        t2i = spec.t2i() if hasattr(spec, "t2i") else spec
        images, note = _prompt_count(t2i)
        notes += [note] if note else []
        guided = t2i.guidance_scale > 1
        vae, vae_note = _vae_config(t2i.pipeline, "vae")
        resolution = t2i.resolution or input_size * vae_factor(vae)
        keep = "png"
        latent = resolution // vae_factor(vae)
        if getattr(t2i, "teacher", False) and set(config.blocks) - {"sample"}:
            notes.append("plus the teacher's images (when a stage before keeps one), once per suite")
    else:
        images = spec.num_samples
        guided = spec.cfg_scale != 1.0
        keep = spec.keep
        latent = input_size
        data = config.data.options if config.data is not None else {}
        source = spec.vae or data.get("vae")
        if source is None and config.data is None:
            vae, vae_note, resolution = None, None, input_size  # pixel space: nothing decodes
        else:
            vae, vae_note = _vae_config(source)
            resolution = input_size * vae_factor(vae)
    passes = spec.steps * (2 if guided else 1)
    cost = SampleCost(images, passes, resolution, keep, model_gflops, notes=notes)
    if vae is not None:
        try:
            cost.decode_gflops = decode_gflops(vae, latent)
        except Exception as exc:  # noqa: BLE001 - a count that fails is reported, not fatal
            notes.append(f"VAE decode not counted ({type(exc).__name__})")
        if vae_note:
            notes.append(vae_note)
    return cost


def human(n: float) -> str:
    """12,800,000 -> 12.8M."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:g}"


def columns(cost: Optional[SampleCost]) -> tuple[str, str, str, str]:
    """(images, forward passes, PFLOPs, disk) for the costs table; blanks without a sample block."""
    if cost is None:
        return ("", "", "", "")
    pflops = "n/a" if cost.pflops is None else (f"{cost.pflops:,.0f}" if cost.pflops >= 100 else f"{cost.pflops:.3g}")
    passes = f"{human(cost.forward_passes)} ({cost.passes_per_image}/image)"
    return (f"{cost.images:,}", passes, pflops, cost.disk_text())


def describe(cost: Any) -> str:
    return "; ".join(cost.notes) if cost is not None else ""


def stage_costs(config, spec, model_gflops: Optional[float], input_size: int) -> dict[str, str]:
    """:attr:`harness.Stage.costs` of the sample stage: one row of the costs table."""
    cost = sample_cost(config, spec, model_gflops, input_size)
    images, passes, pflops, disk = columns(cost)
    return {"images": images, "denoiser passes": passes, "PFLOPs": pflops, "disk": disk, "note": describe(cost)}
