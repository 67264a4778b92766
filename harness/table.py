"""Tables from records on disk (pandas), with the direction of every metric shown.

Measurements come first: each row starts with a short label of its cell, then the metrics,
then the configuration that tells the cells apart, then the cell id. A human-readable table
(markdown, LaTeX, HTML) keeps long ``n/a`` reasons out of the rows (numbered footnotes under
the table) and moves the columns equal in every row to one caption line; the markdown form
printed by ``harness table`` also splits into stacked tables when it would not fit the width.
"""
from __future__ import annotations

import html
import json
import math
import re
import shutil
import textwrap
from dataclasses import dataclass, field
from typing import Any, Sequence

import pandas as pd

from . import published
from .errors import UserError, suggest

FORMATS = ("markdown", "latex", "csv", "html", "json")
ARROW = {"lower": "↓", "higher": "↑"}
SPREAD_NOTE = "± is half the interquartile range"  # what format_metric's "median ± x" means
UNSTABLE = "unstable"
UNSTABLE_NOTE = "unstable: the spread (IQR/2) is larger than the value, so the timing is mostly noise"
TIME_UNITS = ("ms", "s")  # units whose entries' `iqr` is the spread of the value itself
FOOTNOTE_AFTER = 24  # an n/a reason longer than this goes under the table as a numbered footnote
DEFAULT_WIDTH = 120  # the terminal width assumed when COLUMNS is unset and stdout is no terminal


def markdown_cell(value: Any) -> Any:
    """``value`` as a markdown table cell can hold it: a ``|`` in a label or configuration value
    would start a new column, a line break end the row. Non-text values pass unchanged (the
    table aligns numbers)."""
    if not isinstance(value, str):
        return value
    return value.replace("|", "\\|").replace("\r\n", "<br>").replace("\n", "<br>").replace("\r", "<br>")


def markdown_table(df: pd.DataFrame) -> str:
    """``df`` as a GitHub markdown table, every header and cell escaped (:func:`markdown_cell`)."""
    safe = df.map(markdown_cell)
    safe.columns = [markdown_cell(str(c)) for c in df.columns]
    return safe.to_markdown(index=False)


def _component_label(spec: dict) -> str:
    """``{name: window-attention, window_size: 4}`` -> ``window-attention(window_size=4)``."""
    opts = ",".join(f"{k}={v}" for k, v in sorted(spec.items()) if k != "name")
    return f"{spec['name']}({opts})" if opts else str(spec["name"])


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and "name" in v and prefix:
            # a nested component (a mixer given as a mapping in some cells, a name in others):
            # one column, whichever form the suite used
            out[key] = _component_label(v)
        elif isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        elif isinstance(v, list):
            out[key] = ",".join(x if isinstance(x, str) else json.dumps(x, sort_keys=True) for x in v)
        else:
            out[key] = v
    return out


def metric_value(entry: Any) -> Any:
    return entry.get("value") if isinstance(entry, dict) else entry


def format_metric(name: str, entry: Any) -> str:
    """Human form of one metric: params in millions, latency with its spread."""
    if isinstance(entry, dict) and entry.get("status") == "unavailable":
        return f"n/a ({entry.get('reason', 'unavailable')})"
    value = metric_value(entry)
    if value is None:
        return "n/a"
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return str(value)
    unit = entry.get("unit", "") if isinstance(entry, dict) else ""
    if unit == "params":
        return f"{value / 1e6:.2f}M"
    if unit in TIME_UNITS and isinstance(entry, dict) and isinstance(entry.get("iqr"), (int, float)):
        half = entry["iqr"] / 2  # median ± IQR/2: SPREAD_NOTE says so under the table
        text = f"{value:.2f} ± {half:.2f}"
        return f"{text} ({UNSTABLE})" if half > abs(value) else text
    if math.isfinite(value) and value != 0 and abs(value) < 1e-3:
        return f"{value:.3e}"
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"


