"""Sample-quality metrics (validation loss, FID, KID, IS, the ADM evaluator's sFID, precision,
recall, and EDM2's FD_DINOv2) and the ``harness fid`` command.

Public API for other plugins: ``evaluate_images`` (:func:`harness_quality.evaluate.evaluate`:
the ADM metrics of an image folder or npz against a reference), :func:`image_size`,
:func:`resized_folder`, and for a stage that extracts features as it makes images (the
``sample`` stage): :class:`~harness_quality.streaming.Extractors`,
:class:`~harness_quality.streaming.StreamedFeatures`, :func:`~harness_quality.streaming.merge_shards`
and ``STREAMED_METRICS`` (the metric names that score such features). A stage that generates images (``ctx.samples``, see
:func:`harness.hookspecs.harness_stages`) has them scored by fid/kid/isc/sfid/precision/recall/fd_dinov2."""
from __future__ import annotations

import harness

from .commands import COMMANDS
# not bound as ``evaluate``: that name is the submodule's, which tests and users patch
from .evaluate import evaluate as evaluate_images, image_size, resized_folder
from .metrics import FDDinoV2, FID, ISC, KID, SFID, Precision, Recall, ValLoss
from .streaming import NEEDS, Extractors, StreamedFeatures, merge_shards

STREAMED_METRICS = tuple(NEEDS)

__all__ = ["STREAMED_METRICS", "Extractors", "StreamedFeatures", "evaluate_images", "image_size", "merge_shards",
           "resized_folder"]


@harness.hookimpl
def harness_metrics():
    return {"val_loss": ValLoss, "fid": FID, "kid": KID, "isc": ISC, "sfid": SFID, "precision": Precision,
            "recall": Recall, "fd_dinov2": FDDinoV2}


@harness.hookimpl
def harness_commands():
    return dict(COMMANDS)
