"""Run a suite: expand cells, skip finished ones, execute the rest, write one record each.

A cell that raises (an exception, out of memory) gets a failed record and the run goes on.
A killed run leaves finished records intact; running again finishes the rest.
"""
from __future__ import annotations

import time
import traceback
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from . import claims, kernels, stages
from .errors import MetricUnavailable, UserError
from .plugins import registry
from .records import environment, inspect_record, warn, write_record
from .suite import CellConfig, Suite, select, validate_cell


@dataclass
class CellJob:
    """Everything needed to run one cell in another process or on another machine."""

    suite: str
    source: str
    cell: str
    label: str
    seed: int
    config: dict
    results_dir: str
    index: int = 0  # position in the suite, so tables keep the suite's order

    @property
    def record_path(self) -> Path:
        return Path(self.results_dir) / f"{self.cell}.json"

    @property
    def workdir(self) -> Path:
        return Path(self.results_dir) / self.cell


def _now() -> str:
    # milliseconds: a reader can tell whether a timing overlapped another cell of the run
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _metric_entry(metric, value) -> dict:
    entry = dict(value) if isinstance(value, dict) else {"value": value}
    if "value" not in entry:
        raise TypeError(f"metric {type(metric).__name__} returned a dict without 'value'")
    entry.setdefault("direction", getattr(metric, "direction", None))
    entry.setdefault("unit", getattr(metric, "unit", ""))
    entry.setdefault("role", metric_role(metric))
    return entry


def metric_role(metric) -> str:
    """"cost" or "quality", as the metric declares (see harness.hookspecs.harness_metrics)."""
    role = getattr(metric, "role", None) or "quality"
    if role not in ("cost", "quality"):
        raise TypeError(f"metric {type(metric).__name__} declares role {role!r}; expected 'cost' or 'quality'")
    return role


def _measure(metric, ctx, alone: Callable[[], AbstractContextManager] | None) -> dict:
    """One metric's record entry; a timing-sensitive one runs inside ``alone()`` and says
    whether it ran alone and when."""
    sensitive = bool(getattr(metric, "timing_sensitive", False))
    with (alone() if sensitive and alone is not None else nullcontext(None)) as ran_alone:
        started = _now()
        try:
            entry = _metric_entry(metric, metric(ctx))
        except MetricUnavailable as exc:
            return {"value": None, "status": "unavailable", "reason": str(exc),
                    "direction": getattr(metric, "direction", None), "unit": getattr(metric, "unit", ""),
                    "role": metric_role(metric)}
        finished = _now()
    if sensitive:
        entry["ran_alone"] = ran_alone
        entry["interval"] = [started, finished]
    return entry


def execute_cell(job: CellJob, alone: Callable[[], AbstractContextManager] | None = None) -> dict:
    """Run one cell in this process and write its record; never raises for a cell's own failure.

    ``alone`` is how the executor gives a timing-sensitive metric (latency) the machine to
    itself: a context manager factory, entered around that metric, whose value is recorded
    as the entry's ``ran_alone``: True when no other cell of the run ran meanwhile, False when
    some did, None (no ``alone`` given) when the executor cannot tell."""
    reg = registry()
    config = CellConfig.model_validate(job.config)
    record = {
        "suite": job.suite, "cell": job.cell, "label": job.label, "index": job.index, "seed": job.seed,
        "config": job.config, "status": "running", "error": None, "metrics": {},
        "env": {}, "plugins": reg.versions(), "started": _now(),
    }
    t0 = time.perf_counter()
    old_threads = torch.get_num_threads()
    device = None
    kernels_used: dict[str, list[str]] = {}
    try:
        with kernels.track() as kernels_used:  # which implementation each custom kernel ran
            from .context import CellContext

            if config.threads:
                torch.set_num_threads(config.threads)
            ctx = CellContext(job.suite, job.cell, job.seed, config, workdir=job.workdir, reg=reg)
            device = str(ctx.device)
            stages.run_stages(ctx, ctx.specs, reg.stages())
            for spec in config.metric_specs():
                metric = reg.create("metric", spec.name, **spec.options)
                record["metrics"][spec.name] = _measure(metric, ctx, alone)
            record.update(ctx.extra)
            record["status"] = "ok"
    except (Exception, MemoryError) as exc:  # one cell's failure is data, not a crash
        record["status"] = "failed"
        record["error"] = f"{type(exc).__name__}: {exc}".strip()
        record["traceback"] = traceback.format_exc(limit=20)
    finally:
        torch.set_num_threads(old_threads)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    # after the cell: libraries it imported lazily (diffusers, fvcore...) are loaded by now
    record["env"] = environment(device)
    record["env"]["kernels"] = kernels.describe(kernels_used)
    record["finished"] = _now()
    record["duration_s"] = round(time.perf_counter() - t0, 3)
    write_record(job.record_path, record)
    return record


