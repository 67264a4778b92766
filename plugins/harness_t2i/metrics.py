"""``pickscore`` and ``clip_score`` of the cell's text-to-image model over a prompt file.

When the cell has a ``sample`` block, they score the images that stage generated (and the
teacher's, when it sampled one), read back in chunks so 30,000 images never sit in memory;
``prompts``/``pipeline`` are then not needed. Without it they sample their own:
The pipeline (VAE, text encoder, scheduler) is loaded from ``pipeline``; its U-Net is the
cell's own (pruned, distilled) when the cell's backbone holds a diffusers conditional U-Net.
With a teacher in the cell (a prune/distill block), the teacher is scored on the same
prompts and seeds too, and the record gives the relative drop, LAPTOP-Diff's headline.
"""
from __future__ import annotations

import inspect
import statistics

from harness import MetricUnavailable

from . import scoring


class _T2IScore:
    name = direction = unit = ""
    path_options = {"prompts": "prompt file"}
    samples = True  # scores the cell's samples: a stage that changes the sampler is named in the entry
    default_model: str = ""
    default_processor: str | None = None

    def __init__(self, prompts: str | None = None, pipeline: str | None = None, model: str | None = None,
                 processor: str | None = None,
                 steps: int = 25, guidance_scale: float = 7.5, batch_size: int = 4, max_prompts: int | None = None,
                 resolution: int | None = None, use_cell_model: bool = True, teacher: bool = True, seed: int = 0):
        if steps < 1 or batch_size < 1 or (max_prompts is not None and max_prompts < 1):
            raise ValueError(f"{self.name}: steps, batch_size and max_prompts must be >= 1")
        self.prompts, self.pipeline = prompts, pipeline
        self.model = model or self.default_model
        self.processor = processor if processor is not None else (None if model else self.default_processor)
        self.steps, self.guidance_scale, self.batch_size = steps, guidance_scale, batch_size
        self.max_prompts, self.resolution, self.seed = max_prompts, resolution, seed
        self.use_cell_model, self.teacher = use_cell_model, teacher

    def score(self, clip, processor, prompts, images):
        raise NotImplementedError

    def _score_folder(self, clip, processor, prompts, files, chunk: int = 64) -> list[float]:
        from PIL import Image

        values = []
        for s in range(0, len(files), chunk):
            images = []
            for f in files[s:s + chunk]:
                with Image.open(f) as im:
                    images.append(im.convert("RGB"))
            values += self.score(clip, processor, prompts[s:s + chunk], images).tolist()
        return values

    def _generated(self, ctx, images) -> dict:
        """Score the sample stage's images (and its teacher's) against their prompts."""
        clip, processor = scoring.load_clip(self.model, self.processor, ctx.device)
        prompts = list(images.prompts)
        values = self._score_folder(clip, processor, prompts, images.files())
        out = self._summary(values, len(prompts), "sample stage", str(images.folder))
        if self.teacher and getattr(images, "teacher", None) is not None:
            self._with_teacher(out, self._score_folder(clip, processor, prompts, images.files(images.teacher)))
        return out

    def _summary(self, values, n, source, where) -> dict:
        return {"value": statistics.fmean(values), "std": statistics.pstdev(values), "prompts": n,
                "model": self.model, "images": source, "where": where}

    @staticmethod
    def _with_teacher(out: dict, t_values: list[float]) -> None:
        """The teacher's figure on the same prompts and seeds, and the relative change
        (``change`` -0.04: 4% below the teacher; ``drop_percent`` 4.0, LAPTOP-Diff's way)."""
        out["teacher"] = statistics.fmean(t_values)
        out["teacher_std"] = statistics.pstdev(t_values)
        t = out["teacher"]
        out["change"] = (out["value"] - t) / t if t else None
        out["drop_percent"] = 100 * (t - out["value"]) / t if t else None

    def _sample(self, pipe, unet, prompts):
        if unet is not None:
            pipe.unet = unet.to(pipe.device)
        return scoring.generate(pipe, prompts, self.steps, self.guidance_scale, self.seed, self.batch_size,
                                self.resolution)

    def __call__(self, ctx) -> dict:
        if getattr(ctx, "samples", None) is not None and getattr(ctx.samples, "prompts", None):
            return self._generated(ctx, ctx.samples)
        if self.prompts is None or self.pipeline is None:
            raise ValueError(f"{self.name}: give the cell a sample block, or prompts and pipeline to sample here")
        prompts = scoring.read_prompts(self.prompts, self.max_prompts)
        pipe = scoring.load_pipeline(self.pipeline, ctx.device, ctx.dtype)
        clip, processor = scoring.load_clip(self.model, self.processor, ctx.device)
        student = scoring.find_unet(ctx.model) if self.use_cell_model else None
        if self.use_cell_model and student is None:
            raise MetricUnavailable(f"{self.name}: the cell's {type(ctx.model).__name__} holds no diffusers "
                                    "conditional U-Net to put in the pipeline; set use_cell_model: false")
        values = self.score(clip, processor, prompts, self._sample(pipe, student, prompts)).tolist()
        out = {**self._summary(values, len(prompts), "sampled by the metric", self.pipeline),
               "steps": self.steps, "guidance_scale": self.guidance_scale, "pipeline": self.pipeline}
        teacher = getattr(ctx, "teacher", None)
        if self.teacher and teacher is not None and self.use_cell_model:
            self._with_teacher(out, self.score(clip, processor, prompts,
                                               self._sample(pipe, scoring.find_unet(teacher), prompts)).tolist())
        return out


class PickScore(_T2IScore):
    """PickScore: logit_scale.exp() * cosine(text, image), PickScore_v1 by default."""

    name, direction, unit = "pickscore", "higher", ""
    default_model, default_processor = scoring.PICKSCORE_MODEL, scoring.PICKSCORE_PROCESSOR

    def score(self, clip, processor, prompts, images):
        return scoring.pickscores(clip, processor, prompts, images)


class ClipScore(_T2IScore):
    """CLIP score: 100 * max(cosine(text, image), 0), CLIP ViT-L/14 by default."""

    name, direction, unit = "clip_score", "higher", ""
    default_model = scoring.CLIP_MODEL
    SCALES = ("torchmetrics", "cosine")

    def __init__(self, *args, scale: str = "torchmetrics", **kwargs):
        # torchmetrics: 100 * max(cos, 0); cosine: the raw mean cosine BK-SDM's tables print (0.2958 for SD-1.4)
        if scale not in self.SCALES:
            raise ValueError(f"clip_score: scale {scale!r} is not one of {', '.join(self.SCALES)}")
        super().__init__(*args, **kwargs)
        self.scale = scale

    def score(self, clip, processor, prompts, images):
        if self.scale == "cosine":
            return scoring.cosines(clip, processor, prompts, images)
        return scoring.clip_scores(clip, processor, prompts, images)

    def _summary(self, values, n, source, where) -> dict:
        return {**super()._summary(values, n, source, where), "scale": self.scale}


# The options a suite may give are the factory's signature (unknown ones are refused at validation):
# the base class's, plus scale.
_base = inspect.signature(_T2IScore.__init__)
ClipScore.__init__.__signature__ = _base.replace(parameters=[
    *_base.parameters.values(), inspect.Parameter("scale", inspect.Parameter.KEYWORD_ONLY, default="torchmetrics")])
