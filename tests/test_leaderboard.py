"""Leaderboard over records on disk: ranking, best marks, directions, links, sortable HTML."""
from __future__ import annotations

import csv
import html
import io
import json
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
    config = {"backbone": {"name": "dit", "mixer": mixer, "patch": 2, "input_size": side * 2},
              "metrics": list(metrics)}
    return {"suite": suite, "cell": cell, "label": f"backbone.mixer={mixer}", "config": config,
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


# The default suite's shape (suites/ablation.yaml): five tiny DiTs, one per token mixer, and
# the tiny LaMamba-Diff U-Net, with the cells' labels and configs as `harness run` writes them
# and FID unavailable offline. Figures are made up; ss2d's latency spread swamps its median.
FID_REASON = ("no Inception weights offline; set HARNESS_FID_WEIGHTS or the weights option "
              "(torch-fidelity's pt_inception-2015-12-05-6726825d.pth)")
DEFAULT_CELLS = [  # (label, backbone, params, gflops, latency ms, iqr ms, val_loss)
    ("backbone.mixer=attention", {"mixer": "attention"}, 203_000, 0.0161, 1.10, 0.10, 0.1831),
    ("backbone.mixer=window-attention", {"mixer": {"name": "window-attention", "window_size": 4}},
     203_000, 0.0142, 1.31, 0.20, 0.1857),
    ("backbone.mixer=mamba", {"mixer": "mamba"}, 236_000, 0.0150, 4.20, 0.90, 0.1809),
    ("backbone.mixer=ss2d", {"mixer": "ss2d"}, 262_000, 0.0168, 9.45, 81.42, 0.1794),
    ("backbone.mixer=lamamba", {"mixer": {"name": "lamamba", "window_size": 4}}, 275_000, 0.0171, 9.60, 1.5,
     0.1790),
    ("backbone=lamamba", None, 1_210_000, 0.0305, 12.8, 2.1, 0.1765),
]


def write_default_suite(root: Path) -> Path:
    dit = {"name": "dit", "size": "tiny", "patch": 2, "depth": 2, "hidden_size": 64, "mixer": "attention"}
    lamamba = {"name": "lamamba", "size": "tiny", "widths": [16, 32, 64, 64], "num_heads": 2}
    for i, (label, over, params, gflops, latency, iqr, val_loss) in enumerate(DEFAULT_CELLS):
        backbone = dit | over if over is not None else lamamba
        config = {"backbone": backbone, "data": {"name": "shapes", "resolution": 16},
                  "train": {"steps": 100, "batch_size": 16, "lr": 0.001, "ema": 0.999, "log_every": 20},
                  "metrics": ["params", "gflops", "latency", "val_loss", "fid"], "device": "cpu"}
        kernels = {"selective_scan": "compiled-cpu"} if "mamba" in label or "ss2d" in label else {}
        metrics = {
            "params": {"value": params, "direction": "lower", "unit": "params", "role": "cost"},
            "gflops": {"value": gflops, "direction": "lower", "unit": "G", "role": "cost"},
            "latency": {"value": latency, "iqr": iqr, "direction": "lower", "unit": "ms", "role": "cost",
                        "kernels": kernels},
            "val_loss": {"value": val_loss, "direction": "lower", "unit": "", "role": "quality"},
            "fid": {"value": None, "status": "unavailable", "reason": FID_REASON, "direction": "lower",
                    "unit": "", "role": "quality"},
        }
        cell = f"{i:02d}" + "c0ffee" * 2
        rec = {"suite": "ablation", "cell": cell[:12], "label": label, "index": i, "seed": 0, "config": config,
               "status": "ok", "error": None, "metrics": metrics, "env": {}, "plugins": {}}
        write_record(root / "ablation" / f"{rec['cell']}.json", rec)
    return root


@pytest.fixture
def results(tmp_path):
    return write_results(tmp_path / "results")


@pytest.fixture
def default_suite(tmp_path):
    return write_default_suite(tmp_path / "results")


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
    rows = [line for line in out.splitlines() if re.match(r"\|\s+\d", line)]
    assert len(rows) == 5
    for row in rows:  # rank, suite, label linked to its own record (relative to the output), ..., cell id last
        cells = [c.strip() for c in row.strip("|").split("|")]
        label, path = re.fullmatch(r"\[([^]]+)\]\(([^)]+)\)", cells[2]).groups()
        assert (tmp_path / path).is_file() and (tmp_path / path).stem == cells[-1]
        assert label == json.loads((tmp_path / path).read_text())["label"].split("=")[1]
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
    hrefs = [h for h in re.findall(r' href="([^"]+)"', page) if not h.startswith("#")]  # "#": within the page
    assert len(hrefs) == 5 and all((out.parent / h).is_file() for h in hrefs)
    # self-contained: no CDN, no server (the SVG's xmlns and metadata name URIs that nothing fetches)
    assert "<script" in page and not re.search(r'(src|href)="(https?:)?//', page) and "<link" not in page
    assert main(["leaderboard", str(results), "--metric", "gflop"]) == 2
    assert "did you mean 'gflops'" in capsys.readouterr().err


def _chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def _headless(page: Path, script: str, tmp_path: Path, size: str = "1280,900") -> str:
    """The DOM of ``page`` after ``script`` ran in it, as headless Chromium at ``size`` sees it."""
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium not installed (Debian: apt-get install -y chromium); .ci/run installs it")
    page.write_text(page.read_text().replace("</body>", f"<script>{script}</script></body>"))
    proc = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
         f"--user-data-dir={tmp_path / 'profile'}", f"--window-size={size}", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=60, env={**os.environ, "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_html_sorts_on_click_in_headless_chromium(results, tmp_path):
    page = tmp_path / "board.html"
    page.write_text(render(load_records(results), "html", link_base=tmp_path))
    # Click the gflops header twice (ascending, then descending) as a user would, then dump the DOM.
    dom = _headless(page, "var th = document.querySelector('th[data-col=\"gflops\"]'); th.click(); th.click();",
                    tmp_path)
    assert 'aria-sort="descending"' in dom
    body = dom.split("<tbody>")[1].split("</tbody>")[0]
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", body, flags=re.S)
    values = [re.findall(r'<td[^>]*data-v="([^"]*)"', row) for row in rows]
    heads = re.findall(r'<th[^>]*data-col="([^"]*)"', dom)
    g = heads.index("gflops")
    seen = [float(v[g]) if v[g] else None for v in values]
    numeric = [v for v in seen if v is not None]
    assert numeric == sorted(numeric, reverse=True) and numeric[0] == 24.2  # sorted by the click
    assert seen[-1] is None  # the failed row, with no figure, stays last


# Where each header cell and the Pareto target lie once laid out, written into the page for --dump-dom.
MEASURE = """
var out = {width: window.innerWidth, height: window.innerHeight, heads: {}};
document.querySelectorAll("#leaderboard th").forEach(function (th) {
  var r = th.getBoundingClientRect();
  out.heads[th.getAttribute("data-col")] = [r.left, r.right];
});
var link = document.querySelector("#leaderboard a.pareto");
link.click();  // a row's Pareto cell: the page jumps to the point, which becomes :target
var point = document.querySelector(":target"), box = point && point.getBBox();
out.target = point && {id: point.id, tag: point.tagName, w: box.width, h: box.height, href: link.getAttribute("href")};
var back = point && point.querySelector("a");
out.back = back && back.getAttribute("xlink:href");
var pre = document.createElement("pre");
pre.id = "measure";
pre.textContent = JSON.stringify(out);
document.body.appendChild(pre);
"""


def test_html_metrics_visible_at_1280_for_a_mixed_backbone_suite(default_suite, tmp_path):
    """The default suite's page (DiT and LaMamba cells) at 1280x900: every metric's column,
    the ranked one first, lies inside the viewport; configuration comes after them."""
    page = tmp_path / "board.html"
    page.write_text(render(load_records(default_suite), "html", link_base=tmp_path))
    dom = _headless(page, MEASURE, tmp_path)
    seen = json.loads(html.unescape(re.search(r'<pre id="measure">(.*?)</pre>', dom, re.S).group(1)))
    assert seen["width"] == 1280
    heads = seen["heads"]
    assert list(heads)[:3] == ["#", "label", "val_loss"]  # rank, label, the ranked metric
    for metric in ("val_loss", "params", "gflops", "latency"):
        left, right = heads[metric]
        assert 0 <= left < right <= 1280, (metric, heads[metric])
    assert "fid" not in heads  # n/a in every row: in the caption, its reason a footnote
    config = [c for c in heads if c.startswith("backbone.")]
    assert config and min(heads[c][0] for c in config) >= max(heads[m][1] for m in ("val_loss", "latency"))
    # the Pareto link lands on an SVG point of the plot, and that point links back to the row
    target = seen["target"]
    assert target["href"] == f"#{target['id']}" and target["id"].startswith("pareto-ablation-")
    assert target["tag"] == "g" and target["w"] > 0 and target["h"] > 0
    assert seen["back"] == "#row-" + target["id"].removeprefix("pareto-")


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
