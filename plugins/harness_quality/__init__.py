"""Sample-quality metrics (validation loss, FID, KID, IS, the ADM evaluator's sFID, precision,
recall, and EDM2's FD_DINOv2) and the ``harness fid`` command.

Public API for other plugins: ``evaluate_images`` (:func:`harness_quality.evaluate.evaluate`:
the ADM metrics of an image folder or npz against a reference), :func:`image_size` and
:func:`resized_folder`. A stage that generates images (``ctx.samples``, see
:func:`harness.hookspecs.harness_stages`) has them scored by fid/kid/isc/sfid/precision/recall/fd_dinov2."""
from __future__ import annotations

import importlib

import harness

__all__ = ["evaluate_images", "image_size", "resized_folder"]


@harness.hookimpl
def harness_metrics():
    return {name: f"harness_quality.metrics:{cls}" for name, cls in (
        ("val_loss", "ValLoss"), ("fid", "FID"), ("kid", "KID"), ("isc", "ISC"), ("sfid", "SFID"),
        ("precision", "Precision"), ("recall", "Recall"), ("fd_dinov2", "FDDinoV2"))}


@harness.hookimpl
def harness_commands():
    return {"fid": harness.Lazy("harness_quality.commands:COMMANDS.fid",
                                "FID, sFID, IS, precision, recall (the ADM evaluator's protocol), FD_DINOv2 of "
                                "image folders or .npz batches")}


def __getattr__(name):  # PEP 562: the public names load their module (and torch) on first use
    # not bound as ``evaluate``: that name is the submodule's, which tests and users patch
    if name in __all__:
        evaluate = importlib.import_module(".evaluate", __name__)
        return evaluate.evaluate if name == "evaluate_images" else getattr(evaluate, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
