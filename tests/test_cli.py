"""ls, plugins, table and flops, including their --json forms."""
from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import pytest

from harness.cli import main
from harness.records import write_record


def cli(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_ls_and_plugins_json(capsys):
    code, out, _ = cli(["ls", "--json"], capsys)
    rows = json.loads(out)
    assert code == 0
    dit = next(r for r in rows if r["name"] == "dit")
    assert dit["kind"] == "backbone" and dit["plugin"] == "dit" and dit["description"].startswith("DiT")
    code, out, _ = cli(["ls", "mixer"], capsys)
    assert code == 0 and "attention" in out and "dit" not in out
    code, out, _ = cli(["plugins", "--json"], capsys)
    plugins = {p["name"]: p for p in json.loads(out)}
    assert plugins["measure"]["distribution"] == "diffusion-harness"
    assert "metric:gflops" in plugins["measure"]["components"]
    assert "harness_flop_handles" in plugins["measure"]["hooks"]


def test_ls_unknown_kind(capsys):
    code, _, err = cli(["ls", "mixers"], capsys)
    assert code == 2 and "did you mean 'mixer'" in err


def record(cell, size, params, gflops, status="ok", latency=None):
    metrics = {"params": {"value": params, "unit": "params", "direction": "lower"},
               "gflops": {"value": gflops, "unit": "G", "direction": "lower"}}
    if latency:
        metrics["latency"] = {"value": latency, "iqr": 0.4, "unit": "ms", "direction": "lower"}
    if status != "ok":
        metrics = {}
    return {"suite": "demo", "cell": cell, "config": {"backbone": {"name": "dit", "size": size},
                                                      "metrics": ["params", "gflops"]},
            "status": status, "error": None if status == "ok" else "RuntimeError: boom", "metrics": metrics,
            "env": {}, "plugins": {}}


@pytest.fixture
def results(tmp_path):
    write_record(tmp_path / "demo" / "a.json", record("a", "S", 32_870_000, 6.06, latency=12.0))
    write_record(tmp_path / "demo" / "b.json", record("b", "XL", 674_830_000, 118.69))
    write_record(tmp_path / "demo" / "c.json", record("c", "L", 0, 0, status="failed"))
    (tmp_path / "demo" / "junk.json").write_text("{not json")
    return tmp_path


def test_table_markdown_shows_direction_and_status(results, capsys):
    code, out, _ = cli(["table", str(results)], capsys)
    assert code == 0
    assert "params ↓" in out and "gflops ↓" in out and "latency (ms) ↓" in out
    assert "674.83M" in out and "118.7" in out and "12.00 ± 0.20" in out
    assert out.rstrip().endswith("↓ lower is better · ± is half the interquartile range")  # what ± means
    assert "failed" in out and "backbone.size" in out


@pytest.mark.parametrize("fmt,needle", [("latex", "\\begin{tabular}"), ("csv", "674830000"),
                                        ("html", "<table")])
def test_table_formats(results, capsys, fmt, needle):
    code, out, _ = cli(["table", str(results), "--format", fmt], capsys)
    assert code == 0 and needle in out
    assert ("± is half the interquartile range" in out) == (fmt != "csv")  # csv holds raw values, no ±


def test_table_shows_the_kernels_a_latency_ran_on(tmp_path, capsys):
    for cell, impl in (("a", "compiled-cpu"), ("b", "pytorch")):
        rec = record(cell, "S", 1, 1.0, latency=3.0)
        rec["metrics"]["latency"]["kernels"] = {"selective_scan": impl}
        write_record(tmp_path / "demo" / f"{cell}.json", rec)
    write_record(tmp_path / "demo" / "c.json", record("c", "S", 1, 1.0, latency=2.0))  # attention: none
    code, out, _ = cli(["table", str(tmp_path), "--format", "csv"], capsys)
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert list(rows[0])[list(rows[0]).index("latency") + 1] == "kernels"  # first thing after the metrics
    assert [r["kernels"] for r in rows] == ["selective_scan: compiled-cpu", "selective_scan: pytorch", ""]


def test_table_json_and_columns(results, capsys):
    code, out, _ = cli(["table", str(results), "--json", "--columns", "backbone.size", "gflops"], capsys)
    rows = json.loads(out)
    assert code == 0 and rows[1] == {"backbone.size": "XL", "gflops": 118.69}
    code, _, err = cli(["table", str(results), "--columns", "gflop"], capsys)
    assert code == 2 and "did you mean 'gflops'" in err


def test_table_of_missing_dir(tmp_path, capsys):
    code, _, err = cli(["table", str(tmp_path / "nope")], capsys)
    assert code == 2 and "not found" in err


def test_flops_json_tiny(capsys):
    code, out, _ = cli(["flops", "dit", "--size", "tiny", "--patch", "4", "--input-size", "16", "--json",
                        "--by-module"], capsys)
    data = json.loads(out)
    assert code == 0 and data["options"] == {"size": "tiny", "patch": 4, "input_size": 16}
    assert data["params"] == sum(m["params"] for m in data["by_module"].values())
    assert abs(sum(m["gflops"] for m in data["by_module"].values()) - data["gflops"]) < 1e-9
    assert data["uncounted_ops"] == {}


def test_flops_bad_option(capsys):
    code, _, err = cli(["flops", "dit", "--sise", "XL"], capsys)
    assert code == 2 and "did you mean 'size'" in err


def test_flops_dit_xl2_matches_paper():
    """The published DiT-XL/2 figures: 675M parameters, 118.6 GFLOPs at 256x256 (latent 32)."""
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "flops", "dit", "--size", "XL", "--patch", "2",
                           "--input-size", "32", "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert abs(data["params"] / 675e6 - 1) < 0.01
    assert abs(data["gflops"] / 118.6 - 1) < 0.01


def test_table_mixed_component_forms_and_missing_keys(tmp_path, capsys):
    a = record("a", "S", 1, 1.0)
    a["config"]["backbone"]["mixer"] = "attention"
    b = record("b", "S", 2, 2.0)
    b["config"]["backbone"]["mixer"] = {"name": "window-attention", "window_size": 4}
    b["config"]["backbone"]["patch"] = 2  # a key the other record lacks
    write_record(tmp_path / "a.json", a)
    write_record(tmp_path / "b.json", b)
    code, out, _ = cli(["table", str(tmp_path)], capsys)
    assert code == 0 and "window-attention(window_size=4)" in out
    assert "backbone.mixer.name" not in out and "nan" not in out


def test_flops_reports_a_text_unets_context_width(capsys):
    code, out, _ = cli(["flops", "unet", "--preset", "sd-tiny", "--json"], capsys)
    data = json.loads(out)
    assert code == 0 and data["input"]["context_dim"] > 0  # the preset's cross-attention width, not 0
    assert data["input"]["num_classes"] == 0  # text-conditioned: no class label, whatever the default
    code, out, _ = cli(["flops", "unet", "--preset", "adm-tiny", "--input-size", "8", "--json"], capsys)
    assert code == 0 and json.loads(out)["input"]["num_classes"] == 1000 and json.loads(out)["input"]["context_dim"] == 0


BRACKETS = """\
suite: brackets
base:
  backbone: {name: dit, size: tiny, patch: 4, input_size: 8}
  metrics: [params]
  device: cpu
matrix:
  backbone.pretrained: ["/ckpts[enforce fail at x][/old]/dit.pt"]
"""


def test_user_text_is_never_read_as_markup(tmp_path, capsys, monkeypatch):
    """Labels and errors with '[/' or '[enforce fail at ...]' print verbatim, and a rerun gets past them."""
    monkeypatch.setenv("COLUMNS", "400")  # one line per message, so the text can be matched whole
    suite = tmp_path / "suite[red]x.yaml"
    suite.write_text(BRACKETS)
    args = ["run", str(suite), "--results", str(tmp_path / "r")]
    code, out, _ = cli(args + ["--dry-run"], capsys)
    assert code == 0 and "  backbone.pretrained=/ckpts[enforce fail at x][/old]/dit.pt\n" in out
    for _ in range(2):  # the failed cell is retried, not a crash at the same place
        code, out, err = cli(args, capsys)
        assert code == 1 and "Traceback" not in err
        assert "backbone.pretrained=/ckpts[enforce fail at x][/old]/dit.pt" in out
        assert "UserError: pretrained '/ckpts[enforce fail at x][/old]/dit.pt' is not a file" in out
        assert "1 cell(s) failed; their records hold the error" in out
    code, out, _ = cli(["validate", str(suite)], capsys)
    assert code == 0 and f"{suite}: suite 'brackets' is valid" in out


@pytest.mark.parametrize("jobs", ["0", "-2"])
def test_jobs_must_be_positive(tmp_path, capsys, jobs):
    suite = tmp_path / "suite.yaml"
    suite.write_text(BRACKETS)
    code, out, err = cli(["run", str(suite), "--jobs", jobs, "--results", str(tmp_path / "r")], capsys)
    assert code == 2 and err == f"harness: error: --jobs {jobs}: expected an integer >= 1\n" and not out
    assert not (tmp_path / "r").exists()


def test_validate_costs_prints_each_cells_params_and_gflops(tmp_path, capsys):
    suite = tmp_path / "s.yaml"
    suite.write_text("suite: s\nbase:\n  backbone: {name: dit, size: tiny, patch: 4, input_size: 16}\n"
                     "  metrics: [params]\nmatrix:\n  backbone.patch: [2, 4]\n")
    code, out, _ = cli(["validate", str(suite), "--costs"], capsys)
    assert code == 0
    rows = {line.split()[0]: line.split()[1:3] for line in out.splitlines() if line.strip().startswith("backbone.")}
    # the figures `harness flops dit --size tiny --patch P --input-size 16` gives
    assert rows == {"backbone.patch=2": ["1.40M", "0.056"], "backbone.patch=4": ["1.42M", "0.014"]}, out
