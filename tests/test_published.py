"""Published figures in suites (`published:`): validated against the cell's metrics with file
and line, kept in the record beside ours (`published`, `delta`), and printed by `harness table`
and every `harness leaderboard` format, with a figure outside its tolerance marked."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from harness.cli import main
from harness.records import load_records, write_record
from harness.suite import load_suite, validate_cell

SUITE = """\
suite: paper-row
seed: 0
base:
  backbone: {name: dit, size: S, patch: 4, input_size: 32}
  metrics: [params, gflops]
  device: cpu
  published:
    source: "DiT (Peebles & Xie 2023), Table 4"
    params: 3.29e+7         # DiT-S/4 prints 33M: our count is beside it
    gflops: 1.0             # deliberately far from DiT-S/4's 1.41
    tolerance: {params: 1.0e+6, gflops: 0.05}
include:
  - backbone.patch: 8
    published: {source: "DiT, Table 4 (S/8)", gflops: 0.36}
"""


def _suite(tmp_path: Path, text: str = SUITE) -> Path:
    path = tmp_path / "paper-row.yaml"
    path.write_text(text)
    return path


def test_a_record_keeps_published_and_delta_and_every_format_shows_both(tmp_path, capsys):
    path, results = _suite(tmp_path), tmp_path / "results"
    assert main(["run", str(path), "--results", str(results)]) == 0
    records = {r["config"]["backbone"]["patch"]: r for r in load_records(results / "paper-row")}
    s4, s8 = records[4]["metrics"], records[8]["metrics"]
    # the record: published and delta (value - published) in each entry the block names
    for entry, published in ((s4["params"], 3.29e+7), (s4["gflops"], 1.0), (s8["gflops"], 0.36)):
        assert entry["published"] == published
        assert entry["delta"] == pytest.approx(entry["value"] - published, rel=1e-9)
    assert s4["gflops"]["tolerance"] == 0.05 and s4["gflops"]["within_tolerance"] is False  # 1.41 vs 1.0
    assert s4["params"]["within_tolerance"] is (abs(s4["params"]["delta"]) <= 1e6)
    assert "published" not in s8["params"] and "tolerance" not in s8["gflops"]  # the include's own block
    assert records[4]["config"]["published"]["source"].startswith("DiT (Peebles")

    capsys.readouterr()
    assert main(["table", str(results / "paper-row")]) == 0
    table = capsys.readouterr().out
    assert "gflops paper" in table and "(Δ +" in table and "†" in table
    assert "outside the published figure's tolerance" in table and "DiT (Peebles & Xie 2023), Table 4" in table

    gflops4, delta4 = s4["gflops"]["value"], s4["gflops"]["delta"]
    boards = {}
    for fmt in ("markdown", "latex", "csv", "html"):
        out = tmp_path / f"board.{fmt}"
        assert main(["leaderboard", str(results / "paper-row"), "--format", fmt, "--out", str(out)]) == 0
        boards[fmt] = out.read_text()
    md = boards["markdown"]
    header = next(line for line in md.splitlines() if "gflops paper" in line)
    assert header.index("gflops") < header.index("gflops paper")  # ours, then the paper's beside it
    row = next(line for line in md.splitlines() if "| 1 " in line or "| 2 " in line and "†" in line)
    assert row
    assert f"{gflops4:.4g}" in md and "1 (Δ +" in md and "0.36 (Δ" in md and "†" in md
    assert r"gflops paper" in boards["latex"] and r"$\Delta$" in boards["latex"] and r"$^\dagger$" in boards["latex"]
    rows = list(csv.DictReader(io.StringIO(boards["csv"])))
    s4row = next(r for r in rows if r["backbone.patch"] == "4")
    assert float(s4row["gflops paper"]) == 1.0 and float(s4row["gflops Δ"]) == pytest.approx(delta4, rel=1e-9)
    assert s4row["gflops within tolerance"] == "False"
    html = boards["html"]
    assert "gflops paper" in html and 'off" data-v="1.0"' in html and "outside the published figure" in html


def test_correcting_a_published_figure_reannotates_without_running_again(tmp_path):
    path, results = _suite(tmp_path), tmp_path / "results"
    assert main(["run", str(path), "--results", str(results)]) == 0
    before = {r["cell"]: r["finished"] for r in load_records(results / "paper-row")}
    path.write_text(SUITE.replace("gflops: 1.0 ", "gflops: 1.41"))
    assert main(["run", str(path), "--results", str(results)]) == 0
    after = {r["cell"]: r for r in load_records(results / "paper-row")}
    assert set(after) == set(before)  # same cells: the block is no part of a cell's identity
    assert all(after[c]["finished"] == before[c] for c in before)  # none ran again
    s4 = next(r for r in after.values() if r["config"]["backbone"]["patch"] == 4)
    assert s4["metrics"]["gflops"]["published"] == 1.41 and s4["config"]["published"]["gflops"] == 1.41
    assert s4["metrics"]["gflops"]["within_tolerance"] is (abs(s4["metrics"]["gflops"]["value"] - 1.41) <= 0.05)


@pytest.mark.parametrize("edit, line, message", [
    (("    gflops: 1.0 ", "    gflopz: 1.0 "), 10, "published.gflopz: 'gflopz' is not a metric of this cell (every "
                                                    "key but source and tolerance names one of its metrics: params, "
                                                    "gflops); did you mean 'gflops'?"),
    (("    gflops: 1.0 ", "    gflops: lots "), 10, "published.gflops: expected a number"),
    (("{params: 1.0e+6, gflops: 0.05}", "{params: 1.0e+6, fid: 0.05}"), 11, "published.tolerance.fid: no published "
                                                                          "figure 'fid'"),
    (("{params: 1.0e+6, gflops: 0.05}", "-1"), 11, "published.tolerance: expected a number >= 0"),
    (('source: "DiT, Table 4 (S/8)", gflops', "source: x, isc"), 14, "published.isc: 'isc' is not a metric"),
    (('    source: "DiT (Peebles & Xie 2023), Table 4"\n', ""), 7, "published.source: missing required key"),
])
def test_a_bad_published_block_is_refused_with_file_and_line(tmp_path, capsys, edit, line, message):
    path = _suite(tmp_path, SUITE.replace(*edit))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"harness: error: {path}:{line}: ") or f"{path}:{line}: " in err, err
    assert message in err, err


def test_a_field_of_an_entry_is_a_figure_too(tmp_path):
    """LAPTOP-Diff prints a PickScore *change* against the teacher: ``pickscore.change``."""
    from harness.published import PublishedSpec, annotate, figures

    metrics = {"pickscore": {"value": 20.1, "teacher": 21.0, "change": -0.0428571}}
    annotate(metrics, PublishedSpec.model_validate({"source": "LAPTOP-Diff", "pickscore.change": -0.040,
                                                    "tolerance": 0.002}))
    entry = metrics["pickscore"]
    assert entry["published.change"] == -0.040 and entry["delta.change"] == pytest.approx(-0.0028571)
    assert entry["within_tolerance.change"] is False and "published" not in entry
    fig = figures({"metrics": metrics})["pickscore.change"]
    assert fig["ours"] == -0.0428571 and fig["published"] == -0.040
    annotate(metrics, None)  # the block removed: so are its annotations
    assert set(entry) == {"value", "teacher", "change"}