def kernels_text(record: dict) -> str:
    """The kernel implementations a record's timings ran on (``selective_scan: compiled-cpu``),
    from the ``kernels`` its timing-sensitive entries (latency) keep."""
    used: dict[str, str] = {}
    for entry in record.get("metrics", {}).values():
        if isinstance(entry, dict) and isinstance(entry.get("kernels"), dict):
            used.update(entry["kernels"])
    return "; ".join(f"{k}: {v}" for k, v in sorted(used.items()))


def notes(df: pd.DataFrame, constant: dict[str, str] | None = None) -> list[str]:
    """The legend under a table: arrows, what "±" means when a cell shows one, and what an
    unstable timing is (``constant``: the caption's cells, which left the frame)."""
    columns = list(df.columns) + list(constant or {})
    values = [str(v) for v in df.to_numpy().ravel()] + list((constant or {}).values())
    out = [f"{a} {d} is better" for d, a in ARROW.items() if any(a in str(c) for c in columns)]
    if any("±" in v for v in values):
        out.append(SPREAD_NOTE)
    if any(f"({UNSTABLE})" in v for v in values):
        out.append(UNSTABLE_NOTE)
    return out


def metric_header(name: str, entries: list[Any]) -> str:
    direction = next((e.get("direction") for e in entries if isinstance(e, dict) and e.get("direction")), None)
    unit = next((e.get("unit") for e in entries if isinstance(e, dict) and e.get("unit")), "")
    unit = {"params": "", "G": ""}.get(unit, unit)
    head = f"{name} ({unit})" if unit else name
    return f"{head} {ARROW[direction]}" if direction in ARROW else head


def paper_column(key: str) -> str:
    """The column of a published figure: ``fid paper`` (a table cell reads ``2.27 (Δ +0.04)``)."""
    return f"{key} paper"


def published_columns(row: dict, record: dict, metric_names: Sequence[str], raw: bool) -> None:
    """Add a record's published figures to its row (in place), each right after ours.

    Formatted: ``<key> paper`` reads ``2.27 (Δ +0.04)``, with ``†`` when outside the tolerance.
    Raw (csv, json): ``<key> paper`` is the published number, ``<key> Δ`` ours minus it,
    ``<key> within tolerance`` true/false (blank without a tolerance). A ``metric.field`` figure
    (``pickscore.change``) gets a column of ours too, since the metric's column shows its value."""
    for key, fig in published.figures(record).items():
        metric, field = published.split(key)
        entry = record["metrics"][metric]
        unit = entry.get("unit", "") if field is None else ""  # a field (a relative change) is a plain number

        def number(v, key=key, unit=unit):
            return format_metric(key, {"value": v, "unit": unit})

        if key not in metric_names:  # metric.field: our figure has no column of its own yet
            row[key] = fig["ours"] if raw else number(fig["ours"])
        if raw:
            row[paper_column(key)] = fig["published"]
            row[f"{key} Δ"] = fig["delta"]
            row[f"{key} within tolerance"] = fig["within"]
        else:
            row[paper_column(key)] = published.format_figure(fig, number)


def place_published(columns: list, keys: Sequence[str], metric_names: Sequence[str]) -> list:
    """Column order with the columns of each published figure right after its metric's."""
    def own(key):
        return [c for c in (key, paper_column(key), f"{key} Δ", f"{key} within tolerance")
                if c in columns and c not in metric_names]

    extra = {key: own(key) for key in keys}
    placed = {c for cols in extra.values() for c in cols}
    out = []
    for c in columns:
        if c in placed:
            continue
        out.append(c)
        for key in keys:
            if published.split(key)[0] == c:
                out.extend(extra[key])
    return out + [c for c in columns if c in placed and c not in out]


def legend_notes(records: list[dict], df: pd.DataFrame) -> list[str]:
    """What the published columns need under a table: what paper and Δ mean, †, the sources."""
    if not any(str(c).endswith(" paper") for c in df.columns):
        return []
    out = [published.LEGEND]
    if any(published.OUTSIDE in str(v) for v in df.to_numpy().ravel()):
        out.append(published.OUTSIDE_NOTE)
    sources = list(dict.fromkeys(s for s in map(published.source, records) if s))
    if sources:
        out.append("sources: " + "; ".join(sources))
    return out


