"""Run a suite: expand cells, skip finished ones, execute the rest, write one record each.

A cell that raises (an exception, out of memory) gets a failed record and the run goes on.
A killed run leaves finished records intact; running again finishes the rest.
"""
from __future__ import annotations

import time
import traceback
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from . import claims, kernels, published, stages
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
    """Run one cell in this process and write its record; never raises for a cell's own failure
    (except, under several ranks, one inside a stage every rank runs: see :func:`run_jobs`).

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
    shared = _Shared()
    try:
        with kernels.track() as kernels_used:  # which implementation each custom kernel ran
            from .context import CellContext

            if config.threads:
                torch.set_num_threads(config.threads)
            ctx = CellContext(job.suite, job.cell, job.seed, config, workdir=job.workdir, reg=reg)
            device = str(ctx.device)
            if _world() > 1:
                shared.run_stages(ctx, reg.stages())
            else:
                stages.run_stages(ctx, ctx.specs, reg.stages())
            for spec in config.metric_specs():
                metric = reg.create("metric", spec.name, **spec.options)
                entry = record["metrics"][spec.name] = _measure(metric, ctx, alone)
                if getattr(metric, "samples", False) and ctx.sampling_changes:
                    entry["sampling_changed_by"] = dict(ctx.sampling_changes)
            published.annotate(record["metrics"], config.published)  # the paper's figure beside ours
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
    if shared.fatal is not None:  # the other ranks cannot go on in step with this one
        raise RuntimeError(f"cell {job.cell} failed inside a stage every rank runs ({record['error']}); its record "
                           f"is written, and the run stops: rerun it to resume") from shared.fatal
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
        record = None if rerun else is_done(job, warn_about=True)
        if record is not None and published.refresh(record, job.config):
            write_record(job.record_path, record)  # a published figure changed: re-annotated, not rerun
        (done if record is not None else todo).append(job)
    return todo, done


def run_jobs(jobs: list[CellJob], executor, on_start: Callable | None = None,
             on_done: Callable | None = None, on_skip: Callable | None = None, rerun: bool = False) -> list[dict]:
    """Run ``jobs`` through ``executor``, each cell under a claim (:mod:`harness.claims`).

    Cells are claimed one at a time as the executor takes them, so concurrent runs of one
    suite share the work. A cell claimed by another live run, or finished by one since
    ``pending`` looked (unless ``rerun``), is not run: ``on_skip(job, why, done)`` says so.

    Launched by torchrun (``WORLD_SIZE`` > 1), every rank calls this: rank 0 claims, decides,
    runs the cells and writes the records in this process (the executor is not used), and
    the other ranks join each cell that has a stage sharing its work over ranks (``every_rank``,
    the ``sample`` stage), see :func:`follow_jobs`."""
    rank, world, _ = launched_ranks()
    if world > 1:
        with process_group():
            if rank != 0:
                follow_jobs()
                return []
            # An exception here ends this process, and torchrun then stops the others: telling them
            # first could meet a rank inside a collective of the sample stage and hang both.
            records = _run_claimed(jobs, _RankZero(), on_start, on_done, on_skip, rerun)
            broadcast_json({"job": None})  # the others stop waiting for cells
            return records
    return _run_claimed(jobs, executor, on_start, on_done, on_skip, rerun)


def _run_claimed(jobs, executor, on_start, on_done, on_skip, rerun) -> list[dict]:
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


# -- several ranks: torchrun (or srun) launches `harness run` once per GPU -------------------------
# A collective waits for the slowest rank: rank 0 may train or prune for hours while the others
# wait for its weights, so the group's timeout is long (HARNESS_DIST_TIMEOUT, seconds).
DIST_TIMEOUT_S = 48 * 3600


def launched_ranks() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them (RANK, WORLD_SIZE, LOCAL_RANK);
    (0, 1, 0) for a plain process."""
    import os

    env = os.environ
    return int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0"))


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@contextmanager
def process_group():
    """The launch's torch.distributed group (NCCL with GPUs, one per local rank; else gloo),
    started here unless one is running already, and ended on the way out."""
    import os
    from datetime import timedelta

    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    _, _, local = launched_ranks()
    cuda = torch.cuda.is_available()
    if cuda:  # "cuda" in a cell then means this rank's own GPU
        torch.cuda.set_device(local)
    timeout = timedelta(seconds=float(os.environ.get("HARNESS_DIST_TIMEOUT", DIST_TIMEOUT_S)))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _collective_device() -> torch.device:
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def broadcast_json(value=None):
    """``value`` (JSON) from rank 0 to every rank; what rank 0 sent on the others."""
    import json

    import torch.distributed as dist

    device = _collective_device()
    data = json.dumps(value).encode() if dist.get_rank() == 0 else b""
    size = torch.tensor([len(data)], dtype=torch.long, device=device)
    dist.broadcast(size, 0)
    buf = (torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device) if dist.get_rank() == 0
           else torch.empty(int(size.item()), dtype=torch.uint8, device=device))
    dist.broadcast(buf, 0)
    return json.loads(bytes(buf.cpu().numpy()).decode())


def structure(module: torch.nn.Module | None) -> list | None:
    """What must agree for rank 0's weights to fit: each parameter's and buffer's name, shape, dtype."""
    if module is None:
        return None
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    return [[n, list(t.shape), str(t.dtype).replace("torch.", "")] for n, t in named]


