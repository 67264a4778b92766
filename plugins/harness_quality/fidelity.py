"""torch-fidelity glue: where the Inception weights come from, and cached reference features.

torch-fidelity's own paths would unpickle what the user names: its extractors
``torch.load(weights_only=False)`` a weights file, and its cache reads ``.pt`` pickles back.
So the weights are read here by :mod:`harness.weights` (tensors only) and handed to the
extractor, and features are computed with torch-fidelity's own functions
(``get_featuresdict_from_dataset``, ``fid_statistics_to_metric``, ...), so every figure is the
one ``torch_fidelity.calculate_metrics`` gives, while reference features are cached by us as
``.safetensors``, which cannot carry code. The cache name holds a hash of the images' content
and of the extractor's weights, so a changed data set or weights file never hits a stale entry.
"""
from __future__ import annotations

import hashlib
import io
import os
import socket
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

from harness import MetricUnavailable, UserError

INCEPTION = "inception-v3-compat"
DINOV2 = "dinov2-vit-l-14"                     # torch-fidelity's name for torch.hub's dinov2_vitl14
DINOV2_CHECKPOINT = "dinov2_vitl14_pretrain.pth"
KEYS = {"fid": "frechet_inception_distance", "kid": "kernel_inception_distance_mean",
        "isc": "inception_score_mean"}
SPREAD = {"kid": "kernel_inception_distance_std", "isc": "inception_score_std"}


class WeightsUnavailable(MetricUnavailable):
    """No Inception weights: unlike DINOv2's, a local file (the weights option) can stand in."""


@dataclass(frozen=True)
class Extractor:
    name: str                     # torch-fidelity feature extractor name
    weights: Optional[str]        # local weights file, or None for torch-fidelity's own
    identity: str                 # what the cache key uses: name + weights content
    source: str = "FID weights"   # where the weights were named, for error messages


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


@lru_cache(maxsize=2)
def _read_weights(path: str, mtime: float, size: int, what: str) -> dict:
    from harness import load_state_dict

    return load_state_dict(path, what=what)


def read_weights(path: str | Path, what: str) -> dict:
    """The state dict in a local weights file, read safely once per content (fid, kid and isc
    of every cell use the same file)."""
    st = os.stat(path)
    return _read_weights(str(path), st.st_mtime, st.st_size, what)


