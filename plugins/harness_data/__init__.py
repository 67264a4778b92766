"""Built-in data sets: synthetic shapes, an image folder, CIFAR-10; latent mode via ``vae``."""
from __future__ import annotations

import harness

from .datasets import cifar10, image_folder, shapes


@harness.hookimpl
def harness_datasets():
    return {"shapes": shapes, "image-folder": image_folder, "cifar10": cifar10}
