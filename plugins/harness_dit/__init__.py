"""DiT backbones (Peebles & Xie), with token mixers taken from the registry."""
from __future__ import annotations

import importlib

import harness


@harness.hookimpl
def harness_backbones():
    return {"dit": "harness_dit.models:dit"}


# The building blocks other backbones reuse (LaMamba-Diff embeds time and class as DiT does).
__all__ = ["DIT_SIZES", "LabelEmbedder", "Mlp", "TimestepEmbedder", "dit", "get_2d_sincos_pos_embed",
           "load_checkpoint", "modulate"]
_PUBLIC = dict.fromkeys(__all__, ".models")


def __getattr__(name):  # PEP 562: the public names above load their module (and torch) on first use
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
