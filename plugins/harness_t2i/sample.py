"""Text-to-image sampling: a prompt set through a diffusers pipeline, once per cell. The
``sample`` stage (:mod:`harness_sample`) runs :func:`sample_cell` for a block that names prompts.

The pipeline (``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``... whatever its
``model_index.json`` names) is loaded with the cell's U-Net passed in as its ``unet``
component (the pipeline's own is then never read), and called as diffusers documents it:
the denoising loop is the pipeline's, not a copy. BK-SDM's protocol is the documented
example: MS-COCO val2014 captions, 512x512, PNDM, 25 steps, guidance 7.5.

Identity of an image: image ``i`` is prompt ``i`` with its initial latent drawn from
``torch.Generator("cpu").manual_seed(seed + i)`` (the pipeline draws a list of generators one
latent each), so it does not depend on the batch it is in. Prompts go in fixed batches
``[b * B, (b + 1) * B)`` and batch ``b`` goes to rank ``b % world`` of a torch.distributed
group, as in class-conditional sampling (:mod:`harness.sampling`): every batch has the same
inputs and shapes on 1 or N processes, so the images are the same. A batch whose PNGs exist is
skipped: a killed cell resumes where it stopped.

With a teacher in the cell (a ``prune``/``distill`` block keeps the unpruned model at
``ctx.teacher``) its images are sampled too, from the same prompts and seeds, once per suite
(under ``<results>/<suite>/teachers/``): every cell of a suite shares the one teacher.
The metrics find both folders at ``ctx.samples`` (:class:`GeneratedImages`).
"""
from __future__ import annotations

import hashlib
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from harness import UserError, image_intact, rank_world, save_png, start_trajectory, suggest

from .prompts import PromptSet

# Short names for the schedulers papers use; any diffusers class name ending in "Scheduler" works too.
SCHEDULERS = {"pndm": "PNDMScheduler", "ddim": "DDIMScheduler", "ddpm": "DDPMScheduler",
              "euler": "EulerDiscreteScheduler", "euler-ancestral": "EulerAncestralDiscreteScheduler",
              "dpm-solver++": "DPMSolverMultistepScheduler", "lms": "LMSDiscreteScheduler",
              "unipc": "UniPCMultistepScheduler", "heun": "HeunDiscreteScheduler"}


class SampleSpec(BaseModel):
    """``sample:`` the images every quality metric of the cell scores."""

    model_config = ConfigDict(extra="forbid")
    prompts: PromptSet
    num_samples: Optional[int] = Field(None, gt=0)  # the first N prompts; None: every prompt
    pipeline: str  # hub id or folder of a diffusers pipeline with a ``unet`` component
    scheduler: Optional[str] = None  # None: the pipeline's own (PNDM for SD-1.x)
    steps: int = Field(25, ge=1)
    guidance_scale: float = Field(7.5, ge=0)
    resolution: Optional[int] = Field(None, gt=0)  # None: the pipeline's default (U-Net sample_size x VAE factor)
    batch_size: int = Field(8, gt=0)
    seed: Optional[int] = Field(None, ge=0)  # image i: seed + i; None: the suite's seed
    teacher: bool = True  # also sample ctx.teacher (the unpruned model) when the cell has one
    use_cell_model: bool = True  # False: the pipeline's own U-Net (the unmodified baseline)

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, v):
        # Stable Diffusion pipelines refuse heights and widths that are not multiples of 8 (the VAE's factor)
        if v is not None and v % 8:
            raise ValueError(f"resolution {v} is not a multiple of 8, which Stable Diffusion pipelines need")
        return v

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, v):
        if v is not None:
            scheduler_class(v)
        return v


def scheduler_class(name: str):
    import diffusers

    cls_name = SCHEDULERS.get(name, name)
    cls = getattr(diffusers, cls_name, None) if cls_name.endswith("Scheduler") else None
    if cls is None:
        known = list(SCHEDULERS) + [n for n in dir(diffusers) if n.endswith("Scheduler")]
        raise ValueError(f"scheduler {name!r} is not a diffusers scheduler{suggest(name, known)}")
    return cls


