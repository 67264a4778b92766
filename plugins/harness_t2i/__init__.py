"""Text-to-image: sampling a prompt set through a diffusers pipeline with the cell's U-Net (what
the ``sample`` stage of :mod:`harness_sample` runs for a block that names prompts), prompt sets
(text files, MS-COCO captions), and the PickScore / CLIP score metrics.

Public API for other plugins (the data and compress plugins encode captions and prompts with
it): :func:`read_prompts`, :func:`read_prompt_set`, :func:`encode_prompts`, :func:`context_bytes`;
for the ``sample`` stage: ``TextSampleSpec`` (the text-to-image block) and ``sample_prompts``
(:func:`harness_t2i.sample.sample_cell`)."""
from __future__ import annotations

import harness

from .metrics import ClipScore, PickScore
from .prompts import read_prompt_set
from .sample import SampleSpec as TextSampleSpec, sample_cell as sample_prompts
from .scoring import context_bytes, encode_prompts, read_prompts

__all__ = ["TextSampleSpec", "context_bytes", "encode_prompts", "read_prompt_set", "read_prompts", "sample_prompts"]


@harness.hookimpl
def harness_metrics():
    return {"pickscore": PickScore, "clip_score": ClipScore}

