"""Sample-quality metrics of a cell's (trained) model.

``val_loss`` is the offline figure: the denoising loss on the held-out split at fixed
timesteps with fixed noise, drawn from shared seeds so every candidate faces the same test.
``fid``, ``kid`` and ``isc`` generate samples (harness.sampling) and hand them to
torch-fidelity with the data set's images as reference. When the cell has a ``sample`` block
(harness_sample), every quality metric scores the stage's images instead, made once for all:
a class-conditional cell's through the features the stage extracted as it made them
(:func:`harness_quality.evaluate.score_features`, whatever its ``keep``), a text-to-image
cell's PNGs against ``reference``, optionally resized first (``resize: 256``, BK-SDM's
protocol), with the teacher's images beside them (``teacher`` and ``change`` in the entry).
``fd_dinov2`` is EDM2's Fréchet distance of DINOv2 ViT-L/14 features, through the same
ADM-protocol path (:func:`harness_quality.evaluate.evaluate`) as sfid, precision and recall.
``density`` and ``coverage`` (Naeem et al. 2020) read the same pool features as precision and
recall; ``cmmd`` (:mod:`harness_quality.cmmd`) reads CLIP embeddings of the same images.
"""
from __future__ import annotations

import hashlib
import inspect
import json
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from harness import CellContext, MetricUnavailable, UserError, sample_to_folder

from .fidelity import fidelity_metrics, resolve_extractor


class ValLoss:
    """Denoising MSE on the held-out split at fixed timesteps and fixed noise (shared seeds)."""

    name, direction, unit = "val_loss", "lower", "mse"

    def __init__(self, num_timesteps: int = 10, max_samples: int = 256, batch_size: int = 64):
        if num_timesteps < 1 or max_samples < 1 or batch_size < 1:
            raise ValueError("val_loss needs num_timesteps, max_samples and batch_size >= 1")
        self.num_timesteps, self.max_samples, self.batch_size = num_timesteps, max_samples, batch_size

    def __call__(self, ctx: CellContext) -> dict:
        from harness import make_scheduler, map_labels, stack_labels, text_conditioning

        ds = ctx.make_dataset("val")
        if ds is None:
            raise ValueError("val_loss needs a data block (data: {name: shapes, resolution: 32})")
        spec = ctx.train
        ac = make_scheduler(spec.schedule, spec.timesteps).alphas_cumprod
        n = min(len(ds), self.max_samples)
        # Evenly spaced timesteps from the middle of each bin: the whole schedule, no draw.
        ts = [int((k + 0.5) * spec.timesteps / self.num_timesteps) for k in range(self.num_timesteps)]
        x0 = torch.stack([ds[i][0] for i in range(n)])
        y = stack_labels([ds[i][1] for i in range(n)], ds)
        conditioned = bool(ds.num_classes) or text_conditioning(ds, ctx.model) is not None
        noise = torch.randn((len(ts),) + tuple(x0.shape), generator=ctx.generator("val-noise", shared=True))
        model, device = ctx.model, ctx.device
        was_training = model.training
        model.eval()
        per_t = []
        try:
            with torch.inference_mode():
                for k, t in enumerate(ts):
                    total = 0.0
                    for s in range(0, n, self.batch_size):
                        xb, nb = x0[s:s + self.batch_size].to(device), noise[k, s:s + self.batch_size].to(device)
                        yb = map_labels(lambda v: v[s:s + self.batch_size].to(device), y) if conditioned else None
                        a = ac[t].item()
                        x_t = a ** 0.5 * xb + (1 - a) ** 0.5 * nb
                        tt = torch.full((len(xb),), t, device=device, dtype=torch.long)
                        eps = model(x_t, tt, yb)[:, : xb.shape[1]]
                        total += F.mse_loss(eps.float(), nb.float(), reduction="sum").item()
                    per_t.append(total / noise[k].numel())
        finally:
            model.train(was_training)
        return {"value": sum(per_t) / len(per_t), "per_timestep": dict(zip(map(str, ts), per_t)),
                "samples": n, "timesteps": len(ts)}


