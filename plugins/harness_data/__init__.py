"""Built-in data sets: synthetic shapes, an image folder, CIFAR-10; latent mode via ``vae``."""
from __future__ import annotations

import importlib

import harness

# cache_root is public: the quality plugin keeps its feature caches beside the data sets'.
__all__ = ["cache_root"]
_PUBLIC = {"cache_root": ".datasets"}


@harness.hookimpl
def harness_datasets():
    return {"shapes": "harness_data.datasets:shapes", "image-folder": "harness_data.datasets:image_folder",
            "cifar10": "harness_data.datasets:cifar10"}


def __getattr__(name):  # PEP 562: the public names above load their module (and torch) on first use
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