def plan(suite: Suite, results_root: Path, only: str | None = None) -> list[CellJob]:
    """Validate every selected cell and turn it into a job (no work done)."""
    every = suite.cells()
    position = {cell.id: i for i, cell in enumerate(every)}  # in the whole suite, whatever --only picks
    jobs = []
    for cell in select(every, only, suite.source):
        validate_cell(suite, cell)
        jobs.append(CellJob(suite.name, suite.source, cell.id, cell.label, cell.seed, cell.config,
                            str(results_root / suite.name), index=position[cell.id]))
    return jobs


def check_builds(suite: Suite, jobs: list[CellJob]) -> None:
    """Build each distinct backbone on the meta device: options the factory rejects while
    constructing (a bad size, a patch that does not divide the input) fail here, before work."""
    from .context import CellContext

    seen = set()
    for job in jobs:
        raw = dict(job.config)
        # Structure only: weights (``pretrained``) are loaded by the cell itself, so a suite
        # for checkpoints this machine does not have still validates.
        raw["backbone"] = {k: v for k, v in raw["backbone"].items() if k != "pretrained"}
        config = CellConfig.model_validate(raw)
        key = repr(config.backbone.model_dump())
        if key in seen:
            continue
        seen.add(key)
        try:
            ctx = CellContext(job.suite, job.cell, job.seed, config)
            ctx.build_backbone(device="meta")
        except UserError as exc:
            raise UserError(f"{suite.source}: cell {job.label}: {exc}") from None
        except Exception as exc:
            raise UserError(f"{suite.source}: cell {job.label}: backbone does not build: "
                            f"{type(exc).__name__}: {exc}") from None


def missing_metrics(job: CellJob, record: dict) -> list[str]:
    """The metrics ``job`` asks for that ``record`` lacks (an unavailable one is recorded)."""
    asked = [m if isinstance(m, str) else m.get("name") for m in job.config.get("metrics", [])]
    return [m for m in asked if m not in record["metrics"]]


def is_done(job: CellJob, warn_about: bool = False) -> dict | None:
    """The cell's ok record with every metric it asks for, or None: then it has to run.
    With ``warn_about``, a record that is there but unusable is named on stderr."""
    rec, problem = inspect_record(job.record_path)
    if problem is not None:
        if warn_about:
            warn(job.record_path, problem, "the cell runs again")
        return None
    if rec is None or rec["status"] != "ok":
        return None
    missing = missing_metrics(job, rec)
    if missing:
        if warn_about:
            warn(job.record_path, f"status ok but metric(s) {', '.join(map(repr, missing))} missing",
                 "the cell runs again")
        return None
    return rec


def pending(jobs: list[CellJob], rerun: bool) -> tuple[list[CellJob], list[CellJob]]:
    """Split into (to run, already done)."""
    todo, done = [], []
    for job in jobs:
        (done if not rerun and is_done(job, warn_about=True) else todo).append(job)
    return todo, done


def run_jobs(jobs: list[CellJob], executor, on_start: Callable | None = None,
             on_done: Callable | None = None, on_skip: Callable | None = None, rerun: bool = False) -> list[dict]:
    """Run ``jobs`` through ``executor``, each cell under a claim (:mod:`harness.claims`).

    Cells are claimed one at a time as the executor takes them, so concurrent runs of one
    suite share the work. A cell claimed by another live run, or finished by one since
    ``pending`` looked (unless ``rerun``), is not run: ``on_skip(job, why, done)`` says so."""
    records: list[dict] = []
    held: dict[str, claims.Claim] = {}

    def claimed():
        for job in jobs:
            got = claims.claim(job.record_path)
            if not isinstance(got, claims.Claim):
                if on_skip:
                    on_skip(job, f"running elsewhere ({claims.describe(got)})", False)
                continue
            held[job.cell] = got
            if not rerun and is_done(job):
                held.pop(job.cell).release()
                if on_skip:
                    on_skip(job, "finished by another run", True)
                continue
            yield job

    def done(job, record):
        claim = held.pop(job.cell, None)
        if claim is not None:
            claim.release()
        records.append(record)
        if on_done:
            on_done(job, record)

    try:
        executor.run(claimed(), done, on_start=on_start)
    finally:  # interrupted: what is not finished is free for the next run
        for claim in held.values():
            claim.release()
    return records