class _SampleMetric:
    """Shared part of fid/kid/isc: sample the cell's model to PNGs, run torch-fidelity."""

    name = direction = unit = ""
    key = ""
    path_options = {"reference": "reference"}
    samples = True  # scores the cell's samples: a stage that changes the sampler is named in the entry

    def __init__(self, num_samples: int = 1000, sampler: str = "ddim", steps: int = 50, cfg_scale: float = 1.0,
                 guided_channels: int | None = 3, batch_size: int = 50, reference_split: str = "train",
                 reference_size: int | None = None, weights: str | None = None,
                 extractor: str = "inception-v3-compat", feature_layer: str | None = None,
                 reference: str | None = None, resize: int | None = None):
        if num_samples < 2 or steps < 1 or batch_size < 1:
            raise ValueError(f"{self.name} needs num_samples >= 2, steps >= 1, batch_size >= 1")
        if resize is not None and resize < 1:
            raise ValueError(f"{self.name}: resize must be a positive image side, got {resize}")
        self.resize = resize
        self.sample_opts = {"num_samples": num_samples, "sampler": sampler, "steps": steps,
                            "cfg_scale": cfg_scale, "guided_channels": guided_channels}
        self.batch_size, self.reference_split, self.reference_size = batch_size, reference_split, reference_size
        self.weights, self.extractor, self.feature_layer = weights, extractor, feature_layer
        self.reference = reference
        self._check_network(weights, extractor, feature_layer)

    def _check_network(self, weights, extractor: str, feature_layer) -> None:
        if self.adm and (extractor != "inception-v3-compat" or feature_layer):
            raise ValueError(f"{self.name} follows the ADM evaluator: TF Inception features only (no extractor or "
                             f"feature_layer option)")

    @staticmethod
    def validate_options(options: dict) -> None:
        """At validation: with ``resize``, the reference's images must be that size (BK-SDM:
        256), else the figure compares images of two sizes; refused before any sampling."""
        ref, resize = options.get("reference"), options.get("resize")
        if isinstance(ref, str) and isinstance(resize, int) and Path(ref).exists():
            got = _image_size(ref, Path(ref).stat().st_mtime_ns)
            if got != (resize, resize):
                raise UserError(f"reference {ref!r} holds {got[0]}x{got[1]} images; the samples are scored at "
                                f"resize {resize}x{resize}")

    @property
    def adm(self) -> bool:
        """The ADM evaluator's protocol: a reference folder/npz, or a metric only it defines."""
        return self.reference is not None or self.key in ("sfid", "precision", "recall", "fd_dinov2", "density",
                                                          "coverage")

    def _options(self) -> dict:
        """Keyword arguments of the ADM-path functions this metric adds to the shared ones."""
        return {}

    def __call__(self, ctx: CellContext) -> dict:
        if getattr(ctx, "samples", None) is not None:
            return self._generated(ctx, ctx.samples)
        if self.resize is not None:
            raise ValueError(f"{self.name}: resize applies to a stage's generated images (a sample block); "
                             "this cell has none")
        if getattr(ctx.dataset, "null_context", None) is not None:
            raise MetricUnavailable(f"{self.name} samples class-conditional or unconditional models; a text U-Net "
                                    "is sampled from a prompt set by the sample stage (add a sample block)")
        # Weights first: offline without them there is nothing to compute, so do not sample.
        if self.adm:
            self._resolve()
        else:
            extractor = resolve_extractor(self.extractor, self.weights)
        ds = ctx.dataset
        if ds is None:
            raise ValueError(f"{self.name} needs a data block to sample and to compare against")
        folder = self._samples(ctx, ds)
        ref = ctx.make_dataset(self.reference_split) if self.reference_split != "train" else ds
        from harness_data import cache_root

        root = cache_root(ctx.config.data.options.get("cache_dir"))
        if self.adm:
            return self._adm(ctx, folder, ref, root)
        cache = root / "fidelity"
        out = fidelity_metrics(str(folder), ref, extractor, metrics=(self.key,), feature_layer=self.feature_layer,
                               reference_size=self.reference_size, cuda=ctx.device.type == "cuda",
                               cache_root=str(cache))
        value = out.pop("value")
        return {"value": value, **out, **self.sample_opts, "reference": f"{getattr(ds, 'name', '?')}"}

    def _generated(self, ctx: CellContext, images) -> dict:
        """The ADM metric of a stage's images (and its teacher's) against ``reference``."""
        from harness_data import cache_root

        if getattr(images, "features", None) is not None:
            return self._streamed(ctx, images)

        from .evaluate import evaluate, image_size, resized_folder

        if self.reference is None and self.key != "isc":
            raise ValueError(f"{self.name} of generated images needs reference: a folder or .npz of real images")
        self._resolve()  # offline without weights: unavailable, before any resizing
        if self.reference is not None:
            want = image_size(self.reference, f"{self.name} reference")
            got = image_size(images.folder, f"{self.name} samples")
            got = (self.resize, self.resize) if self.resize else got
            if want != got:
                raise UserError(f"{self.name}: reference {self.reference!r} holds {want[0]}x{want[1]} images; the "
                                f"samples are scored at {got[0]}x{got[1]}")

        def score(folder) -> dict:
            folder = resized_folder(folder, self.resize) if self.resize else folder
            return evaluate(folder, self.reference or folder, [self.key], weights=self.weights,
                            cuda=ctx.device.type == "cuda", batch_size=self.batch_size,
                            cache_root=cache_root() / "adm", samples_arg=f"{self.name} samples",
                            reference_arg=f"{self.name} reference", option="weights option", **self._options())

        out = score(images.folder)
        entry = {"value": out.pop(self.key), **out, "protocol": "ADM evaluator", "reference": self.reference,
                 "resize": self.resize, "images": str(images.folder)}
        if getattr(images, "teacher", None) is not None:
            teacher = score(images.teacher)[self.key]
            entry["teacher"] = teacher
            entry["change"] = (entry["value"] - teacher) / teacher if teacher else None  # relative: -0.04 is 4% lower
        return entry

    def _streamed(self, ctx: CellContext, images) -> dict:
        """The ADM metric of images whose features the ``sample`` stage extracted as it made
        them (any ``keep``): against ``reference``, else the data set's images."""
        from harness_data import cache_root

        from .evaluate import image_size, score_features

        if self.resize is not None:
            raise ValueError(f"{self.name}: resize applies to text-to-image PNGs; class-conditional samples are "
                             f"scored at the size they are made")
        if self.extractor != "inception-v3-compat" or self.feature_layer:
            raise ValueError(f"{self.name}: with a sample block the figures are the ADM evaluator's (TF Inception "
                             f"features); no extractor or feature_layer option")
        self._resolve()  # offline without weights: unavailable
        root = cache_root(ctx.config.data.options.get("cache_dir") if ctx.config.data is not None else None)
        reference, described = self.reference, self.reference
        if reference is None and self.key != "isc":
            ds = ctx.dataset
            if ds is None:
                raise ValueError(f"{self.name} needs reference: (a folder or .npz of real images) or a data block")
            reference = str(_dataset_npz(ds, self.reference_size, root / "adm-reference"))
            described = f"{getattr(ds, 'name', '?')} images"
        if reference is not None:
            want = image_size(reference, f"{self.name} reference")
            if want != tuple(images.size):
                raise UserError(f"{self.name}: reference {reference!r} holds {want[0]}x{want[1]} images; the samples "
                                f"are {images.size[0]}x{images.size[1]}")
        out = score_features(images.features, reference, [self.key], weights=self.weights,
                             cuda=ctx.device.type == "cuda", batch_size=self.batch_size, cache_root=root / "adm",
                             samples_arg=f"{self.name} samples", reference_arg=f"{self.name} reference",
                             option="weights option", **self._options())
        kept = images.folder or images.npz
        return {"value": out.pop(self.key), **out, "protocol": "ADM evaluator", "reference": described,
                "images": str(kept) if kept else None, "features": "streamed by the sample stage"}

    def _resolve(self) -> None:
        """The extractors this metric's ADM path needs (Inception's, or DINOv2 for fd_dinov2)."""
        from .evaluate import resolve_extractors

        resolve_extractors([self.key], self.weights, option="weights option")

    def _adm(self, ctx: CellContext, folder: Path, ds, root: Path) -> dict:
        """The ADM metrics against ``reference`` (a folder or npz), else the data set's images
        written once as an npz; features are cached by content, so the cell's other ADM
        metrics on the same samples extract nothing again."""
        from .evaluate import evaluate

        reference = self.reference or str(_dataset_npz(ds, self.reference_size, root / "adm-reference"))
        out = evaluate(folder, reference, [self.key], weights=self.weights, cuda=ctx.device.type == "cuda",
                       batch_size=self.batch_size, cache_root=root / "adm",
                       samples_arg=f"{self.name} samples", reference_arg=f"{self.name} reference",
                       option="weights option", **self._options())
        return {"value": out.pop(self.key), **out, **self.sample_opts, "protocol": "ADM evaluator",
                "reference": self.reference or f"{getattr(ds, 'name', '?')} images"}

    def _samples(self, ctx: CellContext, ds) -> Path:
        spec = ctx.train
        # An untrained variance half (train.learn_sigma off) must not drive DDPM's variance.
        opts = {**self.sample_opts, "schedule": spec.schedule, "timesteps": spec.timesteps,
                "learn_sigma": spec.learn_sigma}
        key = hashlib.sha256(json.dumps(opts, sort_keys=True).encode()).hexdigest()[:10]
        root = ctx.workdir if ctx.workdir else Path(__import__("tempfile").mkdtemp())
        decode = getattr(ds, "decode", None)
        n = opts.pop("num_samples")
        return sample_to_folder(ctx.model, Path(root) / f"samples-{key}", n, batch_size=self.batch_size,
                                decode=decode, shape=(ds.channels, ds.resolution, ds.resolution),
                                num_classes=ds.num_classes, seed=ctx.seed("samples", shared=True),
                                device=ctx.device, **opts)


