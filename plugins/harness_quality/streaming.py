"""Features of generated images, accumulated shard by shard while the images are made.

The ``sample`` stage (harness_sample) extracts the features the cell's quality metrics need
from each decoded batch, so no image has to be written or held beyond its batch. For every
fixed shard of samples it keeps:

- for each Fréchet distance (pool for FID, spatial for sFID, DINOv2 for FD_DINOv2) the exact
  float64 sums ``count``, ``Σx`` and ``Σxxᵀ``; merged in shard order, they give the mean and
  the unbiased covariance of the whole set, whatever the number of ranks that made the shards;
- the pool features themselves (precision, recall, density, coverage and KID compare points, not
  moments), the Inception logits (IS) and, for CMMD, the CLIP embeddings of the same images, as
  per-shard chunks read back one after the other.

A shard is written atomically once complete: a killed run resumes at the first shard missing.
When every shard exists, their sums are merged once into ``moments.npz`` beside them and
dropped from the shards (50,000 images would otherwise keep 49 x 66 MB of float64 sums).
"""
from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path
from typing import Iterable, NamedTuple, Optional

import numpy as np
import torch

from . import adm
from .features import FEATURES_LIST, extract, extract_dinov2

VERSION = 1  # in every shard folder's key: bump when what a shard holds changes
MOMENTS = ("pool", "spatial", "dinov2")   # features whose Fréchet statistics are kept as sums
POINTS = ("pool", "logits", "clip")       # features kept whole (precision/recall/density/coverage/KID, IS, CMMD)
# what each metric reads from the shards
NEEDS = {"fid": {"inception"}, "sfid": {"inception"}, "isc": {"inception"}, "precision": {"inception"},
         "recall": {"inception"}, "kid": {"inception"}, "fd_dinov2": {"dinov2"}, "density": {"inception"},
         "coverage": {"inception"}, "cmmd": {"clip"}}


class Moments(NamedTuple):
    """Exact float64 sums of a set of feature vectors: enough for its mean and covariance."""

    count: int
    total: np.ndarray   # Σx, (D,)
    outer: np.ndarray   # Σxxᵀ, (D, D)

    @classmethod
    def of(cls, features: np.ndarray) -> "Moments":
        x = np.asarray(features, dtype=np.float64)
        return cls(len(x), x.sum(axis=0), x.T @ x)

    def __add__(self, other: "Moments") -> "Moments":  # type: ignore[override]
        return Moments(self.count + other.count, self.total + other.total, self.outer + other.outer)

    def statistics(self) -> adm.Statistics:
        """Mean and unbiased covariance, the evaluator's ``np.cov(rowvar=False)`` from sums."""
        n = self.count
        if n < 2:
            raise ValueError(f"statistics need at least 2 feature vectors, got {n}")
        mu = self.total / n
        sigma = (self.outer - n * np.outer(mu, mu)) / (n - 1)
        return adm.Statistics(mu, (sigma + sigma.T) / 2)  # symmetric to the last bit, as np.cov's is


def merge(parts: Iterable[Moments]) -> Moments:
    """Sums of consecutive shards, added in the order given (the shard order: then the result
    is the same bits on 1 or N ranks)."""
    out = None
    for p in parts:
        out = p if out is None else out + p
    if out is None:
        raise ValueError("no shards to merge")
    return out


def save_arrays(path: Path, **arrays) -> None:
    """``np.savez`` to a temporary name, then renamed: a reader never sees half a shard."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_arrays(path: Path) -> Optional[dict]:
    """The arrays of a shard file, or None when it is missing or unreadable (then it is redone)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


