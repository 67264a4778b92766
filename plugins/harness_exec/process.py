"""Cells in parallel worker processes on this machine.

Each cell gets a fresh process (spawn context, never fork: a forked copy of a parent with
torch threads or CUDA initialised can deadlock). One process per cell costs an interpreter
start and a torch import (a second or two) but buys isolation: a worker that segfaults,
is killed by the OOM killer or hangs past ``timeout`` becomes one failed record, and the
memory of a finished cell goes back to the system.

A timing-sensitive metric (latency) gets the machine to itself: its worker asks the parent
through its pipe, the parent starts no new cell and answers once every other running cell
has finished or is itself waiting for the machine, and the worker says when the timing is
done. Time spent waiting does not count against ``timeout``.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
from contextlib import contextmanager
from multiprocessing.connection import wait

from harness import CellJob, UserError, environment, execute_cell, read_record, registry, write_record


# Messages of the worker's pipe besides the final record (a dict).
_ASK, _GO, _DONE = "alone?", "alone", "alone-done"
_REFUSED = "user-error"  # (_REFUSED, message): the cell could not write its record (a full disk)


def _worker(job: CellJob, conn, threads: int, parent: int) -> None:
    """Child side: run one cell and send its record back (it is also on disk)."""
    import torch

    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()

    @contextmanager
    def alone():
        conn.send(_ASK)
        conn.recv()  # _GO: no other cell runs until we say _DONE
        try:
            yield True
        finally:
            conn.send(_DONE)

    torch.set_num_threads(threads)  # a cell's own `threads` setting still wins inside execute_cell
    try:
        conn.send(execute_cell(job, alone=alone))
    except UserError as exc:  # its record could not be written: the parent stops the run with this one line
        conn.send((_REFUSED, str(exc)))
    finally:
        conn.close()


def _exit_with_parent(parent: int) -> None:
    """End this worker once its parent is gone (SIGKILL, the OOM killer): the parent's claim
    on the cell died with it, another run may be redoing the cell, and nobody collects."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def stamp(path) -> tuple | None:
    """What identifies the file at ``path`` now (a rewrite is a new file: atomic rename)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns


def failed_record(job: CellJob, error: str, before: tuple | None) -> dict:
    """The record of a cell whose worker never reported back; written by the parent.

    ``before`` is :func:`stamp` of the record path when the worker started: a worker can
    write its ok record and die before reporting (killed at the timeout, or on its way
    out), and then that record, not a failure, is the cell's result."""
    if stamp(job.record_path) != before:
        rec = read_record(job.record_path)
        if rec is not None and rec["status"] == "ok":
            return rec
    record = {
        "suite": job.suite, "cell": job.cell, "label": job.label, "index": job.index, "seed": job.seed,
        "config": job.config,
        "status": "failed", "error": error, "metrics": {}, "env": environment(None),
        "plugins": registry().versions(),  # the worker loads the same entry points as this process
    }
    write_record(job.record_path, record)
    return record


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class ProcessExecutor:
    """Run up to ``jobs`` cells at once, each in its own worker process (spawn)."""

    def __init__(self, jobs: int | None = None, timeout: float | None = None, threads: int | None = None):
        cpus = os.cpu_count() or 1
        self.jobs = cpus if jobs is None else jobs
        if not isinstance(self.jobs, int) or self.jobs < 1:
            raise UserError(f"executor 'process': jobs must be a positive integer, got {jobs!r}")
        if timeout is not None and timeout <= 0:
            raise UserError(f"executor 'process': timeout must be > 0 seconds, got {timeout!r}")
        self.timeout = timeout
        # Split the cores between the workers: N processes each using every core thrash.
        self.threads = threads or max(1, cpus // self.jobs)

    def run(self, jobs, on_done, on_start=None):
        ctx = mp.get_context("spawn")
        queue = iter(jobs)  # taken one at a time: the runner claims each cell as it is taken
        # Keyed by the parent's end of each pipe: it turns readable when the record arrives,
        # or at EOF when the worker dies without one. (Waiting on the process instead could
        # deadlock: a worker blocks sending a record larger than the pipe buffer.)
        running: dict = {}  # connection -> (job, process, start time, stamp of the record before)
        asking: dict = {}  # connection -> when its cell asked for the machine to itself
        holder = None  # the connection whose cell is timing alone now
        more = True
        try:
            while more or running:
                while more and len(running) < self.jobs and not asking and holder is None:
                    job = next(queue, None)
                    if job is None:
                        more = False
                        break
                    recv, send = ctx.Pipe()  # duplex: records and requests up, the go-ahead down
                    proc = ctx.Process(target=_worker, args=(job, send, self.threads, os.getpid()),
                                       name=f"cell-{job.cell}")
                    before = stamp(job.record_path)
                    proc.start()
                    send.close()  # only the child holds its end now
                    running[recv] = (job, proc, time.monotonic(), before)
                    if on_start:
                        on_start(job)
                if not running:
                    continue
                active = {c: v for c, v in running.items() if c not in asking}
                for conn in wait(list(running), timeout=self._next_deadline(active)):
                    message = self._receive(conn)
                    if message == _ASK:
                        asking[conn] = time.monotonic()
                        continue
                    if message == _DONE:
                        holder = None
                        continue
                    job, proc, _, before = running.pop(conn)
                    asking.pop(conn, None)
                    holder = None if holder is conn else holder
                    on_done(job, self._collect(job, proc, conn, message, before))
                if holder is None and asking and len(asking) == len(running):  # everyone else waits
                    holder = next(iter(asking))
                    job, proc, started, before = running[holder]
                    running[holder] = (job, proc, started + time.monotonic() - asking.pop(holder), before)
                    try:
                        holder.send(_GO)
                    except OSError:  # it died meanwhile: its end of file comes next
                        pass
                for conn, (job, proc, started, before) in list(running.items()):
                    if conn not in asking and self.timeout and time.monotonic() - started > self.timeout:
                        del running[conn]
                        holder = None if holder is conn else holder
                        _stop(proc, conn)
                        on_done(job, failed_record(job, f"TimeoutError: cell ran past {self.timeout:g} s; "
                                                        "its worker was killed", before))
        finally:  # interrupted: leave no orphan workers behind
            for conn, (job, proc, _, _) in running.items():
                _stop(proc, conn)

    def _next_deadline(self, running) -> float | None:
        if not self.timeout or not running:
            return None
        now = time.monotonic()
        return max(0.0, min(started + self.timeout - now for _, _, started, _ in running.values()))

    @staticmethod
    def _receive(conn):
        try:
            return conn.recv()
        except (EOFError, OSError):  # died before sending: segfault, OOM killer, os._exit
            return None

    @staticmethod
    def _collect(job: CellJob, proc, conn, record, before) -> dict:
        conn.close()
        proc.join()
        if isinstance(record, dict):
            return record
        if isinstance(record, tuple) and record[:1] == (_REFUSED,):
            raise UserError(record[1])  # as the local executor would: the other workers are stopped
        return failed_record(job, f"WorkerCrash: the worker process died ({_exit_reason(proc.exitcode)}) "
                                  "before the cell finished", before)


def _stop(proc, conn) -> None:
    proc.kill()
    proc.join()
    conn.close()
