"""Layer pruning (LAPTOP-Diff and baselines) and distillation: the ``prune`` and ``distill``
stages, their criteria and losses, the ``output_loss`` metric and the ``harness prune`` command."""
from __future__ import annotations

import harness

from .commands import COMMANDS
from .criteria import CRITERIA
from .distill import LOSSES
from .metrics import OutputLoss
from .stages import STAGES


@harness.hookimpl
def harness_stages():
    return dict(STAGES)


@harness.hookimpl
def harness_commands():
    return dict(COMMANDS)


@harness.hookimpl
def harness_pruning_criteria():
    return dict(CRITERIA)


@harness.hookimpl
def harness_distill_losses():
    return dict(LOSSES)


@harness.hookimpl
def harness_metrics():
    return {"output_loss": OutputLoss}
