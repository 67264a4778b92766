"""Work a cell does before it is measured: training, pruning, distillation.

Each stage takes the :class:`harness.context.CellContext`, leaves its model in ``ctx.model``
and what the record should keep in ``ctx.extra``.
"""
from __future__ import annotations


def train_cell(ctx) -> None:
    raise NotImplementedError("train.steps > 0: diffusion training is not implemented yet; "
                              "set train.steps to 0 to measure untrained models")


def compress_cell(ctx) -> None:
    raise NotImplementedError("prune/distill: compression is not implemented yet")