class FID(_SampleMetric):
    """Frechet Inception Distance of generated samples to the data set (torch-fidelity)."""

    name, direction, unit, key = "fid", "lower", "", "fid"


class KID(_SampleMetric):
    """Kernel Inception Distance of generated samples to the data set (torch-fidelity)."""

    name, direction, unit, key = "kid", "lower", "", "kid"


class ISC(_SampleMetric):
    """Inception Score of generated samples (torch-fidelity; no reference needed)."""

    name, direction, unit, key = "isc", "higher", "", "isc"


class SFID(_SampleMetric):
    """sFID (ADM evaluator): Frechet distance of Inception mixed_6/conv spatial features."""

    name, direction, unit, key = "sfid", "lower", "", "sfid"


class Precision(_SampleMetric):
    """Improved precision (ADM evaluator, k=3): samples inside the reference manifold."""

    name, direction, unit, key = "precision", "higher", "", "precision"


class Recall(_SampleMetric):
    """Improved recall (ADM evaluator, k=3): reference images inside the sample manifold."""

    name, direction, unit, key = "recall", "higher", "", "recall"


class _NearestNeighbours(_SampleMetric):
    """Density/coverage (Naeem et al. 2020): k-NN balls on the reference's Inception pool
    features, the same features (and the same single extraction) as precision/recall."""

    def __init__(self, *args, k: int = 5, **kwargs):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"{self.name}: k (nearest neighbours) must be a positive integer, got {k!r}")
        super().__init__(*args, **kwargs)
        self.k = k

    def _options(self) -> dict:
        return {"nearest_k": self.k}


