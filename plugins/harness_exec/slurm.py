"""Each cell a Slurm job, through submitit.

The cells of a suite go out as one job array; every job runs ``execute_cell`` on its node
and writes its record straight into the results folder (which must therefore be on a
file system the nodes share), exactly where the local executor would. submitit's logs
and pickles go next to the records, under ``<results>/<suite>/submitit/``.

``cluster="local"`` runs the same jobs as subprocesses of this machine through submitit's
own local executor: the code path is the Slurm one except for sbatch, so it is testable
without a cluster.

A job of several tasks (``tasks_per_node: 8``, ``nodes``) runs its cell on all of them as one
torch.distributed group, the way ``torchrun`` would: the stages before ``sample`` once, the
sampling shared (see :func:`harness.runner.execute_cell_on_ranks`).
"""
from __future__ import annotations

import signal
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from harness import CellJob, UserError, execute_cell, execute_cell_on_ranks, suggest

from .process import failed_record, stamp

CLUSTERS = ("slurm", "local", "debug")
# submitit's own default time limit is minutes; a training cell needs far more.
DEFAULT_TIMEOUT_MIN = 12 * 60


class SubmititExecutor:
    """Each cell a Slurm job (submitit); cluster='local' runs them as local subprocesses."""

    def __init__(self, cluster: str | None = None, folder: str | None = None, jobs: int | None = None,
                 poll: float = 5.0, **parameters):
        if cluster is not None and cluster not in CLUSTERS:
            raise UserError(f"executor 'submitit': unknown cluster {cluster!r}{suggest(cluster, CLUSTERS)}")
        if jobs is not None and (not isinstance(jobs, int) or jobs < 1):
            raise UserError(f"executor 'submitit': jobs must be a positive integer, got {jobs!r}")
        self.cluster, self.folder, self.poll = cluster, folder, poll
        self.parameters = {"timeout_min": DEFAULT_TIMEOUT_MIN, **parameters}
        if jobs is not None:  # how many array tasks Slurm may run at once
            self.parameters.setdefault("slurm_array_parallelism", jobs)
        with tempfile.TemporaryDirectory() as tmp:  # fail on a misspelt option now, not after planning
            self._executor(Path(tmp))

    def _executor(self, folder: Path):
        import submitit

        try:
            executor = submitit.AutoExecutor(folder=folder, cluster=self.cluster)
            executor.update_parameters(**self.parameters)
        except (NameError, AssertionError, ValueError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"executor 'submitit': {first}") from None
        return executor

    def log_folder(self, job: CellJob) -> Path:
        return Path(self.folder) if self.folder else Path(job.results_dir) / "submitit"

    def run(self, jobs, on_done, on_start=None):
        jobs = list(jobs)
        if not jobs:
            return
        executor = self._executor(self.log_folder(jobs[0]))  # <job id>_<task>_log.out etc.
        executor.update_parameters(name=f"harness-{jobs[0].suite}")
        before = {job.cell: stamp(job.record_path) for job in jobs}
        tasks = int(self.parameters.get("tasks_per_node", 1)) * int(self.parameters.get("nodes", 1))
        with _interruptible_children(self.cluster == "local"):
            submitted = executor.map_array(cell_on_tasks if tasks > 1 else execute_cell, jobs)
        pending = dict(zip(submitted, jobs))
        for job in jobs:
            if on_start:
                on_start(job)
        try:
            while pending:
                finished = [s for s in pending if s.done()]
                for sub in finished:
                    job = pending.pop(sub)
                    on_done(job, self._collect(sub, job, before[job.cell]))
                if pending and not finished:
                    time.sleep(self.poll)
        except BaseException:  # Ctrl-C: cancel what is left, so a rerun does not race live jobs
            for sub in pending:
                sub.cancel(check=False)
            raise

    @staticmethod
    def _collect(sub, job: CellJob, before) -> dict:
        try:
            return sub.result()
        except Exception as exc:  # the job died (node failure, time limit, OOM kill): a failed cell
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return failed_record(job, f"SlurmJobFailed: job {sub.job_id} ({reason}); log: {sub.paths.stderr}",
                                 before)


def cell_on_tasks(job: CellJob):
    """A cell on every task of a multi-task job: the tasks form a torch.distributed group
    (submitit's environment exported as torchrun's variables); task 0's record is the job's."""
    import submitit

    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return execute_cell_on_ranks(job)


@contextmanager
def _interruptible_children(local: bool):
    """submitit cancels a local job with SIGINT. A harness started in the background (``&``,
    nohup) ignores SIGINT and its children would inherit that and never stop; while the
    subprocesses start, SIGINT gets Python's default handler, which children do not inherit."""
    main = threading.current_thread() is threading.main_thread()  # only it may set handlers
    if not local or not main or signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