def shard_arrays(features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What one shard keeps of its features ({"pool": (n, 2048), "spatial": ..., "logits": ...,
    "dinov2": ...}, each present when extracted): moments of the Fréchet ones, the points of
    the others."""
    out: dict[str, np.ndarray] = {}
    count = {len(v) for v in features.values()}
    if len(count) != 1:
        raise ValueError(f"features of one shard disagree on its size: {sorted(count)}")
    out["count"] = np.array(count.pop(), dtype=np.int64)
    for name, value in features.items():
        if name in MOMENTS:
            m = Moments.of(value)
            out[f"{name}_total"], out[f"{name}_outer"] = m.total, m.outer
        if name in POINTS:
            out[name] = np.asarray(value, dtype=np.float32)
    return out


class Extractors:
    """The networks a cell's quality metrics read (Inception's, DINOv2's, CMMD's CLIP), built
    once, applied to each batch of generated images as it is made."""

    def __init__(self, resolved: dict, cuda: bool):
        self.resolved, self.cuda = resolved, cuda
        self.device = torch.device("cuda" if cuda else "cpu")
        self._models: dict = {}
        self.unavailable: dict[str, str] = {}
        self.clip_batch = 32  # images per CLIP forward (cmmd's batch_size)
        self.identity = "+".join(f"{k}:{v.identity}" for k, v in sorted(resolved.items())) + f"-v{VERSION}"

    @classmethod
    def for_metrics(cls, specs, cuda: bool) -> "Extractors":
        """The extractors the metric entries ``specs`` (name and options) need; their Inception
        ``weights`` options must agree (one set of features serves them all). A network that
        cannot be had (offline without its weights) is left out and named in ``unavailable``:
        its metrics then say so in the record, as they would without a sample block."""
        from harness import MetricUnavailable, UserError

        from .evaluate import resolve_extractors

        on = lambda net: [m for m in specs if NEEDS.get(m.name) == {net}]  # noqa: E731 - the metrics of one network
        weights = {m.options.get("weights") for m in on("inception")}
        if len(weights) > 1:
            raise UserError(f"metrics: with a sample block every Inception metric reads the same features; they "
                            f"name different weights ({', '.join(sorted(map(str, weights)))})")
        resolved, unavailable = {}, {}
        inception = [m.name for m in on("inception")]
        for names in (inception, [m.name for m in on("dinov2")]):
            if not names:
                continue
            try:
                resolved.update(resolve_extractors(names, next(iter(weights), None) if names is inception else None,
                                                   option="weights option"))
            except MetricUnavailable as exc:
                unavailable[", ".join(names)] = str(exc)
        clip = on("clip")
        if clip:
            from .cmmd import DEFAULT_MODEL, load_embedder

            models = {m.options.get("model") or DEFAULT_MODEL for m in clip}
            if len(models) > 1:
                raise UserError(f"metrics: with a sample block the images are embedded once, by one CLIP model; the "
                                f"cmmd entries name {', '.join(sorted(models))}")
            try:
                resolved["clip"] = load_embedder(models.pop())
            except MetricUnavailable as exc:
                unavailable["cmmd"] = str(exc)
            batch = min({m.options.get("batch_size") or 32 for m in clip})
        out = cls(resolved, cuda)
        out.unavailable = unavailable
        if clip:
            out.clip_batch = batch
        return out

    def _model(self, name: str):
        from .fidelity import build_dinov2, build_extractor

        if name not in self._models:
            ext = self.resolved[name]
            self._models[name] = (build_extractor(ext, list(FEATURES_LIST), self.cuda) if name == "inception"
                                  else build_dinov2(ext, self.cuda))
        return self._models[name]

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """The features of one batch, (B, H, W, 3) uint8."""
        out: dict[str, np.ndarray] = {}
        if "inception" in self.resolved:
            f = extract(self._model("inception"), [images], device=self.device)
            out.update(pool=f.pool, spatial=f.spatial, logits=f.logits)
        if "dinov2" in self.resolved:
            out["dinov2"] = extract_dinov2(self._model("dinov2"), [images], device=self.device).dinov2
        if "clip" in self.resolved:  # a harness_quality.cmmd.ClipEmbedder, already loaded
            out["clip"] = self.resolved["clip"](images, batch_size=self.clip_batch, device=self.device)
        return out

    def save_shard(self, path: Path, batches: list[dict], count: int, size: tuple[int, int]) -> None:
        """One shard's file from the features of its batches, in order; ``count`` images of
        ``size`` (width, height)."""
        features = {k: np.concatenate([b[k] for b in batches]) for k in (batches[0] if batches else {})}
        arrays = shard_arrays(features) if features else {"count": np.array(count, dtype=np.int64)}
        if int(arrays["count"]) != count:
            raise ValueError(f"{path}: {int(arrays['count'])} feature rows for {count} images")
        save_arrays(path, **arrays, size=np.array(size, dtype=np.int64))


def merge_shards(shards: list[Path], merged: Path) -> Path:
    """The shards' sums added in shard order into ``merged``, then removed from each shard
    (each rewritten atomically); a run killed half way does the rest when run again."""
    if not merged.is_file():
        first = load_arrays(shards[0])
        names = [n for n in MOMENTS if f"{n}_total" in first]
        out: dict[str, np.ndarray] = {}
        for name in names:
            def parts():
                for p in shards:
                    z = load_arrays(p)
                    yield Moments(int(z["count"]), z[f"{name}_total"], z[f"{name}_outer"])

            m = merge(parts())
            out[f"{name}_total"], out[f"{name}_outer"] = m.total, m.outer
        count = sum(int(load_arrays(p)["count"]) for p in shards)
        save_arrays(merged, count=np.array(count, dtype=np.int64), **out)
    for p in shards:
        z = load_arrays(p)
        if any(k.endswith(("_total", "_outer")) for k in z):
            save_arrays(p, **{k: v for k, v in z.items() if not k.endswith(("_total", "_outer"))})
    return merged


class StreamedFeatures:
    """The features of a set of generated images, read from its shard files in order.

    ``shards``: the shard files, in sample order; ``merged``: their merged sums
    (:func:`merge_shards`), else they are merged here from the shards. Moments and points are
    read on demand; the merged moments once."""

    def __init__(self, shards: list[Path], identity: str, merged: Optional[Path] = None):
        self.shards, self.identity, self.merged = list(shards), identity, merged
        self._moments: dict[str, Moments] = {}

    def _read(self, path: Path) -> dict:
        got = load_arrays(path)
        if got is None:
            raise ValueError(f"{path}: shard unreadable; rerun the cell to make it again")
        return got

    @staticmethod
    def read_header(path: Path) -> dict:
        """The size (width, height) of the images of a shard, and its count."""
        z = load_arrays(path) or {}
        return {"size": tuple(int(v) for v in z["size"]) if "size" in z else (0, 0),
                "count": int(z.get("count", 0))}

    @property
    def count(self) -> int:
        if self.merged is not None and self.merged.is_file():
            return int(self._read(self.merged)["count"])
        return sum(int(self._read(p)["count"]) for p in self.shards)

    def moments(self, name: str) -> Moments:
        if name not in self._moments and self.merged is not None and self.merged.is_file():
            z = self._read(self.merged)
            if f"{name}_total" not in z:
                raise ValueError(f"{self.merged}: no {name} features (the stage extracted {sorted(z)})")
            self._moments[name] = Moments(int(z["count"]), z[f"{name}_total"], z[f"{name}_outer"])
        if name not in self._moments:
            def parts():
                for p in self.shards:
                    z = self._read(p)
                    yield Moments(int(z["count"]), z[f"{name}_total"], z[f"{name}_outer"])

            self._moments[name] = merge(parts())
        return self._moments[name]

    def statistics(self, name: str) -> adm.Statistics:
        return self.moments(name).statistics()

    def points(self, name: str) -> np.ndarray:
        """Every sample's ``name`` features (pool or logits), concatenated in sample order."""
        return np.concatenate([self._read(p)[name] for p in self.shards])
