"""The runner: records, failures that stay local, resume after a kill, atomic writes."""
from __future__ import annotations

import json
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

    def broken_dump(obj, fh, **kw):
        fh.write('{"suite": "s", "cel')
        raise OSError("disk full")

    monkeypatch.setattr(json, "dump", broken_dump)
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
    assert capsys.readouterr().out.splitlines()[0].startswith("cell,seed,")
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
    """fvcore is imported by the gflops metric, inside the cell: env still has its version."""
    from importlib import metadata

    script = textwrap.dedent("""
        import json, sys
        from harness.runner import CellJob, execute_cell
        assert "fvcore" not in sys.modules
        config = {"backbone": {"name": "dit", "size": "tiny", "depth": 1, "input_size": 8},
                  "metrics": ["gflops"], "device": "cpu"}
        print(json.dumps(execute_cell(CellJob("t", "t.yaml", "c", "c", 0, config, sys.argv[1]))["env"]))
    """)
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    env = json.loads(done.stdout.splitlines()[-1])
    assert env["fvcore"] == metadata.version("fvcore")
    assert env["libraries"]["fvcore"] == env["fvcore"] and env["libraries"]["torch"] == metadata.version("torch")
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
