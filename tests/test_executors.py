"""The process and submitit executors: same records as the local one, failures stay local."""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import harness
from harness.cli import main
from harness.records import load_records, read_record, write_record
from conftest import make_dist, pip_install_target

SUITE = """\
suite: execs
seed: 0
base:
  backbone: {name: toy, width: 4}
  metrics: [params, gflops]
  device: cpu
matrix:
  backbone.width: [2, 4, 8]
"""

# A plugin whose backbone takes its worker process down with it, as a segfault or the
# OOM killer would: no exception, no record from the child.
CRASHY = '''
import os
import harness
from torch import nn


class Crashy(nn.Module):
    def __init__(self, exit_code):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.exit_code = exit_code

    def forward(self, x, t, y=None):
        os._exit(self.exit_code)


def crashy(*, input_size: int = 8, in_channels: int = 3, num_classes: int = 10, context_dim: int = 0,
           exit_code: int = 3):
    """A backbone whose forward kills its process."""
    return Crashy(exit_code)


@harness.hookimpl
def harness_backbones():
    return {"crashy": crashy}
'''


def _suite(tmp_path, text=SUITE):
    path = tmp_path / "execs.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def _by_width(results):
    return {r["config"]["backbone"]["width"]: r for r in load_records(results / "execs")}


@pytest.fixture(scope="module")
def crashy_site(tmp_path_factory):
    src = make_dist(tmp_path_factory.mktemp("crashy-src"), "harness-crashy", "harness_crashy", CRASHY)
    return pip_install_target(src, tmp_path_factory.mktemp("site-crashy"))


