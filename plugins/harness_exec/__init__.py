"""Built-in executors: where a suite's cells run.

``local`` runs them one after another in this process, ``process`` in parallel worker
processes of this machine, ``submitit`` as Slurm jobs. All three call
``harness.execute_cell``, so records land in the same place whichever is used.
"""
from __future__ import annotations

import harness


@harness.hookimpl
def harness_executors():
    return {"local": "harness_exec.local:LocalExecutor", "process": "harness_exec.process:ProcessExecutor",
            "submitit": "harness_exec.slurm:SubmititExecutor"}
