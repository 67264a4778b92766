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
import time
from contextlib import contextmanager
from multiprocessing.connection import wait

from harness.errors import UserError
from harness.plugins import registry
from harness.records import environment, write_record
from harness.runner import CellJob, execute_cell


# Messages of the worker's pipe besides the final record (a dict).
_ASK, _GO, _DONE = "alone?", "alone", "alone-done"


def _worker(job: CellJob, conn, threads: int) -> None:
    """Child side: run one cell and send its record back (it is also on disk)."""
    import torch

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
    finally:
        conn.close()


def failed_record(job: CellJob, error: str) -> dict:
    """The record of a cell whose worker never reported back; written by the parent."""
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
        queue = list(jobs)
        # Keyed by the parent's end of each pipe: it turns readable when the record arrives,
        # or at EOF when the worker dies without one. (Waiting on the process instead could
        # deadlock: a worker blocks sending a record larger than the pipe buffer.)
        running: dict = {}  # connection -> (job, process, start time)
        asking: dict = {}  # connection -> when its cell asked for the machine to itself
        holder = None  # the connection whose cell is timing alone now
        try:
            while queue or running:
                while queue and len(running) < self.jobs and not asking and holder is None:
                    job = queue.pop(0)
                    recv, send = ctx.Pipe()  # duplex: records and requests up, the go-ahead down
                    proc = ctx.Process(target=_worker, args=(job, send, self.threads), name=f"cell-{job.cell}")
                    proc.start()
                    send.close()  # only the child holds its end now
                    running[recv] = (job, proc, time.monotonic())
                    if on_start:
                        on_start(job)
                active = {c: v for c, v in running.items() if c not in asking}
                for conn in wait(list(running), timeout=self._next_deadline(active)):
                    message = self._receive(conn)
                    if message == _ASK:
                        asking[conn] = time.monotonic()
                        continue
                    if message == _DONE:
                        holder = None
                        continue
                    job, proc, _ = running.pop(conn)
                    asking.pop(conn, None)
                    holder = None if holder is conn else holder
                    on_done(job, self._collect(job, proc, conn, message))
                if holder is None and asking and len(asking) == len(running):  # everyone else waits
                    holder = next(iter(asking))
                    job, proc, started = running[holder]
                    running[holder] = (job, proc, started + time.monotonic() - asking.pop(holder))
                    try:
                        holder.send(_GO)
                    except OSError:  # it died meanwhile: its end of file comes next
                        pass
                for conn, (job, proc, started) in list(running.items()):
                    if conn not in asking and self.timeout and time.monotonic() - started > self.timeout:
                        del running[conn]
                        holder = None if holder is conn else holder
                        _stop(proc, conn)
                        on_done(job, failed_record(job, f"TimeoutError: cell ran past {self.timeout:g} s; "
                                                        "its worker was killed"))
        finally:  # interrupted: leave no orphan workers behind
            for conn, (job, proc, _) in running.items():
                _stop(proc, conn)

    def _next_deadline(self, running) -> float | None:
        if not self.timeout or not running:
            return None
        now = time.monotonic()
        return max(0.0, min(started + self.timeout - now for _, _, started in running.values()))

    @staticmethod
    def _receive(conn):
        try:
            return conn.recv()
        except (EOFError, OSError):  # died before sending: segfault, OOM killer, os._exit
            return None

    @staticmethod
    def _collect(job: CellJob, proc, conn, record) -> dict:
        conn.close()
        proc.join()
        if isinstance(record, dict):
            return record
        return failed_record(job, f"WorkerCrash: the worker process died ({_exit_reason(proc.exitcode)}) "
                                  "before the cell finished")


def _stop(proc, conn) -> None:
    proc.kill()
    proc.join()
    conn.close()