@pytest.mark.slow
def test_process_executor_matches_local_records(tmp_path, plugin_site, with_site):
    with_site(plugin_site)
    local, proc = tmp_path / "local", tmp_path / "proc"
    suite = _suite(tmp_path, SUITE.replace("[2, 4, 8]", "[2, 8]"))
    assert main(["run", str(suite), "--results", str(local)]) == 0
    assert main(["run", str(suite), "--results", str(proc), "--executor", "process", "--jobs", "2"]) == 0
    a, b = _by_width(local), _by_width(proc)
    assert sorted(a) == sorted(b) == [2, 8]
    for width in a:  # same cell ids, same figures, whichever executor ran them
        assert a[width]["cell"] == b[width]["cell"]
        assert a[width]["metrics"]["params"]["value"] == b[width]["metrics"]["params"]["value"]
        assert a[width]["metrics"]["gflops"]["value"] == b[width]["metrics"]["gflops"]["value"]
    assert b[2]["env"]["threads"] == max(1, (__import__("os").cpu_count() or 1) // 2)
    assert b[2]["plugins"]["toy"] == "harness-toy 0.3.1"  # the worker loaded the same plugins


@pytest.mark.slow
def test_process_worker_crash_is_a_failed_record(tmp_path, plugin_site, crashy_site, with_site):
    with_site(plugin_site)
    with_site(crashy_site)
    text = SUITE.replace("[2, 4, 8]", "[2]") + "include:\n  - {backbone: {name: crashy}}\n"
    # crashy dies while it holds the machine for latency: the other cell's latency still gets it
    text = text.replace("[params, gflops]", "[params, {name: latency, warmup: 1, min_runs: 2, min_time: 0}, gflops]")
    results = tmp_path / "r"
    assert main(["run", str(_suite(tmp_path, text)), "--results", str(results), "--executor", "process",
                 "--jobs", "2"]) == 1
    records = load_records(results / "execs")
    failed = [r for r in records if r["status"] == "failed"]
    assert len(records) == 2 and len(failed) == 1
    assert failed[0]["config"]["backbone"]["name"] == "crashy"
    assert "worker process died (exit code 3)" in failed[0]["error"]
    [ok] = [r for r in records if r["status"] == "ok"]
    assert ok["metrics"]["latency"]["ran_alone"] is True
    # a rerun retries only the failed cell
    assert main(["run", str(_suite(tmp_path, text)), "--results", str(results), "--executor", "process"]) == 1


TIMED = """\
suite: execs
seed: 0
base:
  backbone: {name: toy, width: 4, sleep: 0.1}
  metrics: [params, {name: latency, warmup: 1, min_runs: 3, min_time: 0}]
  device: cpu
include:
  - {backbone.sleep: 2, metrics: [params, gflops]}
"""


@pytest.mark.slow
def test_process_executor_times_latency_with_no_other_cell_running(tmp_path, plugin_site, with_site):
    """Two workers: the latency cell is first in line, beside a cell whose forward sleeps 2 s
    (in gflops' trace). Started together, they would overlap; latency waits for it instead."""
    from datetime import datetime

    with_site(plugin_site)
    results = tmp_path / "r"
    assert main(["run", str(_suite(tmp_path, TIMED)), "--results", str(results), "--executor", "process",
                 "--jobs", "2"]) == 0
    timed, other = sorted(load_records(results / "execs"), key=lambda r: "gflops" in r["metrics"])
    lat = timed["metrics"]["latency"]
    assert lat["ran_alone"] is True and lat["runs"] == 3
    start, end = (datetime.fromisoformat(t) for t in lat["interval"])
    other_start, other_end = (datetime.fromisoformat(other[k]) for k in ("started", "finished"))
    assert start < end and (end <= other_start or start >= other_end)
    assert "ran_alone" not in other["metrics"]["gflops"]  # only timing-sensitive metrics wait


def test_process_timeout_kills_the_worker(tmp_path, plugin_site, with_site):
    with_site(plugin_site)
    text = SUITE.replace("backbone.width: [2, 4, 8]", "backbone.sleep: [600]")
    executor = harness.create("executor", "process", jobs=1, timeout=3)
    from harness.runner import plan, run_jobs
    from harness.suite import load_suite

    jobs = plan(load_suite(_suite(tmp_path, text)), tmp_path / "r")
    t0 = time.monotonic()
    [record] = run_jobs(jobs, executor)
    assert time.monotonic() - t0 < 120  # killed at the timeout, not left to sleep for 600 s
    assert record["status"] == "failed" and "ran past 3 s" in record["error"]
    assert load_records(tmp_path / "r")[0]["status"] == "failed"  # on disk too


def test_executor_options_are_checked():
    with pytest.raises(harness.UserError, match="jobs must be a positive integer"):
        harness.create("executor", "process", jobs=0)
    with pytest.raises(harness.UserError, match="unknown cluster 'slrum'; did you mean 'slurm'"):
        harness.create("executor", "submitit", cluster="slrum")
    with pytest.raises(harness.UserError, match="partitionn"):
        harness.create("executor", "submitit", cluster="local", partitionn="gpu")
    ex = harness.create("executor", "submitit", cluster="local", slurm_partition="gpu", jobs=3)
    assert ex.parameters["slurm_partition"] == "gpu" and ex.parameters["slurm_array_parallelism"] == 3


@pytest.mark.slow
def test_submitit_local_runs_each_cell_as_a_job(tmp_path, plugin_site, with_site):
    with_site(plugin_site)
    text = SUITE.replace("[2, 4, 8]", "[2, 8]") + "executor: {name: submitit, cluster: local, poll: 0.2, timeout_min: 10}\n"
    text = text.replace("[params, gflops]", "[params, gflops, {name: latency, warmup: 0, min_runs: 1, min_time: 0}]")
    results = tmp_path / "r"
    assert main(["run", str(_suite(tmp_path, text)), "--results", str(results)]) == 0
    records = _by_width(results)
    assert sorted(records) == [2, 8] and {r["status"] for r in records.values()} == {"ok"}
    # jobs of an array may share a node: whether the timing ran alone is unknown, and says so
    assert [r["metrics"]["latency"]["ran_alone"] for r in records.values()] == [None, None]
    logs = results / "execs" / "submitit"
    assert len(list(logs.glob("*_log.out"))) == 2  # one submitit job (and log) per cell
    # resumable like any run: nothing left to submit
    assert main(["run", str(_suite(tmp_path, text)), "--results", str(results)]) == 0
    assert len(list(logs.glob("*_log.out"))) == 2


@pytest.mark.slow
def test_submitit_interrupt_cancels_pending_jobs(tmp_path, plugin_site, with_site, monkeypatch):
    with_site(plugin_site)
    from harness.runner import plan
    from harness.suite import load_suite
    from harness_exec import slurm

    text = SUITE.replace("backbone.width: [2, 4, 8]", "backbone.sleep: [600]")
    jobs = plan(load_suite(_suite(tmp_path, text)), tmp_path / "r")
    executor = harness.create("executor", "submitit", cluster="local", poll=0.1)
    submitted = []
    make = executor._executor

    def capturing(folder):
        inner = make(folder)
        real = inner.map_array
        inner.map_array = lambda fn, items: submitted.extend(real(fn, items)) or submitted
        return inner

    def interrupt(seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(executor, "_executor", capturing)
    monkeypatch.setattr(slurm.time, "sleep", interrupt)  # Ctrl-C while waiting for the jobs
    with pytest.raises(KeyboardInterrupt):
        executor.run(jobs, lambda job, record: None)
    monkeypatch.undo()
    assert len(submitted) == 1
    deadline = time.monotonic() + 60
    while not submitted[0].done() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert submitted[0].done()  # stopped well before its 600 s of sleep
    assert not jobs[0].record_path.exists()


def _children(pid: int) -> list[int]:
    """Live child processes of ``pid`` (from /proc: no psutil here)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie stays where pid 1 does not reap)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the workers through /proc")
def test_sigterm_stops_the_process_executor_like_ctrl_c(tmp_path, plugin_site, with_site):
    with_site(plugin_site)
    text = SUITE.replace("backbone.width: [2, 4, 8]", "backbone.sleep: [600, 601]")
    results = tmp_path / "r"
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "run", str(_suite(tmp_path, text)), "--results",
                             str(results), "--executor", "process", "--jobs", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    workers: list[int] = []
    while time.monotonic() < deadline and len(workers) < 2:
        time.sleep(0.1)
        workers = [p for p in _children(proc.pid)
                   if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert len(workers) == 2
    time.sleep(3)  # let them get into their cells
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "harness: terminated; finished cells are kept" in err, (out, err)
    for pid in workers:  # ended by the parent, not left to finish and write records
        assert not _running(pid)
    time.sleep(1)
    assert not list((results / "execs").glob("*.json")) and not list((results / "execs").glob("*.claim"))


def test_parent_keeps_an_ok_record_its_worker_wrote_before_dying(tmp_path):
    from harness.runner import CellJob
    from harness_exec.process import failed_record, stamp

    job = CellJob("s", "s.yaml", "abc123", "base", 0, {"backbone": {"name": "toy"}, "metrics": ["params"]},
                  str(tmp_path))
    ok = {"suite": "s", "cell": "abc123", "config": job.config, "status": "ok", "error": None,
          "metrics": {"params": {"value": 3}}, "env": {}, "plugins": {}}
    before = stamp(job.record_path)  # no record when the worker started
    write_record(job.record_path, ok)  # the worker wrote it, then was killed (timeout) or crashed
    assert failed_record(job, "TimeoutError: ...", before) == ok
    assert read_record(job.record_path) == ok
    # an ok record from an earlier run (`--rerun`) is not this worker's: the failure replaces it
    rec = failed_record(job, "WorkerCrash: ...", stamp(job.record_path))
    assert rec["status"] == "failed" and read_record(job.record_path)["status"] == "failed"


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the workers through /proc")
def test_workers_end_when_their_parent_is_killed(tmp_path, plugin_site, with_site):
    """SIGKILL cannot be handled; the workers notice and stop, so none writes a record for a
    cell whose claim died with the parent."""
    with_site(plugin_site)
    text = SUITE.replace("backbone.width: [2, 4, 8]", "backbone.sleep: [600]")
    results = tmp_path / "r"
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "run", str(_suite(tmp_path, text)), "--results",
                             str(results), "--executor", "process"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    workers: list[int] = []
    while time.monotonic() < deadline and not workers:
        time.sleep(0.1)
        workers = [p for p in _children(proc.pid) if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert workers
    time.sleep(3)
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _running(workers[0]):
        time.sleep(0.2)
    assert not _running(workers[0])
    assert not list((results / "execs").glob("*.json"))
