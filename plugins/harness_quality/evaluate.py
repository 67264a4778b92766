"""The ADM evaluation protocol on image folders and ``.npz`` batches, and EDM2's FD_DINOv2.

``harness fid SAMPLES REFERENCE --metrics fid,sfid,isc,precision,recall,fd_dinov2`` and the
suite metrics of the same names land here. Images stream in batches (a 50,000-image npz is
never read whole), features (Inception's, and DINOv2's for fd_dinov2) are extracted once per
input and network and cached by content under ``$HARNESS_CACHE/adm/`` in chunks, so an
interrupted extraction resumes at the chunk it reached, and the figures come from
:mod:`harness_quality.adm`.
"""
from __future__ import annotations

import hashlib
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

from harness import UserError

from . import adm, manifolds
from .features import FEATURES_LIST, DinoFeatures, Features, extract, extract_dinov2, probabilities

INCEPTION_METRICS = ("fid", "sfid", "isc", "precision", "recall", "kid", "density", "coverage")
METRICS = INCEPTION_METRICS + ("fd_dinov2",)
CHUNK = 2048          # images per cached feature chunk: the unit an interrupted run resumes at
ADM_VERSION = 1       # in every cache key: bump when what a chunk holds changes
INCEPTION_DIMS = {"pool": 2048, "spatial": 2023}  # pool_3; 7 channels of mixed_6/conv's 17x17 map


