"""Text-to-image: sampling a prompt set through a diffusers pipeline with the cell's U-Net (what
the ``sample`` stage of :mod:`harness_sample` runs for a block that names prompts), prompt sets
(text files, MS-COCO captions), and the PickScore / CLIP score metrics.

Public API for other plugins (the data and compress plugins encode captions and prompts with
it): :func:`read_prompts`, :func:`read_prompt_set`, :func:`encode_prompts`, :func:`context_bytes`;
for other hub-model metrics (the quality plugin's cmmd): :func:`load_pretrained`;
for the ``sample`` stage: ``TextSampleSpec`` (the text-to-image block) and ``sample_prompts``
(:func:`harness_t2i.sample.sample_cell`)."""
from __future__ import annotations

import importlib

import harness

__all__ = ["TextSampleSpec", "context_bytes", "encode_prompts", "load_pretrained", "read_prompt_set", "read_prompts",
           "sample_prompts"]
# public name -> (submodule, attribute), imported (with torch) on first use
_PUBLIC = {"context_bytes": (".scoring", "context_bytes"), "encode_prompts": (".scoring", "encode_prompts"),
           "load_pretrained": (".scoring", "load_pretrained"),
           "read_prompts": (".scoring", "read_prompts"), "read_prompt_set": (".prompts", "read_prompt_set"),
           "TextSampleSpec": (".sample", "SampleSpec"), "sample_prompts": (".sample", "sample_cell")}


@harness.hookimpl
def harness_metrics():
    return {"pickscore": "harness_t2i.metrics:PickScore", "clip_score": "harness_t2i.metrics:ClipScore"}


def __getattr__(name):  # PEP 562: the public names above load their module (and torch) on first use
    if name in _PUBLIC:
        module, attr = _PUBLIC[name]
        return getattr(importlib.import_module(module, __name__), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
