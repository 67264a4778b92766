"""Built-in token mixers. Each maps (B, L, dim) tokens on an H x W grid to (B, L, dim)."""
from __future__ import annotations

import harness

from .attention import attention


@harness.hookimpl
def harness_mixers():
    return {"attention": attention}
