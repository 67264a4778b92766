"""The ``train`` stage itself, kept out of the package's ``__init__`` so that declaring it
imports neither torch nor the training loop."""
from __future__ import annotations

from harness import Stage, TrainSpec, train_model


def train_cell(ctx, spec: TrainSpec) -> None:
    """Train the cell's backbone, then measure its EMA."""
    result = train_model(ctx, ctx.model, spec)
    ctx.model = result.pop("ema")
    ctx.extra["train"] = result


TRAIN = Stage(schema=TrainSpec, run=train_cell, active=lambda spec: spec.steps > 0,
              description="diffusion training (noise prediction), EMA weights measured")
