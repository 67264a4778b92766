"""Sample-quality metrics: validation loss, FID, KID, IS."""
from __future__ import annotations

import harness

from .metrics import FID, ISC, KID, ValLoss


@harness.hookimpl
def harness_metrics():
    return {"val_loss": ValLoss, "fid": FID, "kid": KID, "isc": ISC}