def _label_parts(label: str) -> list[tuple[str, str]]:
    """``backbone.mixer=mamba,train.lr=0.01`` -> [(key, value), ...]; a value may hold commas
    (a list), a key never does, so a part starts only where a ``key=`` follows the comma."""
    parts = re.split(r",(?=[\w.\-]+=)", label)
    return [tuple(p.split("=", 1)) if "=" in p else ("", p) for p in parts]


def _lookup(config: dict, dotted: str) -> Any:
    """The value at a dotted configuration path, None where the record has none."""
    from .suite import _MISSING, _get  # the suite's own reading of a dotted path

    value = _get(config, dotted)
    return None if value is _MISSING else value


def short_label(record: dict, level: int = 0) -> str:
    """A few words that tell a cell from the others of its suite, from the overrides that made
    it (its record's ``label``). ``level`` 0: a name as itself (``window-attention``), a number
    as ``key=value`` with the last key only (``lr=0.01``); 1: names with their key too
    (``mixer=lamamba`` beside ``backbone=lamamba``); 2: a component with its options
    (``mixer=window-attention(window_size=4)``)."""
    label = record.get("label")
    if not isinstance(label, str) or not label:
        return str(record.get("cell", "?"))
    words = []
    for key, value in _label_parts(label):
        node = _lookup(record.get("config") or {}, key) if key else None
        if level >= 2 and isinstance(node, dict) and "name" in node:
            value = _component_label(node)
        last = key.split(".")[-1]
        is_name = isinstance(node, str) or (isinstance(node, dict) and "name" in node)
        words.append(value if not key or (is_name and level == 0) else f"{last}={value}")
    return " ".join(words)


def short_labels(records: list[dict]) -> list[str]:
    """:func:`short_label` of every record, at the lowest level that tells the cells of each
    suite apart (the cell id's first characters are added where even options do not)."""
    labels: list[str] = [""] * len(records)
    by_suite: dict[Any, list[int]] = {}
    for i, r in enumerate(records):
        by_suite.setdefault(r.get("suite"), []).append(i)
    for members in by_suite.values():
        for level in (0, 1, 2):
            words = [short_label(records[i], level) for i in members]
            if len(set(words)) == len(words):
                break
        counts = {w: words.count(w) for w in words}
        for i, w in zip(members, words):
            labels[i] = w if counts[w] == 1 else f"{w} #{str(records[i].get('cell', ''))[:6]}"
    return labels


def build_frame(records: list[dict], columns: Sequence[str] | None = None, raw: bool = False) -> pd.DataFrame:
    """One row per record: its short label, the metrics, then the config keys that differ
    between records and the cell id (the record's file name)."""
    if not records:
        raise UserError("no records found")
    # the published block is shown as figures beside ours (published_columns), not as configuration
    flat = [_flatten({k: v for k, v in r["config"].items() if k not in ("metrics", "published")}) for r in records]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    varying = [k for k in keys if len({json.dumps(f.get(k), default=str) for f in flat}) > 1]
    if not varying:
        varying = [k for k in ("backbone.name",) if k in keys]
    suites = {r["suite"] for r in records}
    seeds = {r.get("seed") for r in records}
    metric_names = list(dict.fromkeys(m for r in records for m in r.get("metrics", {})))
    kernels = [kernels_text(r) for r in records]
    labels = short_labels(records)
    rows = []
    for rec, f, used, label in zip(records, flat, kernels, labels):
        row: dict[str, Any] = {}
        if len(suites) > 1:
            row["suite"] = rec["suite"]
        row["label"] = label
        if len(seeds) > 1:  # replicates of one suite (`harness run --seed`)
            row["seed"] = rec.get("seed")
        for m in metric_names:
            entry = rec.get("metrics", {}).get(m)
            if rec["status"] != "ok" and entry is None:
                row[m] = None if raw else "failed"
            elif raw:
                row[m] = metric_value(entry)
            else:
                row[m] = format_metric(m, entry) if entry is not None else ""
        published_columns(row, rec, metric_names, raw)
        row["status"] = rec["status"]
        if any(kernels):  # which implementation a timing ran on (compiled scan or fallback)
            row["kernels"] = used or None
        for k in varying:
            row[k] = f.get(k)
        row["cell"] = rec["cell"]
        rows.append(row)
    df = pd.DataFrame(rows, dtype=object)  # object: an int column with gaps stays int
    # what a layout may collapse into one line per row when the width is short
    df.attrs["config"] = ["kernels"] + varying + ["cell"]
    df = df.where(df.notna(), None if raw else "")  # a key some backbones lack: blank, not "nan"
    figures = list(dict.fromkeys(k for r in records for k in published.figures(r)))
    df = df[place_published(list(df.columns), figures, metric_names)]
    if (df["status"] == "ok").all():
        df = df.drop(columns="status")
    if not raw:
        entries = {m: [r.get("metrics", {}).get(m) for r in records] for m in metric_names}
        df = df.rename(columns={m: metric_header(m, entries[m]) for m in metric_names})
    if columns:
        available = list(df.columns)
        chosen = []
        for col in columns:
            match = [c for c in available if c == col or c.split(" ")[0] == col]
            if not match:
                raise UserError(f"unknown column {col!r}{suggest(col, [c.split(' ')[0] for c in available])}")
            chosen.extend(match)
        df = df[list(dict.fromkeys(chosen))]
    return df


