"""Sample-quality metrics (validation loss, FID, KID, IS, and the ADM evaluator's sFID, precision,
recall) and the ``harness fid`` command."""
from __future__ import annotations

import harness

from .commands import COMMANDS
from .metrics import FID, ISC, KID, SFID, Precision, Recall, ValLoss


@harness.hookimpl
def harness_metrics():
    return {"val_loss": ValLoss, "fid": FID, "kid": KID, "isc": ISC, "sfid": SFID, "precision": Precision,
            "recall": Recall}


@harness.hookimpl
def harness_commands():
    return dict(COMMANDS)