class Density(_NearestNeighbours):
    """Density (Naeem et al. 2020, k=5): samples per real k-NN ball, over k; about 1 when alike."""

    name, direction, unit, key = "density", "higher", "", "density"


class Coverage(_NearestNeighbours):
    """Coverage (Naeem et al. 2020, k=5): real k-NN balls that hold at least one sample."""

    name, direction, unit, key = "coverage", "higher", "", "coverage"


class CMMD(_SampleMetric):
    """CMMD (Jayasumana et al. 2024): 1000 x squared MMD of CLIP ViT-L/14@336 embeddings, sigma 10."""

    name, direction, unit, key = "cmmd", "lower", "", "cmmd"

    def __init__(self, model: str = "openai/clip-vit-large-patch14-336", batch_size: int = 32,
                 reference: str | None = None, reference_split: str = "train", reference_size: int | None = None,
                 num_samples: int = 1000, sampler: str = "ddim", steps: int = 50, cfg_scale: float = 1.0,
                 guided_channels: int | None = 3):
        for key, value in (("batch_size", batch_size), ("num_samples", num_samples), ("steps", steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < (2 if key == "num_samples" else 1):
                raise ValueError(f"cmmd: {key} must be an integer >= {2 if key == 'num_samples' else 1}, got "
                                 f"{value!r}")
        if not isinstance(model, str) or not model:
            raise ValueError(f"cmmd: model must be a hub id or a folder, got {model!r}")
        self.model, self.reference, self.resize = model, reference, None
        self.batch_size, self.reference_split, self.reference_size = batch_size, reference_split, reference_size
        # the sampling options of fid & co. (same defaults): without a sample block, the same images
        self.sample_opts = {"num_samples": num_samples, "sampler": sampler, "steps": steps,
                            "cfg_scale": cfg_scale, "guided_channels": guided_channels}

    def __call__(self, ctx: CellContext) -> dict:
        from harness_data import cache_root

        from .cmmd import SCALE, SIGMA, load_embedder, mmd
        from .evaluate import Source

        embedder = load_embedder(self.model)  # offline without it: unavailable, before any sampling
        samples = getattr(ctx, "samples", None)
        data = ctx.config.data.options.get("cache_dir") if ctx.config.data is not None else None
        root = cache_root(data)
        entry: dict = {}
        if samples is None:
            if getattr(ctx.dataset, "null_context", None) is not None:
                raise MetricUnavailable("cmmd of a text U-Net scores the images of a sample block (prompts); this "
                                        "cell has none")
            if ctx.dataset is None:
                raise ValueError("cmmd needs a data block to sample and to compare against, or a sample block")
            folder = self._samples(ctx, ctx.dataset)  # fid & co.'s folder when their sampling options agree
            fake = self._embed(Source(folder, "cmmd samples"), embedder, ctx, root)
            entry.update(images=str(folder), **self.sample_opts)
        elif getattr(samples, "features", None) is not None:  # the sample stage embedded each batch as it made it
            if f"clip:{embedder.identity}" not in samples.features.identity:
                raise ValueError(f"cmmd: the sample stage's features are not {self.model!r}'s CLIP embeddings "
                                 f"({samples.features.identity})")
            fake = samples.features.points("clip")
            kept = samples.folder or samples.npz
            entry.update(images=str(kept) if kept else None, features="streamed by the sample stage")
        else:
            fake = self._embed(Source(samples.folder, "cmmd samples"), embedder, ctx, root)
            entry["images"] = str(samples.folder)
        reference, described = self.reference, self.reference
        if reference is None:
            ds = ctx.make_dataset(self.reference_split) if self.reference_split != "train" else ctx.dataset
            if ds is None:
                raise ValueError("cmmd needs reference: (a folder or .npz of real images) or a data block")
            reference = str(_dataset_npz(ds, self.reference_size, root / "adm-reference"))
            described = f"{getattr(ds, 'name', '?')} images"
        real = self._embed(Source(reference, "cmmd reference"), embedder, ctx, root)
        out = {"value": mmd(real, fake), **entry, "reference": described, "model": self.model,
               "embedding": f"CLIP image embedding, {real.shape[1]}-d, unit length ({embedder.identity})",
               "sigma": SIGMA, "scale": SCALE, "estimator": "biased: every pair, diagonals included (google-research)",
               "samples": len(fake), "reference_images": len(real)}
        if getattr(samples, "teacher", None) is not None:
            teacher = mmd(real, self._embed(Source(samples.teacher, "cmmd teacher samples"), embedder, ctx, root))
            out["teacher"] = teacher
            out["change"] = (out["value"] - teacher) / teacher if teacher else None
        return out

    def _embed(self, source, embedder, ctx, root):
        from .cmmd import cached_embeddings

        if source.count < 2:
            raise UserError(f"{source.arg} {str(source.path)!r} holds {source.count} image(s); cmmd needs at least 2")
        return cached_embeddings(source, embedder, cache=root / "cmmd", device=ctx.device, batch_size=self.batch_size)


class FDDinoV2(_SampleMetric):
    """FD_DINOv2 (EDM2): Frechet distance of DINOv2 ViT-L/14 features (torch-fidelity's extractor)."""

    name, direction, unit, key = "fd_dinov2", "lower", "", "fd_dinov2"

    def _check_network(self, weights, extractor: str, feature_layer) -> None:
        if weights or extractor != "inception-v3-compat" or feature_layer:
            raise ValueError(f"{self.name} reads torch-fidelity's DINOv2 ViT-L/14 from torch.hub (no weights, "
                             f"extractor or feature_layer option)")

    @staticmethod
    def validate_options(options: dict) -> None:
        _SampleMetric.validate_options(options)
        for key in ("weights", "extractor", "feature_layer"):
            if options.get(key) is not None:
                raise UserError(f"fd_dinov2 has no option {key!r}: it reads torch-fidelity's DINOv2 ViT-L/14, "
                                f"which torch.hub loads by name")


@lru_cache(maxsize=8)  # every cell of a suite names the same 30,000-image folder: its headers read once
def _image_size(path: str, mtime_ns: int) -> tuple[int, int]:
    from .evaluate import image_size

    return image_size(path, "reference")


def _dataset_npz(ds, limit: int | None, folder: Path) -> Path:
    """The data set's images as an ADM batch (N, H, W, 3) uint8, written once by content."""
    import numpy as np

    from .evaluate import _save_npz

    images = ds.uint8_images()
    images = images[:limit] if limit else images
    path = folder / f"{ds.content_hash}-{len(images)}.npz"
    if not path.is_file():
        _save_npz(path, arr_0=images.permute(0, 2, 3, 1).contiguous().numpy().astype(np.uint8))
    return path


# The options a suite may give are the factory's signature (unknown ones are refused at validation):
# the base class's, plus k.
_base = inspect.signature(_SampleMetric.__init__)
_NearestNeighbours.__init__.__signature__ = _base.replace(parameters=[
    *_base.parameters.values(), inspect.Parameter("k", inspect.Parameter.KEYWORD_ONLY, default=5, annotation="int")])