def broadcast_weights(module: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers onto ``module`` on every rank, in place."""
    import torch.distributed as dist

    device = _collective_device()
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            if t.device == device:
                dist.broadcast(t.data, 0)
            else:  # NCCL moves CUDA tensors only: through this rank's GPU and back
                tmp = t.data.to(device)
                dist.broadcast(tmp, 0)
                t.data.copy_(tmp)


def _split(ctx, registered: dict) -> tuple[list[str], list[str]]:
    """The cell's stages: (those before its first every-rank stage, that one and those after)."""
    names = stages.order(registered, ctx.specs)
    first = next((i for i, n in enumerate(names) if registered[n].every_rank), len(names))
    return names[:first], names[first:]


def needs_ranks(job: CellJob) -> bool:
    """Whether the cell has a stage that shares its work over ranks (the others join it)."""
    try:
        config = CellConfig.model_validate(job.config)
        registered = registry().stages()
        specs = {n: registered[n].schema.model_validate(b) for n, b in config.blocks.items() if n in registered}
        return any(registered[n].every_rank for n in stages.order(registered, specs))
    except Exception:  # a bad block: rank 0 alone runs the cell and records why it fails
        return False


class _Shared:
    """Rank 0's side of a cell run by several ranks."""

    fatal: BaseException | None = None

    def run_stages(self, ctx, registered: dict) -> None:
        before, rest = _split(ctx, registered)
        if not rest:  # nothing every rank runs: the others were not told of this cell
            stages.run_stages(ctx, ctx.specs, registered)
            return
        try:
            for name in before:
                registered[name].run(ctx, ctx.specs[name])
        except BaseException:
            broadcast_json({"ok": False})
            raise
        applied = [[n, ctx.extra.get(n, {}).get("apply")] for n in before
                   if registered[n].apply is not None and isinstance(ctx.extra.get(n), dict)]
        broadcast_json({"ok": True, "applied": [a for a in applied if a[1] is not None],
                        "model": structure(ctx.model), "teacher": structure(ctx.teacher)})
        broadcast_weights(ctx.model)
        if ctx.teacher is not None:
            broadcast_weights(ctx.teacher)
        ctx.extra["ranks"] = {"world_size": _world(), "stages_on_rank_0": before}
        try:
            for name in rest:
                registered[name].run(ctx, ctx.specs[name])
        except BaseException as exc:
            self.fatal = exc
            raise


def follow_cell(job: CellJob) -> None:
    """A rank other than 0 in one cell: the structure of the stages before the every-rank one
    through their ``apply``, rank 0's weights, then the every-rank stages; no metric, no record.
    A failure here is not the cell's but the run's: it propagates and torchrun stops every rank."""
    from .context import CellContext

    reg = registry()
    registered = reg.stages()
    config = CellConfig.model_validate(job.config)
    if config.threads:
        torch.set_num_threads(config.threads)
    ctx = CellContext(job.suite, job.cell, job.seed, config, workdir=job.workdir, reg=reg)
    before, rest = _split(ctx, registered)
    got = broadcast_json()
    if not got["ok"]:  # rank 0 failed before: its record says why
        return
    model = ctx.build_backbone()
    for name, value in got["applied"]:
        registered[name].apply(model, value)
    teacher = ctx.build_backbone() if got["teacher"] is not None else None
    if structure(model) != got["model"] or structure(teacher) != got["teacher"]:
        # a stage changed the structure without an apply to rebuild it: run them here too
        for name in before:
            registered[name].run(ctx, ctx.specs[name])
        model, teacher = ctx.model, ctx.teacher
        if structure(model) != got["model"] or structure(teacher) != got["teacher"]:
            raise RuntimeError(f"cell {job.cell}: rank {_rank()} built a model unlike rank 0's after running "
                               f"{', '.join(before)}; the stages are not deterministic in structure")
    broadcast_weights(model)
    if teacher is not None:
        broadcast_weights(teacher)
    ctx.model, ctx.teacher = model, teacher
    for name in rest:
        registered[name].run(ctx, ctx.specs[name])


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def follow_jobs() -> None:
    """Ranks other than 0: join each cell rank 0 announces, until it says there are no more."""
    while True:
        got = broadcast_json()
        if got["job"] is None:
            return
        follow_cell(CellJob(**got["job"]))


def execute_cell_on_ranks(job: CellJob, alone: Callable[[], AbstractContextManager] | None = None) -> dict | None:
    """One cell on every rank of a launch whose environment names the ranks (``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``...: what each task of a multi-task Slurm job runs, see
    harness_exec): rank 0 runs it as :func:`execute_cell` and returns the record, the other
    ranks join its every-rank stages and return None."""
    from dataclasses import asdict

    rank, world, _ = launched_ranks()
    if world < 2:
        return execute_cell(job, alone)
    with process_group():
        if rank != 0:
            follow_jobs()
            return None
        if needs_ranks(job):
            broadcast_json({"job": asdict(job)})
        record = execute_cell(job, alone)  # raises (ending every task) only when the ranks are out of step
        broadcast_json({"job": None})
        return record


class _RankZero:
    """Rank 0's executor: cells in this process, one after the other; a cell the other ranks
    join is announced to them first."""

    def run(self, jobs, on_done, on_start=None):
        from dataclasses import asdict

        for job in jobs:
            if on_start:
                on_start(job)
            if needs_ranks(job):
                broadcast_json({"job": asdict(job)})
            on_done(job, execute_cell(job))
