"""U-Net backbones: class-conditional ADM-style and Stable Diffusion (diffusers)."""
from __future__ import annotations

import harness

from .models import PRESETS, ClassUNet, TextUNet, unet


@harness.hookimpl
def harness_backbones():
    return {"unet": unet}


__all__ = ["PRESETS", "ClassUNet", "TextUNet", "unet"]
