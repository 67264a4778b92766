"""Tables from records on disk (pandas), with the direction of every metric shown."""
from __future__ import annotations

import html
import json
import math
from typing import Any, Sequence

import pandas as pd

from . import published
from .errors import UserError, suggest

FORMATS = ("markdown", "latex", "csv", "html", "json")
ARROW = {"lower": "↓", "higher": "↑"}
SPREAD_NOTE = "± is half the interquartile range"  # what format_metric's "median ± x" means


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
    if unit == "ms" and isinstance(entry, dict) and entry.get("iqr") is not None:
        return f"{value:.2f} ± {entry['iqr'] / 2:.2f}"  # median ± IQR/2: SPREAD_NOTE says so under the table
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


def notes(df: pd.DataFrame) -> list[str]:
    """The legend under a table: arrows, and what "±" means when a cell shows one."""
    out = [f"{a} {d} is better" for d, a in ARROW.items() if any(a in str(c) for c in df.columns)]
    if any("±" in str(v) for v in df.to_numpy().ravel()):
        out.append(SPREAD_NOTE)
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


def build_frame(records: list[dict], columns: Sequence[str] | None = None, raw: bool = False) -> pd.DataFrame:
    """One row per record: the config keys that differ between records, then the metrics."""
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
    # which implementation a latency ran on (compiled scan or fallback) goes right after it
    kernels_after = next((m for m in metric_names
                          if any(isinstance(r.get("metrics", {}).get(m), dict) and r["metrics"][m].get("kernels")
                                 for r in records)), None)
    rows = []
    for rec, f, used in zip(records, flat, kernels):
        row: dict[str, Any] = {}
        if len(suites) > 1:
            row["suite"] = rec["suite"]
        row["cell"] = rec["cell"]
        if len(seeds) > 1:  # replicates of one suite (`harness run --seed`)
            row["seed"] = rec.get("seed")
        for k in varying:
            row[k] = f.get(k)
        row["status"] = rec["status"]
        for m in metric_names:
            entry = rec.get("metrics", {}).get(m)
            if rec["status"] != "ok" and entry is None:
                row[m] = None if raw else "failed"
            elif raw:
                row[m] = metric_value(entry)
            else:
                row[m] = format_metric(m, entry) if entry is not None else ""
            if m == kernels_after:
                row["kernels"] = used or None
        published_columns(row, rec, metric_names, raw)
        rows.append(row)
    df = pd.DataFrame(rows, dtype=object)  # object: an int column with gaps stays int
    df = df.where(df.notna(), None if raw else "")  # a key some backbones lack: blank, not "nan"
    keys = list(dict.fromkeys(k for r in records for k in published.figures(r)))
    df = df[place_published(list(df.columns), keys, metric_names)]
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


def render(records: list[dict], fmt: str = "markdown", columns: Sequence[str] | None = None) -> str:
    if fmt not in FORMATS:
        raise UserError(f"unknown table format {fmt!r}{suggest(fmt, FORMATS)}")
    raw = fmt in ("csv", "json")
    df = build_frame(records, columns, raw=raw)
    legend = " · ".join(notes(df) + legend_notes(records, df)) if not raw else ""
    if fmt == "markdown":
        return markdown_table(df) + (f"\n\n{legend}" if legend else "")
    if fmt == "latex":  # the legend as a comment, as the leaderboard's: the caption is the author's
        return df.to_latex(index=False, escape=True) + (f"% {legend}\n" if legend else "")
    if fmt == "html":
        return df.to_html(index=False, border=0) + (f"\n<p>{html.escape(legend)}</p>" if legend else "")
    if fmt == "csv":
        return df.to_csv(index=False).rstrip("\n")
    return df.to_json(orient="records", indent=2)
