"""Layer pruning (LAPTOP-Diff and baselines) and distillation losses."""
from __future__ import annotations

import harness

from .criteria import CRITERIA
from .distill import LOSSES
from .metrics import OutputLoss


@harness.hookimpl
def harness_pruning_criteria():
    return dict(CRITERIA)


@harness.hookimpl
def harness_distill_losses():
    return dict(LOSSES)


@harness.hookimpl
def harness_metrics():
    return {"output_loss": OutputLoss}
