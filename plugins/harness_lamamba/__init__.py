"""LaMamba-Diff backbones (Fu, Chen, Yu, arXiv 2408.02615)."""
from __future__ import annotations

import importlib

import harness


@harness.hookimpl
def harness_backbones():
    return {"lamamba": "harness_lamamba.models:lamamba"}


__all__ = ["LAMAMBA_SIZES", "LaMambaDiff", "lamamba"]
_PUBLIC = dict.fromkeys(__all__, ".models")


def __getattr__(name):  # PEP 562: the public names above load their module (and torch) on first use
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
