"""Text-to-image: sampling a prompt set through a diffusers pipeline with the cell's U-Net (what
the ``sample`` stage of :mod:`harness_sample` runs for a block that names prompts), prompt sets
(text files, MS-COCO captions), and the PickScore / CLIP score metrics.

Public API for other plugins (the data and compress plugins encode captions and prompts with
it): :func:`read_prompts`, :func:`read_prompt_set`, :func:`encode_prompts`, :func:`context_bytes`."""
from __future__ import annotations

import harness

from .metrics import ClipScore, PickScore
from .prompts import read_prompt_set
from .scoring import context_bytes, encode_prompts, read_prompts

__all__ = ["context_bytes", "encode_prompts", "read_prompt_set", "read_prompts"]


@harness.hookimpl
def harness_metrics():
    return {"pickscore": PickScore, "clip_score": ClipScore}

