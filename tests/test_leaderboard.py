"""Leaderboard over records on disk: ranking, best marks, directions, links, sortable HTML."""
from __future__ import annotations

import csv
import io
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from harness import UserError
from harness.cli import main
from harness.leaderboard import build, render
from harness.records import load_records, write_record

# (suite, mixer, tokens side, params, gflops, latency ms, val_loss); figures are made up.
ROWS = [
    ("mixers", "attention", 16, 33_000_000, 6.06, 41.0, 0.210),
    ("mixers", "mamba", 16, 30_500_000, 4.10, 55.0, 0.205),
    ("mixers", "window-attention", 16, 32_900_000, 5.02, 38.0, 0.230),
    ("scaling", "attention", 32, 33_000_000, 24.2, 160.0, None),
]


def _record(suite, mixer, side, params, gflops, latency, val_loss, status="ok"):
    metrics = {
        "params": {"value": params, "direction": "lower", "unit": "params"},
        "gflops": {"value": gflops, "direction": "lower", "unit": "G", "resolution": side * 2},
        "latency": {"value": latency, "iqr": 2.0, "direction": "lower", "unit": "ms", "resolution": side * 2},
    }
    if val_loss is not None:
        metrics["val_loss"] = {"value": val_loss, "direction": "lower", "unit": ""}
    cell = f"{suite[:3]}{mixer[:3]}{side}{status[0]}"
    return {"suite": suite, "cell": cell, "config": {"backbone": {"name": "dit", "mixer": mixer, "patch": 2,
                                                                  "input_size": side * 2},
                                                     "metrics": list(metrics)},
            "status": status, "error": None if status == "ok" else "RuntimeError: boom",
            "metrics": metrics if status == "ok" else {}, "env": {}, "plugins": {}}


def write_results(root: Path, failed: bool = True) -> Path:
    for row in ROWS:
        rec = _record(*row)
        write_record(root / rec["suite"] / f"{rec['cell']}.json", rec)
    if failed:
        rec = _record("mixers", "broken-mixer", 16, 0, 0, 0, None, status="failed")
        write_record(root / "mixers" / f"{rec['cell']}.json", rec)
    return root


@pytest.fixture
def results(tmp_path):
    return write_results(tmp_path / "results")


def test_ranks_by_quality_and_marks_best_per_column(results):
    board = build(load_records(results))
    assert board.rank_by == "val_loss"  # quality first, when a record has it
    assert list(board.raw["backbone.mixer"])[:3] == ["mamba", "attention", "window-attention"]
    assert board.raw["status"].iloc[-1] == "failed"  # failures sink to the bottom
    mixer_of = lambda i: board.raw["backbone.mixer"].iloc[i]  # noqa: E731
    assert {mixer_of(i) for i in board.best["gflops"]} == {"mamba"}
    assert {mixer_of(i) for i in board.best["latency"]} == {"window-attention"}
    assert {mixer_of(i) for i in board.best["params"]} == {"mamba"}


def test_markdown_shows_direction_best_and_links(results, tmp_path):
    out = render(load_records(results), "markdown", link_base=tmp_path)
    header = out.splitlines()[0]
    assert "gflops ↓" in header and "val_loss ↓" in header and "latency (ms) ↓" in header
    assert "**4.1**" in out and "**38.00 ± 1.00**" in out
    links = re.findall(r"\[(\w+)\]\(([^)]+)\)", out)
    assert len(links) == 5
    for cell, path in links:  # every row points at its own record, relative to the output
        assert (tmp_path / path).is_file() and (tmp_path / path).stem == cell
    assert "ranked by val_loss" in out and "↓ lower is better" in out


def test_metric_option_reranks_and_rejects_unknown(results):
    board = build(load_records(results), metric="latency")
    assert list(board.raw["latency"])[:2] == [38.0, 41.0]
    board = build(load_records(results), metric="params")  # integer figures rank too
    assert list(board.raw["params"])[:4] == [30_500_000, 32_900_000, 33_000_000, 33_000_000]
    with pytest.raises(UserError, match=r"unknown metric 'gflop'.*did you mean 'gflops'"):
        build(load_records(results), metric="gflop")


def test_latex_and_csv(results):
    tex = render(load_records(results), "latex")
    assert r"\textbf{4.1}" in tex and r"$\downarrow$" in tex and r"\href{" in tex and r"val\_loss" in tex
    rows = list(csv.DictReader(io.StringIO(render(load_records(results), "csv"))))
    assert rows[0]["backbone.mixer"] == "mamba" and float(rows[0]["gflops ↓"]) == 4.1
    assert set(rows[0]["best"].split(";")) == {"params", "gflops", "val_loss"}
    assert all(r["record"].endswith(".json") for r in rows)


def test_cli_leaderboard_writes_file_with_relative_links(results, tmp_path, capsys):
    out = tmp_path / "site" / "board.html"
    assert main(["leaderboard", str(results), "--format", "html", "--out", str(out)]) == 0
    page = out.read_text()
    hrefs = re.findall(r'href="([^"]+)"', page)
    assert len(hrefs) == 5 and all((out.parent / h).is_file() for h in hrefs)
    assert "<script" in page and "http" not in page  # self-contained: no CDN, no server
    assert main(["leaderboard", str(results), "--metric", "gflop"]) == 2
    assert "did you mean 'gflops'" in capsys.readouterr().err


