"""Text-to-image: the ``sample`` stage (a prompt set through a diffusers pipeline with the
cell's U-Net), prompt sets (text files, MS-COCO captions), and the PickScore / CLIP score metrics.

Public API for other plugins (the data and compress plugins encode captions and prompts with
it): :func:`read_prompts`, :func:`read_prompt_set`, :func:`encode_prompts`, :func:`context_bytes`."""
from __future__ import annotations

import importlib

import harness

__all__ = ["context_bytes", "encode_prompts", "read_prompt_set", "read_prompts"]
_PUBLIC = {"context_bytes": ".scoring", "encode_prompts": ".scoring", "read_prompts": ".scoring",
           "read_prompt_set": ".prompts"}


@harness.hookimpl
def harness_metrics():
    return {"pickscore": "harness_t2i.metrics:PickScore", "clip_score": "harness_t2i.metrics:ClipScore"}


@harness.hookimpl
def harness_stages():
    return {"sample": harness.Lazy("harness_t2i.sample:STAGES.sample",
                                   "generate a prompt set's images through a diffusers pipeline with the cell's "
                                   "U-Net (and the teacher's), for the quality metrics")}


def __getattr__(name):  # PEP 562: the public names above load their module (and torch) on first use
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
