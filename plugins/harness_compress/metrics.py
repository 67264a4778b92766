"""``output_loss``: how far the cell's (pruned) model strays from its teacher."""
from __future__ import annotations

import harness
from harness import MetricUnavailable, UserError, evaluating, noise_channels, output_loss, reference_outputs

from .calibration import calibration_inputs


class OutputLoss(harness.Metric):
    """E||eps_student - eps_teacher||^2 over images x timesteps spread across the schedule.

    ``held_out`` (default): images of the validation split, noise from a seed stream of its
    own, so the set differs from the calibration batch every criterion scored on. With
    ``held_out: false`` it is the calibration set itself (the in-sample figure, which the
    prune record also keeps as ``one_shot_output_loss``). A text U-Net is conditioned on
    ``prompts`` (a file) encoded by ``pipeline``'s text encoder when both are given, else on
    a random context."""

    direction, unit = "lower", "mse"
    path_options = {"prompts": "prompt file"}

    def __init__(self, batch_size: int = 64, timesteps: int = 16, held_out: bool = True,
                 prompts: str | None = None, pipeline: str | None = None):
        if batch_size < 1 or timesteps < 1:
            raise UserError(f"metric 'output_loss': batch_size and timesteps must be >= 1 (got {batch_size}, {timesteps})")
        if (prompts is None) != (pipeline is None):
            raise UserError("metric 'output_loss': prompts and pipeline go together")
        self.batch_size, self.timesteps, self.held_out = batch_size, timesteps, held_out
        self.prompts = (prompts, pipeline) if prompts else None

    def __call__(self, ctx) -> dict:
        teacher = getattr(ctx, "teacher", None)
        if teacher is None:
            raise MetricUnavailable("no teacher: output_loss needs a stage that keeps one (prune, distill, quantize...)")
        student = ctx.model
        where = dict(split="val", purpose="output-loss") if self.held_out else {}
        if self.prompts:
            where["prompts"] = self.prompts
        with evaluating(student, teacher):
            batches = calibration_inputs(ctx, teacher, self.batch_size, self.timesteps, **where)
            c = noise_channels(ctx)
            value = output_loss(student, batches, reference_outputs(teacher, batches, c), c)
        out = {"value": value, "batch_size": self.batch_size, "timesteps": self.timesteps,
               "data": "held-out (val split)" if self.held_out else "calibration set"}
        if self.prompts:
            out["prompts"] = self.prompts[0]
        return out
