"""Tables from records on disk (pandas), with the direction of every metric shown."""
from __future__ import annotations

import json
import math
from typing import Any, Sequence

import pandas as pd

from .errors import UserError, suggest

FORMATS = ("markdown", "latex", "csv", "html", "json")
ARROW = {"lower": "↓", "higher": "↑"}


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
        return f"{value:.2f} ± {entry['iqr'] / 2:.2f}"
    if math.isfinite(value) and value != 0 and abs(value) < 1e-3:
        return f"{value:.3e}"
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"


def metric_header(name: str, entries: list[Any]) -> str:
    direction = next((e.get("direction") for e in entries if isinstance(e, dict) and e.get("direction")), None)
    unit = next((e.get("unit") for e in entries if isinstance(e, dict) and e.get("unit")), "")
    unit = {"params": "", "G": ""}.get(unit, unit)
    head = f"{name} ({unit})" if unit else name
    return f"{head} {ARROW[direction]}" if direction in ARROW else head


def build_frame(records: list[dict], columns: Sequence[str] | None = None, raw: bool = False) -> pd.DataFrame:
    """One row per record: the config keys that differ between records, then the metrics."""
    if not records:
        raise UserError("no records found")
    flat = [_flatten({k: v for k, v in r["config"].items() if k != "metrics"}) for r in records]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    varying = [k for k in keys if len({json.dumps(f.get(k), default=str) for f in flat}) > 1]
    if not varying:
        varying = [k for k in ("backbone.name",) if k in keys]
    suites = {r["suite"] for r in records}
    seeds = {r.get("seed") for r in records}
    metric_names = list(dict.fromkeys(m for r in records for m in r.get("metrics", {})))
    rows = []
    for rec, f in zip(records, flat):
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
        rows.append(row)
    df = pd.DataFrame(rows, dtype=object)  # object: an int column with gaps stays int
    df = df.where(df.notna(), None if raw else "")  # a key some backbones lack: blank, not "nan"
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
    if fmt == "markdown":
        arrows = " · ".join(f"{a} {d} is better" for d, a in ARROW.items() if any(a in c for c in df.columns))
        return df.to_markdown(index=False) + (f"\n\n{arrows}" if arrows else "")
    if fmt == "latex":
        return df.to_latex(index=False, escape=True)
    if fmt == "html":
        return df.to_html(index=False, border=0)
    if fmt == "csv":
        return df.to_csv(index=False).rstrip("\n")
    return df.to_json(orient="records", indent=2)