@dataclass
class GeneratedImages:
    """What the stage leaves at ``ctx.samples`` for the metrics: one PNG per prompt,
    ``{i:06d}.png``, in ``folder`` (the cell's model) and ``teacher`` (the teacher's, or None)."""

    folder: Path
    prompts: list[str]
    teacher: Optional[Path] = None
    size: tuple[int, int] = (0, 0)  # width, height

    def files(self, folder: Optional[Path] = None) -> list[Path]:
        folder = self.folder if folder is None else folder
        return [folder / f"{i:06d}.png" for i in range(len(self.prompts))]


# -- pipeline -----------------------------------------------------------------------------------
def load_pipeline(source: str, unet=None, device="cpu", dtype=torch.float32, scheduler: Optional[str] = None):
    """The pipeline at ``source`` with ``unet`` as its U-Net (its own is not loaded then)."""
    from diffusers import DiffusionPipeline

    try:
        config = DiffusionPipeline.load_config(source)
    except (OSError, ValueError) as exc:  # offline without the files, or a wrong id
        raise UserError(f"sample.pipeline {source!r}: cannot load: {str(exc).splitlines()[0]}") from None
    if "unet" not in config:
        parts = sorted(k for k in config if not k.startswith("_"))
        raise UserError(f"sample.pipeline {source!r} has no 'unet' component (it has {', '.join(parts)})")
    kwargs = {"unet": unet} if unet is not None else {}
    if "safety_checker" in config:  # it blanks images the scores must see, and costs a model load
        kwargs["safety_checker"] = None
    try:
        pipe = DiffusionPipeline.from_pretrained(source, dtype=dtype, **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(f"sample.pipeline {source!r}: cannot load: {str(exc).splitlines()[0]}") from None
    if scheduler is not None:
        pipe.scheduler = scheduler_class(scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def image_size(pipe, resolution: Optional[int]) -> int:
    """The side the pipeline makes: ``resolution``, else its default (sample_size x VAE factor)."""
    if resolution is not None:
        factor = int(getattr(pipe, "vae_scale_factor", 8))
        if resolution % factor:
            raise UserError(f"sample.resolution {resolution} is not a multiple of this pipeline's VAE factor {factor}")
        return resolution
    size = pipe.unet.config.sample_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    return int(size) * int(pipe.vae_scale_factor)


@torch.no_grad()
def sample_images(pipe, prompts: list[str], folder: str | Path, *, steps: int = 25, guidance_scale: float = 7.5,
                  resolution: Optional[int] = None, batch_size: int = 8, seed: int = 0,
                  rank: Optional[int] = None, world: Optional[int] = None) -> int:
    """Write ``{i:06d}.png`` for every prompt this rank owns; return how many it generated.

    ``rank``/``world`` default to the torch.distributed group's (0/1 without one); every rank
    waits for the others at the end when a group is running."""
    if rank is None or world is None:
        rank, world = rank_world()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    size = image_size(pipe, resolution)
    made = 0
    for b in range(rank, (len(prompts) + batch_size - 1) // batch_size, world):
        idx = list(range(b * batch_size, min((b + 1) * batch_size, len(prompts))))
        paths = [folder / f"{i:06d}.png" for i in idx]
        if all(image_intact(p) for p in paths):  # a torn or changed image (a shared teacher folder) is redrawn
            continue
        start_trajectory(pipe.unet)  # a stage's per-trajectory state (DeepCache's cache) starts afresh
        out = pipe(prompt=[prompts[i] for i in idx], num_inference_steps=steps, guidance_scale=guidance_scale,
                   generator=[torch.Generator("cpu").manual_seed(seed + i) for i in idx], height=size, width=size,
                   output_type="pil")
        for path, image in zip(paths, out.images):
            save_png(image, path)  # atomic: a reader never sees half an image
        made += len(idx)
    if world > 1 and rank_world()[1] > 1:
        import torch.distributed as dist

        dist.barrier()
    return made


def same_weights_on_every_rank(module: Optional[torch.nn.Module], device=None) -> None:
    """Rank 0's parameters and buffers, copied onto ``module`` (moved to ``device``, where the
    process group's backend wants its tensors) on every other rank; nothing without a group.

    Each rank ran the stages before ``sample`` itself (training, pruning, distillation): seeded
    alike, yet GPU kernels (atomic adds in backward passes) need not give the same bits, and a
    set sampled by several slightly different U-Nets is not one model's images."""
    if module is None or rank_world()[1] < 2:
        return
    import torch.distributed as dist

    if device is not None:
        module.to(device)
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, src=0)


# -- the stage ----------------------------------------------------------------------------------
def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _teacher_key(ctx) -> str:
    """The teacher's identity: what the compress plugin builds it from (backbone, train, seed)."""
    return _key(ctx.config.backbone.model_dump(), ctx.config.blocks.get("train"), ctx.suite_seed)


def sample_cell(ctx, spec: SampleSpec) -> None:
    from . import scoring

    prompts = spec.prompts.read()[:spec.num_samples]
    seed = ctx.suite_seed if spec.seed is None else spec.seed
    student = None
    if spec.use_cell_model:
        student = scoring.find_unet(ctx.model)
        if student is None:
            raise UserError(f"sample: the cell's {type(ctx.model).__name__} holds no diffusers conditional U-Net to "
                            f"put in the pipeline; use a unet backbone, or use_cell_model: false")
    teacher = None
    if spec.teacher and spec.use_cell_model and ctx.teacher is not None:
        teacher = scoring.find_unet(ctx.teacher)
    dtypes = {m: next(m.parameters()).dtype for m in (student, teacher) if m is not None}
    for module in dtypes:
        same_weights_on_every_rank(module, ctx.device)
    pipe = load_pipeline(spec.pipeline, student.to(ctx.device, ctx.dtype) if student is not None else None,
                         ctx.device, ctx.dtype, spec.scheduler)
    size = image_size(pipe, spec.resolution)
    _check_references(ctx, size)  # before any sampling: a reference of another size is a protocol error
    what = _key(prompts, spec.pipeline, pipe.scheduler.__class__.__name__, spec.steps, spec.guidance_scale, size, seed)
    root = Path(ctx.workdir) if ctx.workdir else Path(tempfile.mkdtemp(prefix="harness-t2i-"))
    folders = {"cell": root / f"t2i-{what}"}
    if teacher is not None:
        folders["teacher"] = (root.parent / "teachers" if ctx.workdir else root) / f"t2i-{_teacher_key(ctx)}-{what}"
    kwargs = dict(steps=spec.steps, guidance_scale=spec.guidance_scale, resolution=size, batch_size=spec.batch_size,
                  seed=seed)
    made, seconds = {}, {}
    try:
        for name, folder in folders.items():
            if name == "teacher":
                pipe.unet = teacher.to(ctx.device, ctx.dtype)
            t0 = time.perf_counter()
            made[name] = sample_images(pipe, prompts, folder, **kwargs)
            seconds[name] = round(time.perf_counter() - t0, 3)
            if rank_world()[0] == 0:
                (folder / "prompts.json").write_text(json.dumps(prompts))  # the folder says what it shows
    finally:
        for module, dtype in dtypes.items():  # the metrics after this stage see the model as it was
            module.to(dtype)
    ctx.samples = GeneratedImages(folders["cell"], prompts, folders.get("teacher"), (size, size))
    ctx.extra["sample"] = {
        "prompts": {**spec.prompts.describe(), "count": len(prompts)}, "pipeline": spec.pipeline,
        "pipeline_class": type(pipe).__name__, "scheduler": type(pipe.scheduler).__name__, "steps": spec.steps,
        "guidance_scale": spec.guidance_scale, "resolution": size, "seed": seed, "batch_size": spec.batch_size,
        "folder": str(folders["cell"]), "teacher_folder": str(folders["teacher"]) if "teacher" in folders else None,
        "generated": made, "seconds": seconds, "world_size": rank_world()[1]}
    del pipe


def _check_references(ctx, size: int) -> None:
    """Each quality metric's ``reference`` must hold images of the size it scores (``resize``
    when given, else the generated size): refused here, before hours of sampling."""
    from harness_quality import image_size as reference_size

    for i, m in enumerate(ctx.config.metric_specs()):
        ref = m.options.get("reference")
        if not isinstance(ref, str):
            continue
        want = m.options.get("resize") or size
        got = reference_size(ref, f"metrics.{i}.reference")
        if got != (want, want):
            raise UserError(f"metrics.{i} ({m.name}): reference {ref!r} holds {got[0]}x{got[1]} images; the "
                            f"samples are scored at {want}x{want}" + ("" if m.options.get("resize") else
                                                                     " (set resize: to scale them first)"))
