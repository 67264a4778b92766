"""``pickscore`` and ``clip_score`` of the cell's text-to-image model over a prompt file.

The pipeline (VAE, text encoder, scheduler) is loaded from ``pipeline``; its U-Net is the
cell's own (pruned, distilled) when the cell's backbone holds a diffusers conditional U-Net.
With a teacher in the cell (a prune/distill block), the teacher is scored on the same
prompts and seeds too, and the record gives the relative drop, LAPTOP-Diff's headline.
"""
from __future__ import annotations

import statistics

from harness.errors import MetricUnavailable

from . import scoring


class _T2IScore:
    name = direction = unit = ""
    path_options = {"prompts": "prompt file"}
    default_model: str = ""
    default_processor: str | None = None

    def __init__(self, prompts: str, pipeline: str, model: str | None = None, processor: str | None = None,
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

    def _sample(self, pipe, unet, prompts):
        if unet is not None:
            pipe.unet = unet.to(pipe.device)
        return scoring.generate(pipe, prompts, self.steps, self.guidance_scale, self.seed, self.batch_size,
                                self.resolution)

    def __call__(self, ctx) -> dict:
        prompts = scoring.read_prompts(self.prompts, self.max_prompts)
        pipe = scoring.load_pipeline(self.pipeline, ctx.device, ctx.dtype)
        clip, processor = scoring.load_clip(self.model, self.processor, ctx.device)
        student = scoring.find_unet(ctx.model) if self.use_cell_model else None
        if self.use_cell_model and student is None:
            raise MetricUnavailable(f"{self.name}: the cell's {type(ctx.model).__name__} holds no diffusers "
                                    "conditional U-Net to put in the pipeline; set use_cell_model: false")
        values = self.score(clip, processor, prompts, self._sample(pipe, student, prompts)).tolist()
        out = {"value": statistics.fmean(values), "std": statistics.pstdev(values), "prompts": len(prompts),
               "steps": self.steps, "guidance_scale": self.guidance_scale, "model": self.model,
               "pipeline": self.pipeline}
        teacher = getattr(ctx, "teacher", None)
        if self.teacher and teacher is not None and self.use_cell_model:
            t_values = self.score(clip, processor, prompts,
                                  self._sample(pipe, scoring.find_unet(teacher), prompts)).tolist()
            out["teacher"] = statistics.fmean(t_values)
            out["drop_percent"] = 100 * (out["teacher"] - out["value"]) / out["teacher"] if out["teacher"] else None
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

    def score(self, clip, processor, prompts, images):
        return scoring.clip_scores(clip, processor, prompts, images)
