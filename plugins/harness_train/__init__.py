"""The ``train`` stage: diffusion training of the cell's backbone before it is measured.

The loop, the objective and the block's schema are the core's (:mod:`harness.training`),
because every measurement of a cell shares its noise schedule and methods such as
distillation retrain through the same loop; this plugin makes the block a stage like any
other method's."""
from __future__ import annotations

import harness


@harness.hookimpl
def harness_stages():
    return {"train": harness.Lazy("harness_train.stage:TRAIN",
                                  "diffusion training (noise prediction), EMA weights measured")}


def __getattr__(name):  # PEP 562: the stage's function, for tests and other plugins, loads torch on first use
    if name == "train_cell":
        from .stage import train_cell

        return train_cell
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
