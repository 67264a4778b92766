"""Diffusion training of a cell's backbone."""
from __future__ import annotations


def train_cell(ctx) -> None:
    raise NotImplementedError("train.steps > 0: diffusion training is not implemented yet")
