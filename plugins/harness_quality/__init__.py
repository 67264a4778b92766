"""Sample-quality metrics (validation loss, FID, KID, IS, the ADM evaluator's sFID, precision,
recall, and EDM2's FD_DINOv2; Naeem et al.'s density and coverage; CMMD of CLIP embeddings) and
the ``harness fid`` command.

Public API for other plugins: ``evaluate_images`` (:func:`harness_quality.evaluate.evaluate`:
the ADM metrics of an image folder or npz against a reference), :func:`image_size`,
:func:`resized_folder`, and for a stage that extracts features as it makes images (the
``sample`` stage): :class:`~harness_quality.streaming.Extractors`,
:class:`~harness_quality.streaming.StreamedFeatures`,
:func:`~harness_quality.streaming.merge_shards` and ``STREAMED_METRICS`` (the metric names that
score such features). A stage that generates images (``ctx.samples``, see
:func:`harness.hookspecs.harness_stages`) has them scored by fid, kid, isc, sfid, precision,
recall, fd_dinov2, density, coverage and cmmd."""
from __future__ import annotations

import importlib

import harness

__all__ = ["STREAMED_METRICS", "Extractors", "StreamedFeatures", "evaluate_images", "image_size", "merge_shards",
           "resized_folder"]
# public name -> the submodule that defines it, imported (with torch) on first use
_PUBLIC = {"Extractors": ".streaming", "StreamedFeatures": ".streaming", "merge_shards": ".streaming",
           "image_size": ".evaluate", "resized_folder": ".evaluate"}


@harness.hookimpl
def harness_metrics():
    return {name: f"harness_quality.metrics:{cls}" for name, cls in (
        ("val_loss", "ValLoss"), ("fid", "FID"), ("kid", "KID"), ("isc", "ISC"), ("sfid", "SFID"),
        ("precision", "Precision"), ("recall", "Recall"), ("fd_dinov2", "FDDinoV2"), ("density", "Density"),
        ("coverage", "Coverage"), ("cmmd", "CMMD"))}


@harness.hookimpl
def harness_commands():
    return {"fid": harness.Lazy("harness_quality.commands:COMMANDS.fid",
                                "FID, sFID, IS, precision, recall (the ADM evaluator's protocol), density, coverage, "
                                "FD_DINOv2 of image folders or .npz batches")}


def __getattr__(name):  # PEP 562: the public names load their module (and torch) on first use
    # not bound as ``evaluate``: that name is the submodule's, which tests and users patch
    if name == "evaluate_images":
        return importlib.import_module(".evaluate", __name__).evaluate
    if name == "STREAMED_METRICS":  # the metric names that score streamed features
        return tuple(importlib.import_module(".streaming", __name__).NEEDS)
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