# -- layout for people: footnotes, caption, width -----------------------------------------
_NA = re.compile(r"^n/a \((.*)\)$", re.S)


@dataclass
class Layout:
    """A formatted frame made to read: long ``n/a`` reasons replaced by ``n/a [k]`` (the
    footnotes hold them), the columns equal in every row taken out (``constant``)."""

    frame: pd.DataFrame
    footnotes: list[str] = field(default_factory=list)  # footnote k is footnotes[k - 1]
    constant: dict[str, str] = field(default_factory=dict)  # column -> the value of every row

    def caption(self) -> str:
        return ("same in every row: " + " · ".join(f"{c}: {v}" for c, v in self.constant.items())
                if self.constant else "")

    def footnote_lines(self) -> list[str]:
        return [f"[{k}] {text}" for k, text in enumerate(self.footnotes, 1)]


def lay_out(df: pd.DataFrame, keep: Sequence[str] = ()) -> Layout:
    """Footnotes for long ``n/a`` reasons (one per distinct reason, numbered in reading order)
    and the caption for columns equal in every row of a table of two rows or more (``keep``:
    columns that stay whatever they hold, such as the label)."""
    notes_of: dict[str, int] = {}

    def short(v):
        m = _NA.match(v) if isinstance(v, str) else None
        if m is None or len(m.group(1)) <= FOOTNOTE_AFTER:
            return v
        k = notes_of.setdefault(v, len(notes_of) + 1)
        return f"n/a [{k}]"

    frame = df.copy()
    for i in range(len(frame)):  # row by row: footnotes numbered in reading order
        for col in frame.columns:
            frame.iat[i, frame.columns.get_loc(col)] = short(frame.iat[i, frame.columns.get_loc(col)])
    constant = {}
    if len(frame) > 1:
        for col in list(frame.columns):
            values = {str(v) for v in frame[col]}
            if col not in keep and len(values) == 1 and values != {""}:
                constant[str(col)] = values.pop()
        frame = frame.drop(columns=list(constant))
    return Layout(frame, list(notes_of), constant)


def terminal_width() -> int:
    """``COLUMNS``, else the terminal's width, else :data:`DEFAULT_WIDTH` (output to a file or pipe)."""
    return shutil.get_terminal_size((DEFAULT_WIDTH, 24)).columns


def _width(df: pd.DataFrame) -> int:
    return max(len(line) for line in markdown_table(df).splitlines())


