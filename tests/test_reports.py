"""What a reader sees first: `harness table` within the terminal's width, footnotes and a
caption instead of repeated reasons, unstable timings flagged, `harness ls` and `harness
plugins` at 80 columns with every name whole."""
from __future__ import annotations

import json
import re

import pytest

from harness.cli import listing_lines, main, plain, plugin_lines
from harness.records import load_records
from harness.table import format_metric, render, short_labels

from test_leaderboard import DEFAULT_CELLS, FID_REASON, write_default_suite


def _no_terminal(*args):
    raise OSError(25, "Inappropriate ioctl for device")


@pytest.fixture
def default_suite(tmp_path):
    return write_default_suite(tmp_path / "results")


@pytest.mark.parametrize("columns", [None, "120", "80"])
def test_table_of_the_default_suite_fits_the_width(default_suite, monkeypatch, capsys, columns):
    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
        monkeypatch.setattr("os.get_terminal_size", _no_terminal)  # output to a file or a pipe: 120
    else:
        monkeypatch.setenv("COLUMNS", columns)
    assert main(["table", str(default_suite)]) == 0
    out = capsys.readouterr().out
    width = int(columns or 120)
    assert max(len(line) for line in out.splitlines()) <= width
    first = out.split("\n\n")[0].splitlines()
    header = [c.strip() for c in first[0].strip("|").split("|")]
    assert header[:2] == ["label", "params ↓"] and "val_loss ↓" in out.split("\n\n")[1 if width < 100 else 0]
    labels = [line.strip("|").split("|")[0].strip() for line in first[2:]]
    assert labels == ["mixer=attention", "mixer=window-attention", "mixer=mamba", "mixer=ss2d", "mixer=lamamba",
                      "backbone=lamamba"]
    # the 140-character reason once, as footnote 1; fid (n/a in every row) in the caption
    assert out.count(FID_REASON[:40]) == 1 and "same in every row: fid ↓: n/a [1]" in out
    assert re.search(r"^\[1\] n/a \(no Inception weights", out, re.M)
    # what the cells are made of is still there, one line per cell
    assert "- mixer=window-attention: " in out and "backbone.mixer=window-attention(window_size=4)" in out.replace(
        "\n    ", " ")


def test_wide_enough_keeps_one_table(default_suite):
    text = render(load_records(default_suite), "markdown", width=400)
    table = text.split("\n\n")[0].splitlines()
    assert len(table) == 2 + len(DEFAULT_CELLS) and "backbone.mixer" in table[0] and "cells:" not in text
    head = [c.strip() for c in table[0].strip("|").split("|")]
    assert head.index("val_loss ↓") < head.index("backbone.name") < head.index("cell")  # metrics first


def test_short_reasons_stay_in_the_row_and_single_rows_keep_their_columns(default_suite):
    records = load_records(default_suite)[:1]
    records[0]["metrics"]["fid"]["reason"] = "no reference"
    text = render(records, "markdown")
    assert "n/a (no reference)" in text.splitlines()[2] and "same in every row" not in text


def test_spread_larger_than_its_value_is_flagged():
    steady = {"value": 9.45, "iqr": 2.0, "unit": "ms"}
    noisy = {"value": 9.45, "iqr": 81.42, "unit": "ms"}
    assert format_metric("latency", steady) == "9.45 ± 1.00"
    assert format_metric("latency", noisy) == "9.45 ± 40.71 (unstable)"
    assert format_metric("sample_latency", {"value": 0.5, "iqr": 1.2, "unit": "s"}) == "0.50 ± 0.60 (unstable)"
    # throughput's iqr is its latency's, in seconds: no spread printed beside images/s
    assert format_metric("throughput", {"value": 3.0, "iqr": 9.0, "unit": "images/s"}) == "3"


def test_unstable_is_explained_under_the_table(default_suite):
    text = render(load_records(default_suite), "markdown")
    assert "9.45 ± 40.71 (unstable)" in text
    assert "unstable: the spread (IQR/2) is larger than the value" in text


def test_labels_are_unique_per_suite():
    def rec(label, config, cell):
        return {"suite": "s", "cell": cell, "label": label, "config": config}

    a = rec("backbone.mixer=window-attention", {"backbone": {"mixer": {"name": "window-attention", "window_size": 4}}},
            "aaaaaaaaaaaa")
    b = rec("backbone.mixer=window-attention", {"backbone": {"mixer": {"name": "window-attention", "window_size": 8}}},
            "bbbbbbbbbbbb")
    c = rec("train.lr=0.01,backbone.mixer=mamba", {"train": {"lr": 0.01}, "backbone": {"mixer": "mamba"}}, "c")
    assert short_labels([c]) == ["lr=0.01 mamba"]
    assert short_labels([a, b]) == ["mixer=window-attention(window_size=4)", "mixer=window-attention(window_size=8)"]
    assert short_labels([a, a | {"cell": "dddddddddddd"}]) == ["mixer=window-attention(window_size=4) #aaaaaa",
                                                              "mixer=window-attention(window_size=4) #dddddd"]
    assert short_labels([{"suite": "s", "cell": "0123", "config": {}}]) == ["0123"]  # a record without a label


def test_plugins_at_80_columns_prints_every_name_whole(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 80 and "…" not in out
    words = set(re.findall(r"[\w.-]+", out))
    assert main(["plugins", "--json"]) == 0
    names = {c.split(":", 1)[1] for p in json.loads(capsys.readouterr().out) for c in p["components"]}
    assert {"window-attention", "magnitude", "normalized-feature-kd", "sample_latency"} <= names
    assert names <= words  # every component of every plugin, whole
    assert "  mixer: attention, lamamba, mamba, ss2d, window-attention" in out


def test_plugin_lines_wrap_between_names():
    rows = [{"name": "p", "distribution": "d", "version": "1", "hooks": ["harness_metrics"],
             "components": [f"metric:a-rather-long-metric-name-{i}" for i in range(6)]}]
    lines = plugin_lines(rows, 50)
    joined = " ".join(line.strip() for line in lines)
    assert all(f"a-rather-long-metric-name-{i}" in joined.split(" ") or f"a-rather-long-metric-name-{i}," in
               joined.split(" ") for i in range(6))
    assert max(len(line) for line in lines) <= 50


def test_ls_at_80_columns_one_line_per_component(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 80 and "`" not in out
    assert "  window-attention " in out and "  normalized-feature-kd " in out
    assert main(["ls", "--json"]) == 0
    components = json.loads(capsys.readouterr().out)
    kinds = {c["kind"] for c in components}
    assert len(lines) == len(components) + len(kinds) + 1  # a heading per kind, a line each, the hint


def test_listing_cuts_long_descriptions_with_an_ellipsis():
    rows = [{"kind": "metric", "name": "x", "plugin": "p", "description": "word " * 40}]
    line = listing_lines(rows, 40)[1]
    assert len(line) == 40 and line.endswith("…")


def test_docstrings_as_plain_text():
    text = "``directions`` 2 adds :func:`harness.flops.count` and `x`"
    assert plain(text) == "directions 2 adds harness.flops.count and x"
    assert plain(":class:`~harness.Lazy` and `a` b") == "harness.Lazy and a b"