def _online(host: str = "github.com", port: int = 443, timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve_extractor(name: str = INCEPTION, weights: Optional[str] = None,
                      option: str = "weights option") -> Extractor:
    """The extractor and its weights: ``weights`` (given as ``option``), else
    $HARNESS_FID_WEIGHTS, else torch-fidelity's downloaded copy, else a download when online;
    otherwise MetricUnavailable with the reason (never a made-up number)."""
    import torch_fidelity.registry as reg

    if name not in reg.FEATURE_EXTRACTORS_REGISTRY:
        from harness import suggest

        raise UserError(f"FID extractor {name!r} is not registered{suggest(name, reg.FEATURE_EXTRACTORS_REGISTRY)}")
    if name != INCEPTION:  # another registered extractor brings its own weights
        from torch_fidelity.feature_extractor_clip import FeatureExtractorCLIP
        from torch_fidelity.feature_extractor_dinov2 import FeatureExtractorDinoV2

        own_loader = (FeatureExtractorCLIP, FeatureExtractorDinoV2)
        if weights and issubclass(reg.FEATURE_EXTRACTORS_REGISTRY[name], own_loader):
            # torch-fidelity reads CLIP weights as TorchScript and takes none for DINOv2: not a state dict.
            raise UserError(f"FID extractor {name!r} takes no weights file ({option}); it loads its own")
        if weights and not Path(weights).is_file():
            raise UserError(f"FID weights {weights!r} ({option}) is not a file")
        if weights:  # read now: bad weights must stop a cell before it samples, not after
            read_weights(weights, f"FID weights ({option})")
        return Extractor(name, weights, f"{name}-{file_hash(weights) if weights else 'builtin'}",
                         f"FID weights ({option})")
    path = weights or os.environ.get("HARNESS_FID_WEIGHTS")
    if path:
        source = option if weights else "HARNESS_FID_WEIGHTS"
        if not Path(path).is_file():
            raise UserError(f"FID weights {path!r} ({source}) is not a file")
        read_weights(path, f"FID weights ({source})")
        return Extractor(name, str(path), f"{name}-{file_hash(path)}", f"FID weights ({source})")
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    fname = URL_INCEPTION_V3.rsplit("/", 1)[-1]
    cached = Path(torch.hub.get_dir()) / "checkpoints" / fname
    if cached.is_file() or _online():
        return Extractor(name, None, f"{name}-{fname}")
    # Short: the table prints it in the cell. The file's full path is in the docs.
    raise WeightsUnavailable(f"no Inception weights offline; set HARNESS_FID_WEIGHTS or the weights option "
                             f"(torch-fidelity's {fname})")


def resolve_dinov2() -> Extractor:
    """torch-fidelity's DINOv2 ViT-L/14 when torch.hub can load it: its cached copy of
    facebookresearch/dinov2 (hub code) and of the checkpoint, else a download when online;
    otherwise MetricUnavailable. Only these names reach torch.hub, never a path the user gave:
    the hub code is Python that torch.hub runs, so it must be facebookresearch's."""
    hub = Path(torch.hub.get_dir())
    # torch.hub's own offline fallback: the repo under <owner>_<name>_<branch>, main before master
    repo = any((hub / f"facebookresearch_dinov2_{ref}").is_dir() for ref in ("main", "master"))
    if (repo and (hub / "checkpoints" / DINOV2_CHECKPOINT).is_file()) or _online():
        return Extractor(DINOV2, None, f"{DINOV2}-{DINOV2_CHECKPOINT.removesuffix('.pth')}", "DINOv2")
    raise MetricUnavailable(f"no DINOv2 ViT-L/14 offline: torch.hub needs facebookresearch/dinov2 and "
                            f"{DINOV2_CHECKPOINT} under {hub}")


def build_dinov2(ext: Extractor, cuda: bool):
    """torch-fidelity's DINOv2 extractor; torch.hub failing to fetch or import it (network,
    a partial cache) makes the metric unavailable rather than the run crash."""
    from harness import network_timeout

    from .features import DINOV2_FEATURES

    try:
        with network_timeout():  # torch.hub's own downloads have no timeout: a stalled server is bounded here
            return build_extractor(ext, list(DINOV2_FEATURES), cuda)
    except (OSError, RuntimeError, ImportError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise MetricUnavailable(f"cannot load DINOv2 ViT-L/14 through torch.hub ({torch.hub.get_dir()}): "
                                f"{first}") from None


class ReferenceImages(torch.utils.data.Dataset):
    """A harness data set's images as torch-fidelity wants them: (3, H, W) uint8."""

    def __init__(self, ds, limit: Optional[int] = None):
        images = ds.uint8_images()
        self.images = images[:limit] if limit else images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def build_extractor(ext: Extractor, features, cuda: bool):
    """torch-fidelity's extractor ``ext.name`` with the weights read safely here.

    Its constructors ``torch.load(path, weights_only=False)``; they get instead an in-memory
    file holding only the tensors :func:`harness.load_state_dict` read, so what they
    unpickle is what we wrote. The default Inception file is downloaded once into torch.hub's
    checkpoint folder, where torch-fidelity keeps it too.
    """
    import torch_fidelity.registry as reg

    from harness import load_state_dict

    cls = reg.FEATURE_EXTRACTORS_REGISTRY[ext.name]
    kwargs = {}
    source = ext.weights
    if source is None and ext.name == INCEPTION:
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

        source = URL_INCEPTION_V3
    if source is not None:
        buf = io.BytesIO()
        state = read_weights(source, ext.source) if ext.weights else load_state_dict(source, what=ext.source)
        torch.save(state, buf)
        buf.seek(0)
        kwargs["feature_extractor_weights_path"] = buf
    try:
        module = cls(ext.name, list(features), verbose=False, **kwargs)
    except RuntimeError as exc:  # load_state_dict: missing, unexpected or misshapen tensors
        if source is None or "state_dict" not in str(exc):
            raise
        detail = " ".join(str(exc).split()).split(f"{cls.__name__}: ", 1)[-1]
        detail = detail if len(detail) <= 200 else detail[:200] + "..."
        raise UserError(f"{ext.source} {str(source)!r} does not fit {cls.__name__}: {detail}") from None
    module.requires_grad_(False).eval()
    return module.cuda() if cuda else module


def image_files(folder: str | Path) -> list[str]:
    """The images of ``folder`` that torch-fidelity would read, in its order."""
    from torch_fidelity.defaults import DEFAULTS
    from torch_fidelity.utils import glob_samples_paths

    return glob_samples_paths(str(folder), False, DEFAULTS["samples_find_ext"], None, verbose=False)


def _images(files):
    from torch_fidelity.datasets import ImagesPathDataset

    return ImagesPathDataset(files)


def _features(dataset, module, cuda: bool, batch_size: Optional[int] = None) -> dict:
    from torch_fidelity.defaults import DEFAULTS
    from torch_fidelity.utils import get_featuresdict_from_dataset

    # save_cpu_ram means no loader workers: images already in memory need no decoding, and
    # starting workers would cost more than they save. The batches, hence the figures, are the same.
    in_memory = isinstance(dataset, ReferenceImages)
    return get_featuresdict_from_dataset(dataset, module, batch_size or DEFAULTS["batch_size"], cuda,
                                         in_memory or DEFAULTS["save_cpu_ram"], False)


def _cached_features(cache: Path, name: str, layers, compute) -> dict:
    """Features per layer from ``cache/<name>-features-<layer>.safetensors``, else computed and
    stored there (atomically, with a digest of their content). An entry that is unreadable,
    truncated or no longer matches its digest is recomputed: it is ours, not the user's."""
    from harness import load_cache, save_cache

    files = {layer: cache / f"{name}-features-{layer}.safetensors" for layer in layers}
    if all(f.is_file() for f in files.values()):
        entries = {layer: load_cache(f) for layer, f in files.items()}
        if all(e is not None and "features" in e for e in entries.values()):
            return {layer: e["features"] for layer, e in entries.items()}
    feats = compute()
    for layer, f in files.items():
        save_cache(f, {"features": feats[layer]}, what=f"the reference feature cache {f.name}")
    return feats


def fidelity_metrics(samples: str, reference, extractor: Extractor, metrics=("fid",),
                     feature_layer: Optional[str] = None, reference_size: Optional[int] = None,
                     cuda: bool = False, cache_root: Optional[str] = None) -> dict:
    """FID / KID / IS of a sample folder against a harness data set (or a folder path)."""
    import torch_fidelity.registry as reg
    from torch_fidelity.metric_fid import fid_featuresdict_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_featuresdict_to_metric
    from torch_fidelity.metric_kid import kid_featuresdict_to_metric

    from harness_data import cache_root as harness_cache

    cls = reg.FEATURE_EXTRACTORS_REGISTRY[extractor.name]
    layers = {m: feature_layer or cls.get_default_feature_layer_for_metric(m) for m in metrics}
    module = build_extractor(extractor, sorted(set(layers.values())), cuda)
    # A kill while sampling can leave a half-written "<n>.tmp.png"; it is not a sample.
    files = [f for f in image_files(samples) if ".tmp." not in Path(f).name]
    n1 = len(files)
    feats1 = _features(_images(files), module, cuda)
    feats2, n2 = None, None
    if any(m in ("fid", "kid") for m in metrics):
        if isinstance(reference, (str, Path)):
            feats2 = _features(_images(image_files(reference)), module, cuda)
        else:
            ref = ReferenceImages(reference, reference_size)
            n2 = len(ref)
            name = f"harness-ref-{reference.content_hash}-{n2}-{extractor.identity}"
            cache = Path(cache_root) if cache_root else harness_cache() / "fidelity"
            feats2 = _cached_features(cache, name, sorted(set(layers.values())),
                                      lambda: _features(ref, module, cuda))
    out = {}
    for m in metrics:
        if m == "fid":
            out.update(fid_statistics_to_metric(fid_featuresdict_to_statistics(feats1, layers[m]),
                                                fid_featuresdict_to_statistics(feats2, layers[m]), False))
        elif m == "kid":
            out.update(kid_featuresdict_to_metric(feats1, feats2, layers[m], verbose=False,
                                                  kid_subset_size=min(1000, n1, n2 or n1)))
        elif m == "isc":
            out.update(isc_featuresdict_to_metric(feats1, layers[m], verbose=False, isc_splits=min(10, n1)))
    m = metrics[0]
    result = {"value": float(out[KEYS[m]]), "samples": n1, "extractor": extractor.identity}
    if n2 is not None:
        result["reference_images"] = n2
    if m in SPREAD:
        result["std"] = float(out[SPREAD[m]])
    return result


def _check_folder(folder: str, arg: str) -> list[str]:
    """The images of one ``harness fid`` folder, or a UserError naming ``arg`` and what is wrong."""
    from PIL import Image, UnidentifiedImageError

    if not Path(folder).is_dir():
        raise UserError(f"fid: {arg} {folder!r} is not a folder of images")
    files = image_files(folder)
    if len(files) < 2:
        raise UserError(f"fid: {arg} {folder!r} holds {len(files)} .png/.jpg/.jpeg image(s); FID needs at least 2 "
                        f"per folder")
    from harness import open_regular

    first = None
    for f in files:  # headers only: cheap next to Inception, and a bad file is named before any work
        # open_regular: an image name on a FIFO would block the read forever, a device never end
        try:
            with open_regular(f, f"fid: {arg} file") as fh, Image.open(fh) as im:
                size = im.size
        except (UnidentifiedImageError, OSError) as exc:
            raise UserError(f"fid: {arg} file {f!r} is not a readable image ({type(exc).__name__})") from None
        if first is None:
            first = (f, size)
        elif size != first[1]:
            raise UserError(f"fid: {arg} {folder!r} mixes image sizes ({Path(first[0]).name} is "
                            f"{first[1][0]}x{first[1][1]}, {Path(f).name} is {size[0]}x{size[1]}); expected "
                            f"one size per folder")
    return files


def fid_of_folders(dir1: str, dir2: str, weights: Optional[str] = None, cuda: Optional[bool] = None,
                   extractor: str = INCEPTION, batch_size: int = 64) -> dict:
    """What ``harness fid DIR1 DIR2`` prints: torch-fidelity's FID of two image folders.

    Every input is checked before any image goes through the network."""
    import torch_fidelity.registry as reg
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_featuresdict_to_statistics, fid_statistics_to_metric

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"fid: --batch-size must be a positive integer, got {batch_size!r}")
    files = [_check_folder(dir1, "DIR1"), _check_folder(dir2, "DIR2")]
    cuda = torch.cuda.is_available() if cuda is None else cuda
    try:
        ext = resolve_extractor(extractor, weights, option="--weights")
        layer = reg.FEATURE_EXTRACTORS_REGISTRY[ext.name].get_default_feature_layer_for_metric("fid")
        module = build_extractor(ext, [layer], cuda)
    except UserError as exc:
        raise UserError(f"fid: {exc}") from None
    stats = [fid_featuresdict_to_statistics(_features(_images(f), module, cuda, batch_size), layer) for f in files]
    return {"fid": float(fid_statistics_to_metric(*stats, False)[KEY_METRIC_FID]), "extractor": ext.identity}