def _clip(df: pd.DataFrame, col: str, width: int) -> pd.DataFrame:
    """Shorten the text of ``col`` (ending in "…") until ``df`` fits ``width``, down to 8 characters."""
    while _width(df) > width:
        longest = max(len(str(v)) for v in df[col])
        if longest <= 8:
            break
        cut = max(8, longest - (_width(df) - width))
        df = df.copy()
        df[col] = [str(v)[:cut - 1] + "…" if len(str(v)) > cut else v for v in df[col]]
    return df


def split_to_width(df: pd.DataFrame, width: int, lead: Sequence[str]) -> list[pd.DataFrame]:
    """``df`` as stacked tables, each within ``width`` characters and each starting with the
    ``lead`` columns (which row is which); the other columns keep their order, so measurements
    stay in the first table. A single column too wide on its own has its text shortened."""
    lead = [c for c in lead if c in df.columns]
    rest = [c for c in df.columns if c not in lead]
    chunks: list[list[str]] = [[]]
    for col in rest:
        if chunks[-1] and _width(df[lead + chunks[-1] + [col]]) > width:
            chunks.append([])
        chunks[-1].append(col)
    tables = []
    for chunk in chunks:
        part = df[lead + chunk]
        for col in reversed(chunk if _width(part) > width else []):
            if not _NA.match(str(part[col].iloc[0])):
                part = _clip(part, col, width)
        tables.append(part)
    return tables


def collapsed(df: pd.DataFrame, lead: Sequence[str], columns: Sequence[str]) -> list[str]:
    """``columns`` of each row as one line, ``- label: key=value, ...`` (blank values left out)."""
    lines = []
    for _, row in df.iterrows():
        name = " / ".join(str(row[c]) for c in lead)
        pairs = [f"{c}={row[c]}" for c in columns if str(row[c]) != ""]
        lines.append(f"- {name}: {', '.join(pairs)}")
    return lines


def _wrapped(lines: list[str], width: int | None) -> str:
    if width is None:
        return "\n".join(lines)
    return "\n".join(textwrap.fill(line, width, subsequent_indent="    ", break_long_words=False,
                                   break_on_hyphens=False) for line in lines)


def render(records: list[dict], fmt: str = "markdown", columns: Sequence[str] | None = None,
           width: int | None = None) -> str:
    """The records as a table in ``fmt``. ``width`` (markdown only): split into stacked tables
    that fit it, as ``harness table`` does for the terminal."""
    if fmt not in FORMATS:
        raise UserError(f"unknown table format {fmt!r}{suggest(fmt, FORMATS)}")
    raw = fmt in ("csv", "json")
    df = build_frame(records, columns, raw=raw)
    if fmt == "csv":
        return df.to_csv(index=False).rstrip("\n")
    if fmt == "json":
        return df.to_json(orient="records", indent=2)
    lead = [c for c in ("suite", "label", "seed") if c in df.columns]
    # columns a user named with --columns stay in the table, equal in every row or not
    layout = lay_out(df, keep=lead + ["cell"] + (list(df.columns) if columns else []))
    legend = " · ".join(notes(layout.frame, layout.constant) + legend_notes(records, df))
    under = [line for line in (legend, layout.caption()) if line] + layout.footnote_lines()
    if fmt == "markdown":
        frames, config_lines = [layout.frame], []
        if width and _width(layout.frame) > width:
            # measurements stay in tables (stacked when even they are too wide); the configuration
            # that tells the cells apart becomes one line per row under them
            config = [c for c in layout.frame.columns if c in df.attrs.get("config", ())]
            frames = split_to_width(layout.frame.drop(columns=config), width, lead)
            config_lines = collapsed(layout.frame, lead, config)
        text = "\n\n".join(markdown_table(f) for f in frames)
        if config_lines:
            text += "\n\n" + _wrapped(["cells:"] + config_lines, width)
        return text + ("\n\n" + _wrapped(under, width) if under else "")
    if fmt == "latex":  # what goes under the table as comments, as the leaderboard's: the caption is the author's
        return layout.frame.to_latex(index=False, escape=True) + "".join(f"% {line}\n" for line in under)
    body = layout.frame.to_html(index=False, border=0)
    return body + "".join(f"\n<p>{html.escape(line)}</p>" for line in under)
