"""Text-to-image metrics: PickScore and CLIP score of images sampled through diffusers."""
from __future__ import annotations

import harness

from .metrics import ClipScore, PickScore


@harness.hookimpl
def harness_metrics():
    return {"pickscore": PickScore, "clip_score": ClipScore}
