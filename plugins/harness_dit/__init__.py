"""DiT backbones (Peebles & Xie), with token mixers taken from the registry."""
from __future__ import annotations

import harness

from .models import DIT_SIZES, dit


@harness.hookimpl
def harness_backbones():
    return {"dit": dit}


__all__ = ["DIT_SIZES", "dit"]