def _chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def test_html_sorts_on_click_in_headless_chromium(results, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium not installed (Debian: apt-get install -y chromium); .ci/run installs it")
    page = render(load_records(results), "html", link_base=tmp_path)
    # Click the gflops header twice (ascending, then descending) as a user would, then dump the DOM.
    click = ('<script>var th = document.querySelector(\'th[data-col="gflops"]\');'
             'th.click(); th.click();</script></body>')
    (tmp_path / "board.html").write_text(page.replace("</body>", click))
    profile = tmp_path / "profile"
    proc = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
         "--dump-dom", (tmp_path / "board.html").as_uri()],
        capture_output=True, text=True, timeout=60, env={**os.environ, "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    assert 'aria-sort="descending"' in dom
    body = dom.split("<tbody>")[1].split("</tbody>")[0]
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", body, flags=re.S)
    values = [re.findall(r'<td[^>]*data-v="([^"]*)"', row) for row in rows]
    col = ["#"] + list(build(load_records(results)).shown.columns)
    g = col.index("gflops ↓")
    seen = [float(v[g]) if v[g] else None for v in values]
    numeric = [v for v in seen if v is not None]
    assert numeric == sorted(numeric, reverse=True) and numeric[0] == 24.2  # sorted by the click
    assert seen[-1] is None  # the failed row, with no figure, stays last


def test_cli_leaderboard_out_that_cannot_be_a_file(results, tmp_path, capsys):
    """--out at a folder, or below a file: one line naming --out, exit 2, nothing written or lost."""
    folder = tmp_path / "site"
    (folder / "keep.txt").parent.mkdir()
    (folder / "keep.txt").write_text("keep")
    blocker = tmp_path / "notes.txt"
    blocker.write_text("keep me")
    for out, expected in [(folder, f"--out {folder}: is a directory, expected a file name"),
                          (blocker / "sub" / "board.md",
                           f"--out {blocker / 'sub' / 'board.md'}: {blocker} is not a directory")]:
        assert main(["leaderboard", str(results), "--out", str(out)]) == 2
        captured = capsys.readouterr()
        assert captured.err.startswith(f"harness: error: {expected}") and captured.err.count("\n") == 1
        assert "Traceback" not in captured.out + captured.err and not captured.out
    assert [p.name for p in folder.iterdir()] == ["keep.txt"] and blocker.read_text() == "keep me"


def test_malformed_records_are_skipped_with_a_warning_and_the_rest_shown(results, capsys):
    """One bad file in one suite used to crash the leaderboard of every suite, and `table`."""
    bad = {
        "metrics-null.json": _record("mixers", "x", 16, 1, 1.0, 1.0, 0.1) | {"metrics": None},
        "metrics-list.json": _record("scaling", "x", 16, 1, 1.0, 1.0, 0.1) | {"metrics": [1, 2]},
        "config-list.json": _record("mixers", "y", 16, 1, 1.0, 1.0, 0.1) | {"config": ["a"]},
        "entry-list.json": _record("mixers", "z", 16, 1, 1.0, 1.0, 0.1) | {"metrics": {"params": [3]}},
    }
    for name, rec in bad.items():
        write_record(results / rec["suite"] / name, rec)
    (results / "mixers" / "truncated.json").write_text('{"suite": "mixers", "cell": "ab')
    plan = results / "mixers" / "abc" / "pruned" / "plan.json"  # another tool's JSON: passed over quietly
    plan.parent.mkdir(parents=True)
    plan.write_text('{"skip": [], "drop": ["mid_block"]}')
    for command in (["leaderboard", str(results)], ["table", str(results)]):
        assert main(command) == 0
        out, err = capsys.readouterr()
        assert len([line for line in out.splitlines() if line.startswith("|")]) == 2 + 5  # header, rule, rows
        assert all(_record(*row)["cell"] in out for row in ROWS)
        lines = err.splitlines()
        assert len(lines) == 5 and all(line.startswith("harness: warning: ") for line in lines)
        by_file = {Path(line.split(": ")[2]).name: line for line in lines}
        assert "'metrics' is null, expected a mapping; skipped" in by_file["metrics-null.json"]
        assert "'metrics' is a list, expected a mapping" in by_file["metrics-list.json"]
        assert "'config' is a list, expected a mapping" in by_file["config-list.json"]
        assert "metric 'params' is a list" in by_file["entry-list.json"]
        assert "not valid JSON" in by_file["truncated.json"]
    assert len(load_records(results / "scaling")) == 1  # a suite's own folder
    capsys.readouterr()


def test_unreadable_record_is_named(results, monkeypatch, capsys):
    """A record another user cannot read (mode 0600 on a shared folder) is reported, not silently
    missing. The test runs as any user, root included: the read itself is made to fail."""
    victim = next((results / "scaling").glob("*.json"))
    real = os.open

    def refuse(path, *args, **kwargs):
        if Path(path) == victim:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)
    assert len(load_records(results)) == 4
    assert capsys.readouterr().err == f"harness: warning: {victim}: cannot read (Permission denied); skipped\n"
    assert main(["table", str(results / "scaling")]) == 2
    assert "no records found" in capsys.readouterr().err
