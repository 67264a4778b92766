"""DiT backbones (Peebles & Xie), with token mixers taken from the registry."""
from __future__ import annotations

import harness

from .models import (DIT_SIZES, LabelEmbedder, Mlp, TimestepEmbedder, dit, get_2d_sincos_pos_embed,
                     load_checkpoint, modulate)


@harness.hookimpl
def harness_backbones():
    return {"dit": dit}


# The building blocks other backbones reuse (LaMamba-Diff embeds time and class as DiT does).
__all__ = ["DIT_SIZES", "LabelEmbedder", "Mlp", "TimestepEmbedder", "dit", "get_2d_sincos_pos_embed",
           "load_checkpoint", "modulate"]
