"""The three Inception features the ADM evaluator reads, from torch-fidelity's port of the
2015 TensorFlow Inception (``weights-inception-2015-12-05``), batched on any device.

- ``pool``: ``pool_3`` (2048 values), for FID and precision/recall.
- ``spatial``: the first 7 channels of ``mixed_6/conv`` (a 17x17 map, 2,023 values), for sFID.
  TensorFlow's ``mixed``, ``mixed_1``... ``mixed_10`` are torch-fidelity's ``Mixed_5b``...
  ``Mixed_7c`` in order, so ``mixed_6`` is ``Mixed_6d``, and its ``conv`` is the block's 1x1
  branch (``branch1x1``, after its batch norm and ReLU). The order in which the 2,023 values are
  flattened (TF's HWC against our CHW) permutes coordinates, which no Fréchet distance sees.
- ``logits``: ``pool_3`` times the classifier's weight *without* its bias (torch-fidelity's
  ``logits_unbiased``), whose softmax the evaluator scores for IS.

Images go in as uint8 at their own size; the extractor resizes them to 299 the way TF did.

``fd_dinov2`` reads another network: torch-fidelity's DINOv2 wrapper (``dinov2-vit-l-14``),
whose one feature ``dinov2`` is ViT-L/14's output (1024 values), the input resized to
224 with its TF1-style bilinear interpolation and normalised with ImageNet's mean and std.
"""
from __future__ import annotations

from typing import Iterable, NamedTuple, Optional

import numpy as np
import torch

SPATIAL_CHANNELS = 7
FEATURES_LIST = ("2048", "logits_unbiased")


class Features(NamedTuple):
    pool: np.ndarray      # (N, 2048)
    spatial: np.ndarray   # (N, 2023)
    logits: np.ndarray    # (N, 1008)


class DinoFeatures(NamedTuple):
    dinov2: np.ndarray    # (N, 1024) for ViT-L/14


DINOV2_FEATURES = ("dinov2",)


def _nchw(batch: np.ndarray, device) -> torch.Tensor:
    # a copy: batches may be read-only maps
    return torch.from_numpy(np.array(batch, dtype=np.uint8)).permute(0, 3, 1, 2).to(device)


def probabilities(logits: np.ndarray) -> np.ndarray:
    """Softmax in float64 (the class probabilities IS is computed from)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@torch.inference_mode()
def extract(model: torch.nn.Module, batches: Iterable[np.ndarray], *, device: torch.device | str = "cpu",
            progress: Optional[callable] = None) -> Features:
    """Features of every image in ``batches`` (each (B, H, W, 3) uint8, NHWC as in ADM's npz).

    ``model`` is torch-fidelity's ``FeatureExtractorInceptionV3`` built with ``FEATURES_LIST``;
    ``progress(n)`` is called after each batch with the number of images it held.
    """
    if tuple(getattr(model, "features_list", ())) != FEATURES_LIST:
        raise ValueError(f"the extractor must produce {FEATURES_LIST}, got {getattr(model, 'features_list', None)}")
    captured: list[torch.Tensor] = []
    hook = model.Mixed_6d.branch1x1.register_forward_hook(
        lambda _m, _i, out: captured.append(out[:, :SPATIAL_CHANNELS].flatten(1).float().cpu()))
    model = model.to(device).eval()
    pools, spatials, logits = [], [], []
    try:
        for batch in batches:
            captured.clear()
            pool, logit = model(_nchw(batch, device))
            pools.append(pool.float().cpu().numpy())
            logits.append(logit.float().cpu().numpy())
            spatials.append(captured[0].numpy())
            if progress is not None:
                progress(len(batch))
    finally:
        hook.remove()
    if not pools:
        raise ValueError("no images to extract features from")
    return Features(np.concatenate(pools), np.concatenate(spatials), np.concatenate(logits))


@torch.inference_mode()
def extract_dinov2(model: torch.nn.Module, batches: Iterable[np.ndarray], *, device: torch.device | str = "cpu",
                   progress: Optional[callable] = None) -> DinoFeatures:
    """DINOv2 features of every image in ``batches`` (each (B, H, W, 3) uint8); ``model`` is
    torch-fidelity's ``FeatureExtractorDinoV2`` built with ``DINOV2_FEATURES``."""
    if tuple(getattr(model, "features_list", ())) != DINOV2_FEATURES:
        raise ValueError(f"the extractor must produce {DINOV2_FEATURES}, got {getattr(model, 'features_list', None)}")
    model = model.to(device).eval()
    out = []
    for batch in batches:
        (feats,) = model(_nchw(batch, device))
        out.append(feats.float().cpu().numpy())
        if progress is not None:
            progress(len(batch))
    if not out:
        raise ValueError("no images to extract features from")
    return DinoFeatures(np.concatenate(out))
