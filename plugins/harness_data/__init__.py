"""Built-in data sets: synthetic shapes, an image folder, CIFAR-10; latent mode via ``vae``."""
from __future__ import annotations

import harness

from .datasets import cache_root, cifar10, image_folder, shapes

# cache_root is public: the quality plugin keeps its feature caches beside the data sets'.
__all__ = ["cache_root"]


@harness.hookimpl
def harness_datasets():
    return {"shapes": shapes, "image-folder": image_folder, "cifar10": cifar10}
