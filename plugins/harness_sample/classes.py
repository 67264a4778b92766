"""Class-conditional sampling in fixed shards, with the metrics' features extracted as it goes.

Identity of a sample: sample ``i`` draws its initial noise, its class label and its DDPM noise
from a generator seeded by ``(seed, i)`` (:func:`harness.sampling.sample_batch`), and samples
go in fixed batches ``[b * B, (b + 1) * B)``. Batches are grouped into fixed shards of
``shard_size`` images (rounded up to whole batches); shard ``k`` goes to rank ``k % world``.
So every batch has the same inputs and shapes on 1 or N ranks, and so do its images and
features. The figures then come from per-shard sums merged in shard order
(:mod:`harness_quality.streaming`): the same bits whatever the number of ranks.

``keep`` says what is written besides the features of each shard:

- ``png``: ``{i:06d}.png`` per image (what ``harness fid`` and other tools read);
- ``npz``: one ADM batch ``samples.npz`` (``arr_0``, (N, H, W, 3) uint8): each shard's images
  are saved as they are made, then copied one after the other into the npz, never all in memory;
- ``none``: no image at all.

The features are extracted from the same uint8 images in every mode, so ``keep`` changes what
is on disk, never a figure. A shard is done when its feature file exists (written last,
atomically): a killed run makes only the shards that are missing. Once all exist, rank 0
merges their float64 sums in shard order into ``features/moments.npz``.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from harness import UserError, rank_world, sample_batch, to_uint8


@dataclass
class ClassSamples:
    """What the stage leaves at ``ctx.samples`` for the metrics: the features of every image
    (``features``, a :class:`harness_quality.streaming.StreamedFeatures`), and where the images
    are when kept (``folder`` of PNGs, or ``npz``)."""

    features: object
    count: int
    size: tuple[int, int]            # width, height
    folder: Optional[Path] = None    # keep: png
    npz: Optional[Path] = None       # keep: npz
    prompts: None = None             # no text: the text-to-image metrics do not apply
    teacher: None = None


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


# -- what is sampled -----------------------------------------------------------------------------
@lru_cache(maxsize=2)
def load_vae(source: str):
    """A diffusers AutoencoderKL: a hub id (stabilityai/sd-vae-ft-ema) or a saved folder."""
    from diffusers import AutoencoderKL

    try:
        vae = AutoencoderKL.from_pretrained(source)
    except (OSError, ValueError) as exc:  # offline without the files, a wrong id, a broken folder
        raise UserError(f"sample.vae {source!r}: cannot load a diffusers AutoencoderKL: "
                        f"{str(exc).splitlines()[0]}") from None
    return vae.eval().requires_grad_(False)


def decoder(ctx, spec) -> tuple[Optional[Callable[[torch.Tensor], torch.Tensor]], Optional[str]]:
    """latents -> images in [-1, 1]: the block's ``vae``, else the data block's; None for a
    pixel-space backbone (3 channels)."""
    if spec.vae:
        vae = load_vae(spec.vae).to(ctx.device)
        scale = float(getattr(vae.config, "scaling_factor", 0.18215))

        @torch.inference_mode()
        def decode(z):
            return vae.decode(z.float() / scale).sample.clamp(-1, 1)

        decode.factor = 2 ** (len(vae.config.block_out_channels) - 1)  # the side of an image per latent pixel
        return decode, spec.vae
    ds = ctx.dataset if ctx.config.data is not None else None
    if ds is not None and hasattr(ds, "decode"):
        return ds.decode, getattr(ds, "vae_name", "the data block's VAE")
    if ctx.input_spec["in_channels"] != 3:
        raise UserError(f"sample: the backbone makes {ctx.input_spec['in_channels']}-channel latents and nothing "
                        f"decodes them; give sample.vae (e.g. stabilityai/sd-vae-ft-ema) or a data block with a vae")
    return None, None


def check_references(ctx, metrics, decode) -> None:
    """Each metric's ``reference`` must hold images of the size the samples will have: refused
    here, before any sampling, when that size is known (pixel space, or the block's VAE)."""
    from harness_quality import image_size

    side = ctx.input_spec["input_size"]
    if decode is not None:
        factor = getattr(decode, "factor", None)
        if factor is None:
            return
        side *= factor
    for i, m in enumerate(metrics):
        if m.name == "cmmd":  # CLIP resizes every image to its own input size: any reference size will do
            continue
        ref = m.options.get("reference")
        if isinstance(ref, str):
            got = image_size(ref, f"{m.name} reference")
            if got != (side, side):
                raise UserError(f"{m.name}: reference {ref!r} holds {got[0]}x{got[1]} images; the samples will be "
                                f"{side}x{side}")


def learn_sigma(ctx, spec, model) -> bool:
    """Whether DDPM takes its variance from the model's second half of channels: the block's
    choice, else the train block's (an untrained variance half must not drive it), else the
    model's own (a released checkpoint such as DiT's learned it)."""
    if spec.learn_sigma is not None:
        return spec.learn_sigma
    if "train" in ctx.config.blocks:
        return ctx.train.learn_sigma
    return bool(getattr(model, "learn_sigma", False))


def fingerprint(model: torch.nn.Module) -> str:
    """A hash of the model's weights (each tensor's name, shape and float64 sums), so shards made
    by other weights at the same place are never taken for this model's."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            x = t.detach().double()
            h.update(f"{name}{tuple(t.shape)}{x.sum().item():.17g}{(x * x).sum().item():.17g}".encode())
    return h.hexdigest()[:16]


# -- the stage ------------------------------------------------------------------------------------
def quality_metrics(ctx) -> list:
    """The cell's metrics that score generated images through the quality plugin's features."""
    from harness_quality import STREAMED_METRICS

    return [m for m in ctx.config.metric_specs() if m.name in STREAMED_METRICS]


def sample_classes(ctx, spec) -> None:
    from harness_quality import Extractors, StreamedFeatures, merge_shards

    rank, world = rank_world()
    metrics = quality_metrics(ctx)
    if spec.keep == "none" and not metrics:
        raise UserError("sample: keep: none writes no image and the cell has no quality metric (fid, sfid, isc, "
                        "precision, recall, kid, fd_dinov2, density, coverage, cmmd) to score them; add one or keep "
                        "png/npz")
    extractors = Extractors.for_metrics(metrics, cuda=ctx.device.type == "cuda")
    if spec.keep == "none" and not extractors.resolved:
        raise UserError(f"sample: keep: none keeps only features, and no feature network can be had here "
                        f"({'; '.join(extractors.unavailable.values())})")
    model = ctx.model
    decode, vae = decoder(ctx, spec)
    check_references(ctx, metrics, decode)
    inputs = ctx.input_spec
    seed = ctx.suite_seed if spec.seed is None else spec.seed
    sigma = learn_sigma(ctx, spec, model)
    train = ctx.train
    kwargs = dict(shape=(inputs["in_channels"], inputs["input_size"], inputs["input_size"]),
                  num_classes=inputs["num_classes"] or 0, seed=seed, sampler=spec.sampler, steps=spec.steps,
                  cfg_scale=spec.cfg_scale, guided_channels=spec.guided_channels, schedule=train.schedule,
                  timesteps=train.timesteps, learn_sigma=sigma, device=ctx.device)
    what = {k: v for k, v in kwargs.items() if k != "device"}
    key = hashlib.sha256(json.dumps([what, spec.num_samples, spec.batch_size, spec.shard_size, spec.keep, vae,
                                     extractors.identity, fingerprint(model)], sort_keys=True,
                                    default=str).encode()).hexdigest()[:12]
    root = Path(ctx.workdir) if ctx.workdir else Path(__import__("tempfile").mkdtemp(prefix="harness-sample-"))
    folder = root / f"sample-{key}"
    n, batch = spec.num_samples, spec.batch_size
    per_shard = math.ceil(spec.shard_size / batch) * batch
    shards = math.ceil(n / per_shard)
    shard_file = lambda k: folder / "features" / f"{k:05d}.npz"  # noqa: E731
    made, seconds, t0 = 0, 0.0, time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        for k in range(rank, shards, world):
            if shard_file(k).is_file():
                continue
            first, stop = k * per_shard, min((k + 1) * per_shard, n)
            parts, images = [], []
            for start in range(first, stop, batch):
                idx = list(range(start, min(start + batch, stop)))
                x, _ = sample_batch(model, idx, **kwargs)
                if decode is not None:
                    x = decode(x)
                arr = to_uint8(x)
                if spec.keep == "png":
                    _write_pngs(folder / "images", idx, arr)
                elif spec.keep == "npz":
                    images.append(arr)
                parts.append(extractors(arr))
            if spec.keep == "npz":
                _save_npy(folder / "images" / f"{k:05d}.npy", np.concatenate(images))
            extractors.save_shard(shard_file(k), parts, stop - first, (arr.shape[2], arr.shape[1]))
            made += stop - first
            print(f"sample: shard {k + 1}/{shards} done ({stop - first} images, rank {rank} of {world})",
                  file=sys.stderr, flush=True)
    finally:
        model.train(was_training)
    seconds = round(time.perf_counter() - t0, 3)
    _barrier()  # every shard exists from here on
    missing = [k for k in range(shards) if not shard_file(k).is_file()]
    if missing:
        raise RuntimeError(f"sample: shard(s) {missing[:5]} missing after every rank finished (see {folder})")
    npz = folder / "samples.npz" if spec.keep == "npz" else None
    files, merged = [shard_file(k) for k in range(shards)], folder / "features" / "moments.npz"
    if rank == 0:
        if npz is not None and not npz.is_file():
            assemble_npz([folder / "images" / f"{k:05d}.npy" for k in range(shards)], npz)
        merge_shards(files, merged)
    _barrier()
    first = StreamedFeatures.read_header(shard_file(0))
    ctx.samples = ClassSamples(StreamedFeatures(files, extractors.identity, merged), n, first.get("size", (0, 0)),
                               folder / "images" if spec.keep == "png" else None, npz)
    ctx.extra["sample"] = {
        "kind": "class-conditional", "num_samples": n, "sampler": spec.sampler, "steps": spec.steps,
        "cfg_scale": spec.cfg_scale, "guided_channels": spec.guided_channels, "learn_sigma": sigma,
        "batch_size": batch, "seed": seed, "keep": spec.keep, "vae": vae, "num_classes": kwargs["num_classes"],
        "shards": shards, "shard_size": per_shard, "folder": str(folder), "features": extractors.identity,
        "images": str(ctx.samples.folder or ctx.samples.npz or "") or None, "generated": made,
        "seconds": seconds, "world_size": world,
        **({"features_unavailable": extractors.unavailable} if extractors.unavailable else {})}


def _write_pngs(folder: Path, idx: list[int], arr: np.ndarray) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, image in zip(idx, arr):
        path = folder / f"{i:06d}.png"
        tmp = path.with_name(path.name + ".tmp")  # not a .png: a reader never sees half an image
        Image.fromarray(image).save(tmp, format="PNG")
        os.replace(tmp, path)


def _save_npy(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, arr)
    os.replace(tmp, path)


def assemble_npz(parts: list[Path], path: Path) -> Path:
    """The ADM batch ``arr_0`` (N, H, W, 3) uint8 from per-shard ``.npy`` files, copied one
    after the other into an uncompressed npz (which readers can memory-map), then the parts
    removed. Written under a temporary name and renamed: a killed assembly is redone."""
    arrays = [np.load(p, mmap_mode="r", allow_pickle=False) for p in parts]
    shape = (sum(len(a) for a in arrays),) + tuple(arrays[0].shape[1:])
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_2_0(member, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                                                          "fortran_order": False, "shape": shape})
            for a in arrays:
                for s in range(0, len(a), 256):  # a few hundred images at a time
                    member.write(np.ascontiguousarray(a[s:s + 256]).tobytes())
    del arrays
    os.replace(tmp, path)
    for p in parts:
        p.unlink(missing_ok=True)
    return path
