"""LaMamba-Diff backbones (Fu, Chen, Yu, arXiv 2408.02615)."""
from __future__ import annotations

import harness

from .models import LAMAMBA_SIZES, LaMambaDiff, lamamba


@harness.hookimpl
def harness_backbones():
    return {"lamamba": lamamba}


__all__ = ["LAMAMBA_SIZES", "LaMambaDiff", "lamamba"]
