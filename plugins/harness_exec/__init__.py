"""Built-in executors: where a suite's cells run."""
from __future__ import annotations

import harness

from .local import LocalExecutor


@harness.hookimpl
def harness_executors():
    return {"local": LocalExecutor}
