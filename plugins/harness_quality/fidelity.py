"""torch-fidelity glue: where the Inception weights come from, and cached reference statistics.

torch-fidelity caches features by an input's cache name and the extractor's *name* only;
the cache name we give the reference therefore holds a hash of the images' content and of
the extractor's weights, so a changed data set or weights file can never hit a stale entry.
"""
from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

from harness.errors import MetricUnavailable, UserError

INCEPTION = "inception-v3-compat"
KEYS = {"fid": "frechet_inception_distance", "kid": "kernel_inception_distance_mean",
        "isc": "inception_score_mean"}
SPREAD = {"kid": "kernel_inception_distance_std", "isc": "inception_score_std"}


@dataclass(frozen=True)
class Extractor:
    name: str                     # torch-fidelity feature extractor name
    weights: Optional[str]        # local weights file, or None for torch-fidelity's own
    identity: str                 # what the cache key uses: name + weights content


@lru_cache(maxsize=16)
def _file_hash(path: str, mtime: float, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def file_hash(path: str | Path) -> str:
    st = os.stat(path)
    return _file_hash(str(path), st.st_mtime, st.st_size)


def _online(host: str = "github.com", port: int = 443, timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve_extractor(name: str = INCEPTION, weights: Optional[str] = None) -> Extractor:
    """The extractor and its weights: ``weights``, else $HARNESS_FID_WEIGHTS, else
    torch-fidelity's downloaded copy, else a download when online; otherwise
    MetricUnavailable with the reason (never a made-up number)."""
    import torch_fidelity.registry as reg

    if name not in reg.FEATURE_EXTRACTORS_REGISTRY:
        from harness.errors import suggest

        raise UserError(f"FID extractor {name!r} is not registered{suggest(name, reg.FEATURE_EXTRACTORS_REGISTRY)}")
    if name != INCEPTION:  # another registered extractor brings its own weights
        return Extractor(name, weights, f"{name}-{file_hash(weights) if weights else 'builtin'}")
    path = weights or os.environ.get("HARNESS_FID_WEIGHTS")
    if path:
        if not Path(path).is_file():
            raise UserError(f"FID weights {path!r} (weights option or HARNESS_FID_WEIGHTS) is not a file")
        return Extractor(name, str(path), f"{name}-{file_hash(path)}")
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    fname = URL_INCEPTION_V3.rsplit("/", 1)[-1]
    cached = Path(torch.hub.get_dir()) / "checkpoints" / fname
    if cached.is_file() or _online():
        return Extractor(name, None, f"{name}-{fname}")
    # Short: the table prints it in the cell. The file's full path is in the docs.
    raise MetricUnavailable(f"no Inception weights offline; set HARNESS_FID_WEIGHTS or the weights option "
                            f"(torch-fidelity's {fname})")


class ReferenceImages(torch.utils.data.Dataset):
    """A harness data set's images as torch-fidelity wants them: (3, H, W) uint8."""

    def __init__(self, ds, limit: Optional[int] = None):
        images = ds.uint8_images()
        self.images = images[:limit] if limit else images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def fidelity_metrics(samples: str, reference, extractor: Extractor, metrics=("fid",),
                     feature_layer: Optional[str] = None, reference_size: Optional[int] = None,
                     cuda: bool = False, cache_root: Optional[str] = None) -> dict:
    """FID / KID / IS of a sample folder against a harness data set (or a folder path)."""
    import torch_fidelity

    from harness_data.datasets import cache_root as harness_cache

    kwargs = dict(input1=samples, cuda=cuda, verbose=False, feature_extractor=extractor.name,
                  cache_root=str(cache_root or harness_cache() / "fidelity"), samples_find_deep=False)
    if extractor.weights:
        kwargs["feature_extractor_weights_path"] = extractor.weights
    n1 = len([p for p in Path(samples).glob("*.png") if ".tmp" not in p.name])
    n2 = None
    if any(m in ("fid", "kid") for m in metrics):
        if isinstance(reference, (str, Path)):
            kwargs["input2"] = str(reference)
        else:
            ref = ReferenceImages(reference, reference_size)
            n2 = len(ref)
            kwargs["input2"] = ref
            kwargs["input2_cache_name"] = f"harness-ref-{reference.content_hash}-{len(ref)}-{extractor.identity}"
    for m in metrics:
        kwargs[m] = True
        if feature_layer:
            kwargs[f"feature_layer_{m}"] = feature_layer
    if "kid" in metrics:
        kwargs["kid_subset_size"] = min(1000, n1, n2 or n1)
    if "isc" in metrics:
        kwargs["isc_splits"] = min(10, n1)
    out = torch_fidelity.calculate_metrics(**kwargs)
    m = metrics[0]
    result = {"value": float(out[KEYS[m]]), "samples": n1, "extractor": extractor.identity}
    if n2 is not None:
        result["reference_images"] = n2
    if m in SPREAD:
        result["std"] = float(out[SPREAD[m]])
    return result


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance of two Gaussians, by torch-fidelity's own formula."""
    import numpy as np
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    s1 = {"mu": np.asarray(mu1, dtype=np.float64), "sigma": np.asarray(sigma1, dtype=np.float64)}
    s2 = {"mu": np.asarray(mu2, dtype=np.float64), "sigma": np.asarray(sigma2, dtype=np.float64)}
    return fid_statistics_to_metric(s1, s2, verbose=False)[KEY_METRIC_FID]


def fid_of_folders(dir1: str, dir2: str, weights: Optional[str] = None, cuda: Optional[bool] = None,
                   extractor: str = INCEPTION, batch_size: int = 64) -> dict:
    """What ``harness fid DIR1 DIR2`` prints: torch-fidelity's FID of two image folders."""
    import torch_fidelity

    for d in (dir1, dir2):
        if not Path(d).is_dir():
            raise UserError(f"fid: {d!r} is not a folder of images")
    ext = resolve_extractor(extractor, weights)
    cuda = torch.cuda.is_available() if cuda is None else cuda
    kwargs = dict(input1=dir1, input2=dir2, fid=True, cuda=cuda, verbose=False, feature_extractor=ext.name,
                  batch_size=batch_size, cache=False)
    if ext.weights:
        kwargs["feature_extractor_weights_path"] = ext.weights
    out = torch_fidelity.calculate_metrics(**kwargs)
    return {"fid": float(out[KEYS["fid"]]), "extractor": ext.identity}
