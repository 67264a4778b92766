"""Work a cell does before it is measured: training, pruning, distillation.

Each stage takes the :class:`harness.context.CellContext`, leaves its model in ``ctx.model``
and what the record should keep in ``ctx.extra``. The runner calls them in this order:
train (``train.steps > 0``), then compress (``prune`` / ``distill`` blocks).
"""
from __future__ import annotations


def train_cell(ctx) -> None:
    from .training import train_cell as _train

    _train(ctx)


def compress_cell(ctx) -> None:
    from .compression import compress_cell as _compress

    _compress(ctx)