class Source:
    """One input: an image folder or an ADM ``.npz`` (``arr_0`` and/or ``mu``/``sigma``...)."""

    def __init__(self, path: str | Path, arg: str):
        self.path, self.arg = Path(path), arg
        self.files: list[str] = []
        self.npz: Optional[adm.Batch] = None
        self.count, self.shape = 0, None
        if self.path.is_dir():
            from .fidelity import _check_folder

            self.files = _check_folder(str(self.path), arg)
            self.count = len(self.files)
        elif self.path.suffix == ".npz" and self.path.is_file():
            self.npz = adm.read_npz(self.path, what=f"{arg}")
            self.count = 0 if self.npz.images is None else len(self.npz.images)
        elif self.path.exists():
            raise UserError(f"{arg} {str(self.path)!r}: expected a folder of images or an ADM .npz file")
        else:
            raise UserError(f"{arg} {str(self.path)!r}: not found")

    @property
    def stats(self) -> tuple[Optional[adm.Statistics], Optional[adm.Statistics]]:
        return (self.npz.pool, self.npz.spatial) if self.npz is not None else (None, None)

    def content_key(self) -> str:
        """A hash of the images themselves (file bytes), so a renamed copy hits the cache."""
        h = hashlib.sha256()
        if self.npz is not None:
            with open(self.path, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
        else:
            for name in self.files:
                with open(name, "rb") as f:
                    h.update(hashlib.sha256(f.read()).digest())
        return h.hexdigest()[:24]

    def batches(self, start: int, stop: int, batch_size: int) -> Iterator[np.ndarray]:
        """Images ``start:stop`` as (B, H, W, 3) uint8."""
        for s in range(start, stop, batch_size):
            e = min(s + batch_size, stop)
            if self.npz is not None:
                yield self.npz.images[s:e]
            else:
                yield np.stack([_read_image(f) for f in self.files[s:e]])


def _read_image(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _save_npz(path: Path, **arrays) -> None:
    """Atomically; a full disk is one line naming the cache folder (harness.files)."""
    from harness import atomic_write

    atomic_write(path, lambda fh: np.savez(fh, **arrays), what=f"the feature cache {path.name}",
                 needed=sum(np.asarray(a).nbytes for a in arrays.values()))


def _load_chunk(path: Path, kind: type = Features):
    """A cached chunk of ``kind`` (a NamedTuple of arrays), or None when missing or unreadable
    (ours to recompute; never unpickled)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return kind(*(z[f] for f in kind._fields))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


@dataclass
class Network:
    """One feature extractor, built on first use, so a rerun whose chunks are all cached never
    loads it (DINOv2 ViT-L/14 alone is 1.2 GB)."""

    identity: str                 # in the cache key: Inception and DINOv2 chunks never share a folder
    label: str                    # for progress: "Inception features of SAMPLES"
    build: Callable[[], Any]
    run: Callable[..., Any]       # (model, batches, device=, progress=) -> a chunk of ``kind``
    kind: type = Features
    _model: Any = field(default=None, repr=False)

    def model(self):
        if self._model is None:
            self._model = self.build()
        return self._model


def features_of(source: Source, net: Network, *, device, batch_size: int, cache: Path,
                progress: Optional[Callable[[str, int, int], None]] = None):
    """Every image's features from ``net``, chunk by chunk from the cache or the network;
    ``progress(description, done, total)`` after each batch."""
    folder = cache / f"{source.content_key()}-{net.identity}-v{ADM_VERSION}"
    what = f"{net.label} features of {source.arg}"
    parts, done = [], 0
    for start in range(0, source.count, CHUNK):
        stop = min(start + CHUNK, source.count)
        path = folder / f"{start:08d}-{stop:08d}.npz"
        chunk = _load_chunk(path, net.kind)
        if chunk is not None and any(len(a) != stop - start for a in chunk):
            chunk = None  # not this chunk's rows: a stale or foreign file, recomputed
        if chunk is None:
            def tick(n):
                nonlocal done
                done += n
                if progress:
                    progress(what, done, source.count)

            chunk = net.run(net.model(), source.batches(start, stop, batch_size), device=device, progress=tick)
            _save_npz(path, **chunk._asdict())
        else:
            done += stop - start
            if progress:
                progress(what, done, source.count)
        parts.append(chunk)
    return net.kind(*(np.concatenate([getattr(p, f) for p in parts]) for f in net.kind._fields))


def resolve_extractors(metrics, weights: Optional[str] = None, option: str = "--weights") -> dict:
    """The extractors ``metrics`` need ({"inception": ..., "dinov2": ...}), only those, so a
    missing DINOv2 never blocks fid nor missing Inception weights fd_dinov2; resolved before
    any sampling or extraction (MetricUnavailable when one cannot be had)."""
    from .fidelity import INCEPTION, resolve_dinov2, resolve_extractor

    out = {}
    if any(m in INCEPTION_METRICS for m in metrics):
        out["inception"] = resolve_extractor(INCEPTION, weights, option=option)
    elif weights:  # refused, not ignored: whoever gave it may believe it weighs in on the figure
        raise UserError(f"{option} {weights!r} holds Inception weights, which {', '.join(metrics)} does not use "
                        f"(DINOv2 ViT-L/14 comes from torch.hub)")
    if "fd_dinov2" in metrics:
        out["dinov2"] = resolve_dinov2()
    return out


def parse_metrics(text: str) -> list[str]:
    from harness import suggest

    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise UserError("--metrics: expected a comma-separated list of " + ", ".join(METRICS))
    for m in names:
        if m not in METRICS:
            raise UserError(f"--metrics: {m!r} is not one of {', '.join(METRICS)}{suggest(m, METRICS)}")
    return list(dict.fromkeys(names))


def evaluate(samples: str | Path, reference: str | Path, metrics=("fid",), *, weights: Optional[str] = None,
             cuda: Optional[bool] = None, batch_size: int = 64, cache_root: Optional[str | Path] = None,
             progress: Optional[Callable[[str, int, int], None]] = None, split_size: int = 5000,
             samples_arg: str = "SAMPLES", reference_arg: str = "REFERENCE", option: str = "--weights",
             nearest_k: int = manifolds.DEFAULT_K) -> dict:
    """The ADM metrics (and fd_dinov2, density, coverage) of ``samples`` against ``reference``;
    every input checked and every extractor resolved before work. ``nearest_k``: the k of
    density and coverage (precision/recall keep the evaluator's 3)."""
    smp = Source(samples, samples_arg)
    if smp.count < 2:
        raise UserError(f"{samples_arg} {str(smp.path)!r} holds {smp.count} image(s); at least 2 are needed")
    return _score(_Images(smp, own_statistics=False), Source(reference, reference_arg), list(metrics),
                  weights=weights, cuda=cuda, batch_size=batch_size, cache_root=cache_root, progress=progress,
                  split_size=split_size, samples_arg=samples_arg, reference_arg=reference_arg, option=option,
                  nearest_k=nearest_k)


def score_features(samples, reference: Optional[str | Path], metrics=("fid",), *, weights: Optional[str] = None,
                   cuda: Optional[bool] = None, batch_size: int = 64, cache_root: Optional[str | Path] = None,
                   progress: Optional[Callable[[str, int, int], None]] = None, split_size: int = 5000,
                   samples_arg: str = "samples", reference_arg: str = "reference",
                   option: str = "weights option", nearest_k: int = manifolds.DEFAULT_K) -> dict:
    """The same figures as :func:`evaluate` for images whose features were extracted as they were
    made (``samples``: a :class:`harness_quality.streaming.StreamedFeatures`, the ``sample``
    stage's): Fréchet statistics from its merged sums, precision/recall/density/coverage/KID/IS
    from its chunks.
    ``reference`` may be None for ``isc`` alone."""
    count = samples.count
    if count < 2:
        raise UserError(f"{samples_arg}: {count} image(s); at least 2 are needed")
    ref = Source(reference, reference_arg) if reference is not None else None
    return _score(_Streamed(samples, count), ref, list(metrics), weights=weights, cuda=cuda, batch_size=batch_size,
                  cache_root=cache_root, progress=progress, split_size=split_size, samples_arg=samples_arg,
                  reference_arg=reference_arg, option=option, nearest_k=nearest_k)


class _Images:
    """One side of a comparison, its features extracted from its images (cached by content);
    a reference npz's own ``mu``/``sigma`` (``mu_s``/``sigma_s``) stand in for its images'."""

    def __init__(self, source: Source, own_statistics: bool = True):
        self.source, self.count, self.own_statistics = source, source.count, own_statistics
        self.networks: dict[str, Network] = {}
        self.features: Callable = None  # (source, network) -> features, set by _score
        self._got: dict = {}

    def given(self, name: str) -> Optional[adm.Statistics]:
        pool, spatial = self.source.stats if self.own_statistics else (None, None)
        return {"pool": pool, "spatial": spatial}.get(name)

    def _of(self, net: str):
        if net not in self._got:
            self._got[net] = self.features(self.source, self.networks[net])
        return self._got[net]

    def statistics(self, name: str) -> adm.Statistics:
        given = self.given(name)
        if given is not None:
            return given
        return adm.statistics(getattr(self._of("dinov2" if name == "dinov2" else "inception"), name))

    def points(self, name: str) -> np.ndarray:
        return getattr(self._of("inception"), name)


class _Streamed:
    """One side whose features a stage extracted while making the images (per-shard sums and chunks)."""

    def __init__(self, streamed, count: int):
        self.streamed, self.count = streamed, count

    def statistics(self, name: str) -> adm.Statistics:
        return self.streamed.statistics(name)

    def points(self, name: str) -> np.ndarray:
        return self.streamed.points(name)


def _score(smp, ref: Optional[Source], metrics: list[str], *, weights, cuda, batch_size, cache_root, progress,
           split_size, samples_arg, reference_arg, option, nearest_k=manifolds.DEFAULT_K) -> dict:
    from .fidelity import build_dinov2, build_extractor

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"--batch-size must be a positive integer, got {batch_size!r}")
    needs_reference = [m for m in metrics if m != "isc"]
    if ref is None and needs_reference:
        raise UserError(f"{', '.join(needs_reference)} need(s) a {reference_arg}: a folder or .npz of real images")
    pool_stats, spatial_stats = ref.stats if ref is not None else (None, None)
    if ref is not None and ref.npz is not None:  # another extractor's mu/sigma: refused before any features
        used = {"pool": "fid", "spatial": "sfid"}
        adm.check_statistics(ref.npz, {k: d for k, d in INCEPTION_DIMS.items() if used[k] in metrics}, ref.path,
                             reference_arg)
    need_ref_images = [m for m in metrics if m in ("precision", "recall", "kid", "fd_dinov2", "density", "coverage")
                       or (m == "fid" and pool_stats is None) or (m == "sfid" and spatial_stats is None)]
    if need_ref_images and ref.count < 2:
        # its mu/sigma are Inception's: nothing fd_dinov2 could use
        raise UserError(f"{reference_arg} {str(ref.path)!r} has no images ('arr_0') for "
                        f"{', '.join(need_ref_images)}; only its precomputed statistics"
                        + (" (Inception's)" if "fd_dinov2" in need_ref_images else ""))
    for m in ("precision", "recall"):
        if m in metrics and min(smp.count, ref.count) <= 3:
            raise UserError(f"{m} needs more than 3 images in each of {samples_arg} and {reference_arg} "
                            f"(k = 3 nearest neighbours)")
    knn = [m for m in metrics if m in ("density", "coverage")]
    if knn:
        if isinstance(nearest_k, bool) or not isinstance(nearest_k, int) or nearest_k < 1:
            raise UserError(f"{knn[0]}: k must be a positive integer, got {nearest_k!r}")
        if ref.count <= nearest_k:
            raise UserError(f"{knn[0]} needs more than k = {nearest_k} images in {reference_arg} (the radii are "
                            f"the distances to each real image's k-th nearest other one); it holds {ref.count}")
    exts = resolve_extractors(metrics, weights, option=option)
    cuda = torch.cuda.is_available() if cuda is None else cuda
    device = torch.device("cuda" if cuda else "cpu")
    if cache_root is None:
        from harness_data import cache_root as harness_cache

        cache_root = harness_cache() / "adm"
    cache = Path(cache_root)

    def features(source: Source, net: Network):
        return features_of(source, net, device=device, batch_size=batch_size, cache=cache, progress=progress)

    networks = {}
    if "inception" in exts:
        ext = exts["inception"]
        networks["inception"] = Network(ext.identity, "Inception",
                                        lambda: build_extractor(ext, list(FEATURES_LIST), cuda), extract)
    if "dinov2" in exts:
        dino = exts["dinov2"]
        networks["dinov2"] = Network(dino.identity, "DINOv2 ViT-L/14", lambda: build_dinov2(dino, cuda),
                                     extract_dinov2, DinoFeatures)
    sides = [s for s in (smp, _Images(ref) if ref is not None else None) if isinstance(s, _Images)]
    for side in sides:
        side.networks, side.features = networks, features
    other = sides[-1] if ref is not None else None
    out: dict = {}
    for m in metrics:
        if m == "fid":
            out[m] = adm.frechet_distance(smp.statistics("pool"), other.statistics("pool"))
        elif m == "sfid":
            out[m] = adm.frechet_distance(smp.statistics("spatial"), other.statistics("spatial"))
        elif m == "fd_dinov2":
            out[m] = adm.frechet_distance(smp.statistics("dinov2"), other.statistics("dinov2"))
        elif m == "isc":
            out[m] = adm.inception_score(probabilities(smp.points("logits")), split_size=split_size)
        elif m in ("precision", "recall") and "precision" not in out:
            out["precision"], out["recall"] = adm.precision_recall(other.points("pool"), smp.points("pool"))
        elif m == "kid":
            out[m] = _kid(smp.points("pool"), other.points("pool"))
        elif m in ("density", "coverage") and "density" not in out:
            # reals = the reference's pool features, fakes = the samples'; the k-NN balls are the reals'
            out["density"], out["coverage"] = _density_coverage(other.points("pool"), smp.points("pool"), nearest_k,
                                                                cache)
    result = {**{m: out[m] for m in metrics}, "samples": smp.count, "reference_images": ref.count if ref else 0}
    if knn:
        result.update(nearest_k=nearest_k, feature="pool_3 (2048-d Inception)", real_features=ref.count,
                      fake_features=smp.count)
    if "inception" in exts:
        result.update({
            "reference_statistics": ("from the reference npz (mu/sigma" + ("/mu_s/sigma_s" if spatial_stats else "")
                                     + ")") if pool_stats is not None else "computed from the reference images",
            "extractor": exts["inception"].identity,
            "weights": exts["inception"].weights or "torch-fidelity's download",
        })
    if "dinov2" in exts:
        result["dinov2_extractor"] = exts["dinov2"].identity
    return result


_LAST_DENSITY_COVERAGE: dict = {}


def _density_coverage(real: np.ndarray, fake: np.ndarray, k: int, cache: Path) -> manifolds.DensityCoverage:
    """Density and coverage, remembered for the last pair of feature sets: a cell's ``density``
    and ``coverage`` entries each ask for the pair, and at 50,000 x 50,000 it takes minutes. The
    reference's k-NN radii, half of that work and the same for every cell of a suite, are cached
    on disk by the features' content and k (``.safetensors`` with a digest, :func:`harness.save_cache`)."""
    from harness import load_cache, save_cache

    real_key = hashlib.sha256(np.ascontiguousarray(real).tobytes()).hexdigest()[:24]
    key = (real_key, hashlib.sha256(np.ascontiguousarray(fake).tobytes()).hexdigest(), real.shape, fake.shape, k)
    if key not in _LAST_DENSITY_COVERAGE:
        path = cache / "radii" / f"{real_key}-{real.shape[0]}x{real.shape[1]}-k{k}-v{ADM_VERSION}.safetensors"
        entry = load_cache(path)  # None when missing, torn or altered: computed again
        radii = entry["radii"].numpy() if entry is not None and entry["radii"].shape == (len(real),) else None
        if radii is None:
            radii = manifolds.real_radii(real, k)
            save_cache(path, {"radii": torch.from_numpy(radii)}, what=f"the k-NN radii cache {path.name}")
        _LAST_DENSITY_COVERAGE.clear()
        _LAST_DENSITY_COVERAGE[key] = manifolds.density_coverage(real, fake, k=k, radii=radii)
    return _LAST_DENSITY_COVERAGE[key]


def _kid(samples: np.ndarray, reference: np.ndarray) -> float:
    """torch-fidelity's KID (polynomial-kernel MMD over subsets) on the pool features."""
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, kid_featuresdict_to_metric

    f1, f2 = {"2048": torch.from_numpy(samples)}, {"2048": torch.from_numpy(reference)}
    out = kid_featuresdict_to_metric(f1, f2, "2048", verbose=False,
                                     kid_subset_size=min(1000, len(samples), len(reference)))
    return float(out[KEY_METRIC_KID_MEAN])


def image_size(path: str | Path, arg: str = "reference") -> tuple[int, int]:
    """(width, height) of the images of a folder (one size throughout) or an ADM ``.npz``'s
    ``arr_0``; a UserError naming ``arg`` when there are none or they differ."""
    src = Source(path, arg)
    if src.npz is not None:
        if src.npz.images is None:
            raise UserError(f"{arg} {str(src.path)!r} holds no images ('arr_0'), only statistics")
        return int(src.npz.images.shape[2]), int(src.npz.images.shape[1])
    from PIL import Image

    with Image.open(src.files[0]) as im:  # _check_folder saw every header agree
        return im.size


def resized_folder(folder: str | Path, size: int) -> Path:
    """``folder``'s PNGs scaled to ``size`` x ``size`` (PIL bicubic, as BK-SDM's evaluation
    resizes its 512 px samples to 256) into ``<folder>-r<size>/``, once: existing files are kept."""
    from PIL import Image

    from .fidelity import image_files

    folder = Path(folder)
    out = folder.with_name(f"{folder.name}-r{size}")
    out.mkdir(parents=True, exist_ok=True)
    for f in image_files(folder):
        target = out / (Path(f).stem + ".png")
        if target.is_file():
            continue
        with Image.open(f) as im:
            small = im.convert("RGB").resize((size, size), Image.BICUBIC)
        tmp = target.with_name(target.name + ".tmp")
        small.save(tmp, format="PNG")
        os.replace(tmp, target)
    return out
