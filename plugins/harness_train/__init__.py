"""The ``train`` stage: diffusion training of the cell's backbone before it is measured.

The loop, the objective and the block's schema are the core's (:mod:`harness.training`),
because every measurement of a cell shares its noise schedule and methods such as
distillation retrain through the same loop; this plugin makes the block a stage like any
other method's."""
from __future__ import annotations

import harness
from harness import Stage, TrainSpec, train_model


def train_cell(ctx, spec: TrainSpec) -> None:
    """Train the cell's backbone, then measure its EMA."""
    result = train_model(ctx, ctx.model, spec)
    ctx.model = result.pop("ema")
    ctx.extra["train"] = result


@harness.hookimpl
def harness_stages():
    return {"train": Stage(schema=TrainSpec, run=train_cell, active=lambda spec: spec.steps > 0,
                           description="diffusion training (noise prediction), EMA weights measured")}
