"""Latent mode: images encoded once by a diffusers AutoencoderKL, cached on disk.

The backbone then trains on latents, so the data set reports the latent shape (channels and
resolution / 2**(down blocks - 1)), which is what CellContext gives the backbone factory.
"""
from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

import torch

from harness import UserError


@lru_cache(maxsize=4)
def load_vae(name: str):
    """A hub id (stabilityai/sd-vae-ft-mse) or a local folder saved with save_pretrained."""
    from diffusers import AutoencoderKL

    try:
        vae = AutoencoderKL.from_pretrained(name)
    except Exception as exc:  # hub offline, bad folder: one line for the user
        raise UserError(f"vae {name!r} cannot be loaded ({type(exc).__name__}); give a hub id reachable "
                        "online or a local folder saved with AutoencoderKL.save_pretrained") from None
    return vae.eval().requires_grad_(False)


def vae_identity(name: str, vae) -> str:
    """Hash of the VAE's config and weights: a cache key that changes when the VAE does."""
    h = hashlib.sha256(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    for k, v in sorted(vae.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class LatentDataset(torch.utils.data.Dataset):
    """``source`` images as scaled VAE latents (the posterior mean times scaling_factor)."""

    def __init__(self, source, vae: str, cache_dir: Path, batch_size: int = 32):
        self.source, self.vae_name = source, vae
        self.vae = load_vae(vae)
        self.scale = float(getattr(self.vae.config, "scaling_factor", 0.18215))
        self.num_classes = source.num_classes
        self.labels = source.labels
        key = hashlib.sha256(f"{source.content_hash}/{vae_identity(vae, self.vae)}".encode()).hexdigest()[:20]
        path = Path(cache_dir) / "latents" / f"{key}.safetensors"
        self.cache_path = path
        self.latents = self._load_or_encode(path, batch_size)
        self.channels, self.resolution = self.latents.shape[1], self.latents.shape[-1]
        self.name = f"{source.name}-latent"

    def _load_or_encode(self, path: Path, batch_size: int) -> torch.Tensor:
        from harness import load_cache, save_cache

        cached = load_cache(path)  # None when missing, torn or changed since written: encoded again
        if cached is not None and "latents" in cached and len(cached["latents"]) == len(self.source):
            return cached["latents"]
        out = []
        with torch.inference_mode():
            for i in range(0, len(self.source), batch_size):
                x = torch.stack([self.source[j][0] for j in range(i, min(i + batch_size, len(self.source)))])
                # The mean, not a draw: the cache is then a pure function of images and VAE.
                out.append(self.vae.encode(x).latent_dist.mean * self.scale)
        latents = torch.cat(out).contiguous()
        save_cache(path, {"latents": latents}, what=f"the latent cache {path.name}")
        return latents

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i):
        return self.latents[i], int(self.labels[i])

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1] (for samples and FID)."""
        with torch.inference_mode():
            return self.vae.to(z.device).decode(z / self.scale).sample.clamp(-1, 1)

    def uint8_images(self) -> torch.Tensor:
        return self.source.uint8_images()

    @property
    def content_hash(self) -> str:
        return self.source.content_hash
