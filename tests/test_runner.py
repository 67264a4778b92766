"""The runner: records, failures that stay local, resume after a kill, atomic writes."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from harness.cli import main
from harness.records import load_records, read_record, write_record

SUITE = """\
suite: toys
seed: 0
base:
  backbone: {name: toy, width: 4}
  metrics: [params, gflops, {name: latency, warmup: 1, min_runs: 2, min_time: 0}]
  device: cpu
matrix:
  backbone.width: [2, 4, 8]
"""


def suite_file(tmp_path, text=SUITE):
    path = tmp_path / "toys.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_run_writes_one_complete_record_per_cell(tmp_path, plugin_site, with_site, capsys):
    with_site(plugin_site)
    results = tmp_path / "results"
    assert main(["run", str(suite_file(tmp_path)), "--results", str(results)]) == 0
    out = capsys.readouterr().out
    records = load_records(results / "toys")
    assert len(records) == 3 and {r["status"] for r in records} == {"ok"}
    rec = records[0]
    for key in ("suite", "cell", "config", "status", "error", "metrics", "env", "plugins"):
        assert key in rec
    assert rec["config"]["backbone"]["name"] == "toy"  # same shape as the suite's base
    assert rec["plugins"]["toy"] == "harness-toy 0.3.1"
    assert rec["env"]["torch"] and rec["env"]["threads"] >= 1 and rec["env"]["device"] == "cpu"
    lat = rec["metrics"]["latency"]
    assert lat["unit"] == "ms" and lat["direction"] == "lower" and lat["runs"] >= 2
    assert {"batch_size", "dtype", "threads", "device", "iqr"} <= set(lat)
    assert len(lat["load_average"]) == 2 and all(v is None or v >= 0 for v in lat["load_average"])
    assert lat["cpu_count"] >= 1
    by_width = {r["config"]["backbone"]["width"]: r["metrics"]["params"]["value"] for r in records}
    assert by_width[2] < by_width[4] < by_width[8]
    assert "| cell" in out and "params ↓" in out  # the table closes the run


def test_failing_and_oom_cells_are_recorded_and_others_run(tmp_path, plugin_site, with_site, capsys):
    with_site(plugin_site)
    text = SUITE.replace("backbone.width: [2, 4, 8]", "backbone.fail: [false, true]\n  backbone.oom: [false, true]")
    results = tmp_path / "results"
    assert main(["run", str(suite_file(tmp_path, text)), "--results", str(results)]) == 1
    records = {(r["config"]["backbone"]["fail"], r["config"]["backbone"]["oom"]): r
               for r in load_records(results)}
    assert records[(False, False)]["status"] == "ok"
    assert records[(True, False)]["status"] == "failed"
    assert "toy failure requested" in records[(True, False)]["error"]
    assert records[(False, True)]["error"].startswith("OutOfMemoryError")
    assert "Traceback" in records[(False, True)]["traceback"]
    out = capsys.readouterr().out
    assert "3 cell(s) failed" in out


def test_rerun_skips_ok_cells_and_retries_failed(tmp_path, plugin_site, with_site, capsys):
    with_site(plugin_site)
    path = suite_file(tmp_path)
    results = tmp_path / "results"
    assert main(["run", str(path), "--results", str(results), "--only", "backbone.width=2"]) == 0
    first = {r["cell"]: r["started"] for r in load_records(results)}
    assert len(first) == 1
    time.sleep(1.1)  # record timestamps have one-second resolution
    assert main(["run", str(path), "--results", str(results)]) == 0
    again = {r["cell"]: r["started"] for r in load_records(results)}
    assert len(again) == 3 and all(again[c] == s for c, s in first.items())
    assert "1 already done, 2 to run" in capsys.readouterr().out
    assert main(["run", str(path), "--results", str(results), "--rerun"]) == 0
    assert all(r["started"] != first.get(r["cell"]) for r in load_records(results) if r["cell"] in first)


def test_killed_run_resumes_without_redoing(tmp_path, plugin_site, with_site):
    with_site(plugin_site)
    text = SUITE.replace("{name: toy, width: 4}", "{name: toy, width: 4, sleep: 0.3}").replace(
        "metrics: [params, gflops, {name: latency, warmup: 1, min_runs: 2, min_time: 0}]",
        "metrics: [{name: latency, warmup: 1, min_runs: 3, min_time: 0}]")
    path = suite_file(tmp_path, text)
    results = tmp_path / "results"
    cmd = [sys.executable, "-m", "harness.cli", "run", str(path), "--results", str(results)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not list((results / "toys").glob("*.json")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {r["cell"]: r["started"] for r in load_records(results)}
    assert 1 <= len(finished) < 3, "the kill should land between cells"
    assert not list((results / "toys").glob(".*.tmp"))  # no half-written record
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"{len(finished)} already done, {3 - len(finished)} to run" in done.stdout
    after = {r["cell"]: r["started"] for r in load_records(results)}
    assert len(after) == 3 and all(after[c] == s for c, s in finished.items())


def test_unavailable_metric_is_recorded_not_invented(tmp_path, plugin_site, with_site, capsys):
    with_site(plugin_site)
    text = SUITE.replace("metrics: [params, gflops, {name: latency, warmup: 1, min_runs: 2, min_time: 0}]",
                         "metrics: [params, {name: toy_constant, unavailable: true}]")
    results = tmp_path / "results"
    assert main(["run", str(suite_file(tmp_path, text)), "--results", str(results), "--only", "*width=2"]) == 0
    (rec,) = load_records(results)
    entry = rec["metrics"]["toy_constant"]
    assert entry["value"] is None and entry["status"] == "unavailable" and "weights" in entry["reason"]
    assert "n/a (toy metric needs weights" in capsys.readouterr().out


def test_write_record_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "cell.json"
    good = {"suite": "s", "cell": "c", "config": {}, "status": "ok", "error": None, "metrics": {},
            "env": {}, "plugins": {}}
    write_record(path, good)

    def broken_fsync(fd):  # half a record written, then the device fails
        os.write(fd, b'{"suite": "s", "cel')
        raise OSError("I/O error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        write_record(path, dict(good, status="failed"))
    assert read_record(path)["status"] == "ok"
    assert [p.name for p in tmp_path.iterdir()] == ["cell.json"]


def test_seeds_reproduce_and_separate_cells(tmp_path):
    from harness.context import CellContext
    from harness.suite import CellConfig

    cfg = CellConfig.model_validate({"backbone": {"name": "dit", "size": "tiny", "input_size": 8},
                                     "metrics": ["params"], "device": "cpu"})
    a1, a2 = CellContext("s", "a", 0, cfg), CellContext("s", "a", 0, cfg)
    b = CellContext("s", "b", 0, cfg)
    assert a1.seed("init") == a2.seed("init") != b.seed("init")
    assert a1.seed("data", shared=True) == b.seed("data", shared=True)
    w1 = a1.build_backbone().blocks[0].attn.qkv.weight
    w2 = a2.build_backbone().blocks[0].attn.qkv.weight
    assert (w1 == w2).all()


def test_records_come_back_in_suite_order(tmp_path, plugin_site, with_site):
    with_site(plugin_site)
    results = tmp_path / "results"
    text = SUITE.replace("[2, 4, 8]", "[8, 2, 4, 16, 1]").replace(
        "[params, gflops, {name: latency, warmup: 1, min_runs: 2, min_time: 0}]", "[params]")
    assert main(["run", str(suite_file(tmp_path, text)), "--results", str(results)]) == 0
    assert [r["config"]["backbone"]["width"] for r in load_records(results)] == [8, 2, 4, 16, 1]


def test_seed_option_runs_a_replicate_beside_the_first(tmp_path, plugin_site, with_site, capsys):
    with_site(plugin_site)
    results = tmp_path / "results"
    text = SUITE.replace("[2, 4, 8]", "[2, 4]").replace(
        "[params, gflops, {name: latency, warmup: 1, min_runs: 2, min_time: 0}]", "[params]")
    path = suite_file(tmp_path, text)
    assert main(["run", str(path), "--results", str(results)]) == 0
    assert main(["run", str(path), "--results", str(results), "--seed", "3"]) == 0
    records = load_records(results / "toys")
    assert sorted(r["seed"] for r in records) == [0, 0, 3, 3] and len({r["cell"] for r in records}) == 4
    capsys.readouterr()
    assert main(["table", str(results / "toys"), "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("label,seed,")
    assert main(["run", str(path), "--results", str(results), "--seed", "-1"]) == 2
    assert "--seed -1: expected an integer >= 0" in capsys.readouterr().err


def test_only_keeps_each_cells_position_in_the_suite(tmp_path, plugin_site, with_site):
    with_site(plugin_site)
    results = tmp_path / "results"
    text = SUITE.replace("[2, 4, 8]", "[8, 2, 4]").replace(
        "[params, gflops, {name: latency, warmup: 1, min_runs: 2, min_time: 0}]", "[params]")
    path = suite_file(tmp_path, text)
    assert main(["run", str(path), "--results", str(results), "--only", "*width=4*"]) == 0
    assert main(["run", str(path), "--results", str(results), "--seed", "1", "--only", "*width=8*"]) == 0
    assert main(["run", str(path), "--results", str(results)]) == 0
    rows = [(r["config"]["backbone"]["width"], r["seed"]) for r in load_records(results)]
    assert [r["index"] for r in load_records(results)] == [0, 0, 1, 2]
    assert rows == [(8, 0), (8, 1), (2, 0), (4, 0)]


def test_env_lists_the_libraries_a_cell_imported_while_it_ran(tmp_path):
    """diffusers is imported by the unet backbone, inside the cell: env still has its version.
    fvcore, which no count uses any more (harness.flops counts at PyTorch's dispatcher), is absent."""
    from importlib import metadata

    script = textwrap.dedent("""
        import json, sys
        from harness.runner import CellJob, execute_cell
        assert "diffusers" not in sys.modules and "fvcore" not in sys.modules
        config = {"backbone": {"name": "unet", "preset": "sd-tiny"}, "metrics": ["gflops"], "device": "cpu"}
        print(json.dumps(execute_cell(CellJob("t", "t.yaml", "c", "c", 0, config, sys.argv[1]))["env"]))
    """)
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    env = json.loads(done.stdout.splitlines()[-1])
    assert env["diffusers"] == metadata.version("diffusers") and "fvcore" not in env
    assert env["libraries"]["diffusers"] == env["diffusers"] and env["libraries"]["torch"] == metadata.version("torch")
    assert env["kernels"] == {}  # attention: no custom kernel ran


@pytest.mark.parametrize("native", [True, False])
def test_env_kernels_names_the_selective_scan_that_ran(tmp_path, monkeypatch, native):
    from harness.runner import CellJob, execute_cell
    from harness_mixers import _native

    if native and not _native.load():
        pytest.skip("no C++ compiler here: the compiled scan is not built")
    monkeypatch.setenv("HARNESS_NATIVE_SCAN", "1" if native else "0")  # 0: the switch to the fallback
    _native.load.cache_clear()
    config = {"backbone": {"name": "dit", "size": "tiny", "depth": 1, "input_size": 8, "mixer": "mamba"},
              "metrics": ["params", {"name": "latency", "warmup": 0, "min_runs": 1, "min_time": 0}],
              "device": "cpu"}
    try:
        record = execute_cell(CellJob("t", "t.yaml", "c", "c", 0, config, str(tmp_path)))
    finally:
        _native.load.cache_clear()
    impl = "compiled-cpu" if native else "pytorch"
    assert record["status"] == "ok", record["error"]
    assert record["env"]["kernels"] == {"selective_scan": impl}
    assert record["metrics"]["latency"]["kernels"] == {"selective_scan": impl}
    assert record["metrics"]["latency"]["ran_alone"] is None  # no executor said it ran alone


def test_records_honour_the_umask(tmp_path):
    """A colleague on a shared results folder reads the records (mkstemp's 0600 hid them)."""
    import os

    path = tmp_path / "cell.json"
    good = {"suite": "s", "cell": "c", "config": {}, "status": "ok", "error": None, "metrics": {},
            "env": {}, "plugins": {}}
    old = os.umask(0o022)
    try:
        write_record(path, good)
        assert path.stat().st_mode & 0o777 == 0o644
        os.umask(0o007)
        write_record(path, good)
        assert path.stat().st_mode & 0o777 == 0o660
    finally:
        os.umask(old)


def test_run_redoes_malformed_and_incomplete_records(tmp_path, plugin_site, with_site, capsys):
    with_site(plugin_site)
    text = SUITE.replace("[params, gflops, {name: latency, warmup: 1, min_runs: 2, min_time: 0}]", "[params, gflops]")
    path = suite_file(tmp_path, text)
    results = tmp_path / "results"
    assert main(["run", str(path), "--results", str(results)]) == 0
    files = sorted((results / "toys").glob("*.json"))
    broken = json.loads(files[0].read_text()) | {"metrics": None}
    files[0].write_text(json.dumps(broken))
    incomplete = json.loads(files[1].read_text())
    del incomplete["metrics"]["gflops"]  # status ok, but not every metric the cell asks for
    files[1].write_text(json.dumps(incomplete))
    files[2].write_text(files[2].read_text()[:40])  # truncated
    capsys.readouterr()
    assert main(["run", str(path), "--results", str(results)]) == 0
    out, err = capsys.readouterr()
    assert "0 already done, 3 to run" in out
    lines = {line.split(": ")[2]: line for line in err.splitlines()}
    assert len(lines) == 3 and all(line.endswith("; the cell runs again") for line in lines.values())
    assert lines[str(files[0])] == (f"harness: warning: {files[0]}: 'metrics' is null, expected a mapping; "
                                    "the cell runs again")
    assert f"{files[1]}: status ok but metric(s) 'gflops' missing;" in lines[str(files[1])]
    assert f"{files[2]}: not valid JSON (Unterminated string" in lines[str(files[2])]
    records = load_records(results)
    assert len(records) == 3 and all(set(r["metrics"]) == {"params", "gflops"} for r in records)


def test_claims_stale_taken_over_live_and_foreign_respected(tmp_path):
    import os
    import socket

    from harness import claims

    record = tmp_path / "abc.json"
    claim_file = tmp_path / "abc.claim"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid is free now (reaped)
    claim_file.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": "then"}))
    got = claims.claim(record)  # a dead process's claim on this host is stale: taken over
    assert isinstance(got, claims.Claim)
    assert json.loads(claim_file.read_text())["pid"] == os.getpid()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["abc.claim"]  # nothing left from the takeover
    assert claims.claim(record) == json.loads(claim_file.read_text())  # held: a second claim is refused
    got.release()
    assert not claim_file.exists()

    live = {"host": socket.gethostname(), "pid": os.getppid(), "started": "now"}
    claim_file.write_text(json.dumps(live))
    assert claims.claim(record) == live
    assert "pid" in claims.describe(live) and claim_file.exists()
    foreign = {"host": socket.gethostname() + "-other", "pid": dead.pid, "started": "now"}
    claim_file.write_text(json.dumps(foreign))  # another host's pid means nothing here: left alone
    assert claims.claim(record) == foreign
    # a run that judged a claim stale but finds a fresh one there when it moves it: put back
    fresh = {"host": socket.gethostname(), "pid": os.getpid(), "started": "now", "token": "fresh"}
    claim_file.write_text(json.dumps(fresh))
    claims._bury(claim_file, {"host": socket.gethostname(), "pid": dead.pid, "started": "then"})
    assert json.loads(claim_file.read_text()) == fresh and len(list(tmp_path.iterdir())) == 1
    claim_file.write_text("")  # being written by a run that is starting
    assert claims.claim(record) == {}
    old = time.time() - claims.EMPTY_GRACE_S - 5  # ...or left empty by one that died doing so
    os.utime(claim_file, (old, old))
    assert isinstance(claims.claim(record), claims.Claim)


def test_a_claim_is_released_after_the_record_and_an_interrupt(tmp_path, plugin_site, with_site):
    with_site(plugin_site)
    from harness.runner import plan, run_jobs
    from harness.suite import load_suite

    text = SUITE.replace("[params, gflops, {name: latency, warmup: 1, min_runs: 2, min_time: 0}]", "[params]")
    jobs = plan(load_suite(suite_file(tmp_path, text)), tmp_path / "r")
    seen = []

    class Recording:
        def run(self, jobs, on_done, on_start=None):
            for job in jobs:
                seen.append(sorted(p.suffix for p in job.record_path.parent.iterdir()))  # claimed first
                if len(seen) == 2:
                    raise KeyboardInterrupt
                on_done(job, {"status": "ok"})

    with pytest.raises(KeyboardInterrupt):
        run_jobs(jobs, Recording())
    assert seen == [[".claim"], [".claim"]]  # the first released once done, the second taken
    assert not list((tmp_path / "r" / "toys").glob("*.claim"))  # and released on the interrupt


@pytest.mark.slow
def test_concurrent_runs_run_each_cell_once(tmp_path, plugin_site, with_site):
    """Three `harness run` of one suite on one results folder share the cells: none runs twice.
    The first holds one slow cell for as long as the others run, then gets SIGTERM."""
    with_site(plugin_site)
    text = SUITE.replace("[params, gflops, {name: latency, warmup: 1, min_runs: 2, min_time: 0}]", "[gflops]").replace(
        "backbone.width: [2, 4, 8]", "backbone.sleep: [600, 0, 0.001, 0.002, 0.003]")
    path = suite_file(tmp_path, text)
    results = tmp_path / "results"
    cmd = [sys.executable, "-m", "harness.cli", "run", str(path), "--results", str(results)]
    first = subprocess.Popen(cmd + ["--only", "backbone.sleep=600"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list((results / "toys").glob("*.claim")):
        time.sleep(0.05)
    others = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in others]
    ran = [line.split()[1] for out, _ in outs for line in out.splitlines() if line.startswith("ok ")]
    assert len(ran) == 4 and len(set(ran)) == 4, outs  # every fast cell ran, and exactly once
    for (out, err), proc in zip(outs, others):  # the slow one was claimed: not failed, not done
        assert proc.returncode == 75 and re.search(r"^\d cell\(s\) running elsewhere", out, re.M), (out, err)
        assert re.search(r"skip +\w{12} +backbone.sleep=600: running elsewhere \(claimed by \S+ pid %d since "
                         % first.pid, out), out
    assert first.poll() is None
    first.send_signal(signal.SIGTERM)  # stops like Ctrl-C: no record for the cell, its claim released
    out, err = first.communicate(timeout=60)
    assert first.returncode == 143 and "harness: terminated; finished cells are kept" in err, (out, err)
    assert not list((results / "toys").glob("*.claim")) and len(load_records(results)) == 4
    done = subprocess.run(cmd + ["--only", "backbone.sleep=0*"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "4 already done, 0 to run" in done.stdout
