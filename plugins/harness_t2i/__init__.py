"""Text-to-image metrics: PickScore and CLIP score of images sampled through diffusers.

Public API for other plugins (the data and compress plugins encode captions and prompts with
it): :func:`read_prompts`, :func:`encode_prompts`, :func:`context_bytes`."""
from __future__ import annotations

import harness

from .metrics import ClipScore, PickScore
from .scoring import context_bytes, encode_prompts, read_prompts

__all__ = ["context_bytes", "encode_prompts", "read_prompts"]


@harness.hookimpl
def harness_metrics():
    return {"pickscore": PickScore, "clip_score": ClipScore}
