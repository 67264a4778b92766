"""Leaderboard: every record under a results folder in one ranked table.

Built on :mod:`harness.table` (same rows, same formatting of figures) and adds what a
leaderboard needs: a ranking metric, the best value of every column marked, the direction
of every metric in its header, and a link from each row to the record it came from. The
HTML form is one self-contained page (inline CSS and JS, no CDN) that sorts on a click and
opens from disk without a server.
"""
from __future__ import annotations

import html
import json
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import UserError, suggest
from .table import ARROW, SPREAD_NOTE, build_frame, metric_header

FORMATS = ("markdown", "latex", "csv", "html")


def metric_roles(records: list[dict]) -> dict[str, str]:
    """Each metric's role ("cost" or "quality") as its records state it; for records written
    before entries carried one, as the installed metric declares (else "quality")."""
    roles: dict[str, str] = {}
    for r in records:
        for name, entry in (r.get("metrics") or {}).items():
            if isinstance(entry, dict) and entry.get("role") in ("cost", "quality"):
                roles.setdefault(name, entry["role"])
    names = {m for r in records for m in (r.get("metrics") or {})}
    for name in sorted(names - set(roles)):
        roles[name] = _declared_role(name)
    return roles


def _declared_role(name: str) -> str:
    try:
        from .plugins import registry

        component = registry().components("metric").get(name)
        factory = component.factory if component is not None else None  # a reference is imported here
    except Exception:  # a broken plugin must not stop a table of records on disk
        factory = None
    role = getattr(factory, "role", None)
    return role if role in ("cost", "quality") else "quality"


@dataclass
class Board:
    """A ranked leaderboard: formatted and raw frames with the same rows, plus the marks."""

    shown: pd.DataFrame            # formatted figures, columns renamed to headers
    raw: pd.DataFrame              # raw values, metric columns under their names
    metrics: dict[str, str]        # metric name -> header
    directions: dict[str, str | None]
    best: dict[str, set[int]]      # metric name -> row positions holding the best value
    links: list[str | None]        # row position -> path of its record (relative)
    rank_by: str | None
    id_columns: list[str] = field(default_factory=list)


def _number(v) -> float | None:
    """A finite float, or None; pandas hands back numpy scalars, which are Numbers too."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        return None
    return float(v) if math.isfinite(v) else None


def build(records: list[dict], metric: str | None = None, link_base: str | Path | None = None) -> Board:
    """Rank ``records`` by ``metric`` (default: the first quality metric with a direction)."""
    if not records:
        raise UserError("no records found")
    names = list(dict.fromkeys(m for r in records for m in r.get("metrics", {})))
    entries = {m: [r.get("metrics", {}).get(m) for r in records] for m in names}
    directions = {m: next((e.get("direction") for e in entries[m] if isinstance(e, dict) and e.get("direction")),
                          None) for m in names}
    if metric is not None and metric not in names:
        raise UserError(f"unknown metric {metric!r} in these records{suggest(metric, names)}")
    if metric is None:
        ranked = [m for m in names if directions[m] in ARROW]
        roles = metric_roles(records)  # a leaderboard ranks by quality when it has a choice
        metric = next((m for m in ranked if roles[m] != "cost"), ranked[0] if ranked else None)
    elif directions[metric] not in ARROW:
        raise UserError(f"metric {metric!r} has no direction (lower or higher is better); cannot rank by it")

    raw = build_frame(records, raw=True)
    shown = build_frame(records)
    headers = {m: metric_header(m, entries[m]) for m in names}
    ok = [r["status"] == "ok" for r in records]

    order = list(range(len(records)))
    if metric is not None:
        sign = 1 if directions[metric] == "lower" else -1

        def key(i):
            v = _number(raw.iloc[i][metric])
            return (not ok[i], v is None, sign * v if v is not None else 0.0)

        order.sort(key=key)
    raw = raw.iloc[order].reset_index(drop=True)
    shown = shown.iloc[order].reset_index(drop=True)
    ok = [ok[i] for i in order]
    paths = [records[i].get("_path") for i in order]

    best: dict[str, set[int]] = {}
    for m in names:
        if directions[m] not in ARROW:
            continue
        values = {i: _number(v) for i, v in enumerate(raw[m]) if ok[i]}
        values = {i: v for i, v in values.items() if v is not None}
        if not values:
            continue
        target = (min if directions[m] == "lower" else max)(values.values())
        best[m] = {i for i, v in values.items() if math.isclose(v, target, rel_tol=1e-9, abs_tol=0.0)}

    base = Path(link_base) if link_base is not None else Path.cwd()
    links = [os.path.relpath(Path(p).resolve(), base.resolve()) if p else None for p in paths]
    id_columns = [c for c in shown.columns if c not in headers.values()]
    return Board(shown, raw, headers, directions, best, links, metric, id_columns)


def _text(v) -> str:
    """A config value as written: pandas turns an int column with gaps into floats (2.0)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))
    return str(v)


def _legend(board: Board, best_mark: str) -> str:
    parts = [f"{a} {d} is better" for d, a in ARROW.items() if d in board.directions.values()]
    if any("±" in str(v) for v in board.shown.to_numpy().ravel()):
        parts.append(SPREAD_NOTE)
    parts.append(f"{best_mark}: best in column")
    if board.rank_by:
        parts.append(f"ranked by {board.rank_by}")
    return " · ".join(parts)


def _marked(board: Board, wrap, link) -> pd.DataFrame:
    """The formatted frame with best cells wrapped and the cell id turned into a link."""
    df = board.shown.copy().astype(object)
    for col in board.id_columns:  # a config key a backbone does not have: blank, not "nan"
        df[col] = [_text(v) for v in df[col]]
    for m, rows in board.best.items():
        col = board.metrics[m]
        for i in rows:
            df.at[i, col] = wrap(df.at[i, col])
    df["cell"] = [link(c, p) if p else c for c, p in zip(df["cell"], board.links)]
    df.insert(0, "#", range(1, len(df) + 1))
    return df


# -- formats ------------------------------------------------------------------------------
def to_markdown(board: Board) -> str:
    df = _marked(board, lambda v: f"**{v}**", lambda c, p: f"[{c}]({p.replace(' ', '%20')})")
    return df.to_markdown(index=False) + "\n\n" + _legend(board, "**bold**")


_LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
          "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
          "↓": r"$\downarrow$", "↑": r"$\uparrow$", "±": r"$\pm$"}


def _tex(v) -> str:
    return "".join(_LATEX.get(ch, ch) for ch in str(v))


def to_latex(board: Board) -> str:
    """A tabular for papers; row links use hyperref's \\href."""
    df = _marked(board, lambda v: rf"\textbf{{{_tex(v)}}}", lambda c, p: rf"\href{{{p}}}{{{_tex(c)}}}")
    for col in df.columns:
        if col == "cell":
            continue
        done = {board.metrics[m] for m in board.best}
        df[col] = [v if (col in done and str(v).startswith(r"\textbf")) else _tex(v) for v in df[col]]
    df.columns = [_tex(c) for c in df.columns]
    return df.to_latex(index=False, escape=False) + "% " + _tex(_legend(board, "bold"))


def to_csv(board: Board) -> str:
    """Raw values for further analysis; headers carry the direction, `best` the marks."""
    df = board.raw.copy()
    df = df.rename(columns=board.metrics)
    df.insert(0, "rank", range(1, len(df) + 1))
    df["best"] = [";".join(m for m in board.metrics if i in board.best.get(m, ())) for i in range(len(df))]
    df["record"] = board.links
    return df.to_csv(index=False).rstrip("\n")


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; }}
th, td {{ padding: .3em .7em; border-bottom: 1px solid #ddd; text-align: left; white-space: nowrap; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
th {{ cursor: pointer; user-select: none; background: #f4f4f4; }}
th[aria-sort=ascending]::after {{ content: " \\25B4"; }}
th[aria-sort=descending]::after {{ content: " \\25BE"; }}
td.best {{ font-weight: bold; background: #e8f5e9; }}
tr.failed td {{ color: #b71c1c; }}
p.legend {{ color: #555; }}
</style></head><body>
<h1>{title}</h1>
<p class="legend">{legend}. Click a column header to sort; click again to reverse.</p>
<table id="leaderboard"><thead><tr>{head}</tr></thead>
<tbody>
{body}
</tbody></table>
<script>
// Sort on header click: numbers by their raw value (data-v), text otherwise; empty last.
(function () {{
  var table = document.getElementById("leaderboard");
  var heads = table.tHead.rows[0].cells;
  function value(row, i) {{
    var c = row.cells[i], v = c.getAttribute("data-v");
    return v === null || v === "" ? null : (c.classList.contains("num") ? parseFloat(v) : v);
  }}
  Array.prototype.forEach.call(heads, function (th, i) {{
    th.addEventListener("click", function () {{
      var asc = th.getAttribute("aria-sort") !== "ascending";
      Array.prototype.forEach.call(heads, function (h) {{ h.removeAttribute("aria-sort"); }});
      th.setAttribute("aria-sort", asc ? "ascending" : "descending");
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {{
        var x = value(a, i), y = value(b, i);
        if (x === null || y === null) return (x === null) - (y === null);
        var d = typeof x === "number" ? x - y : String(x).localeCompare(String(y));
        return asc ? d : -d;
      }});
      rows.forEach(function (r) {{ body.appendChild(r); }});
    }});
  }});
}})();
</script>
</body></html>
"""


def to_html(board: Board, title: str = "Leaderboard") -> str:
    e = html.escape
    names = {h: m for m, h in board.metrics.items()}
    columns = ["#"] + list(board.shown.columns)
    head = "".join(f'<th data-col="{e(names.get(c, c))}" title="click to sort">{e(str(c))}</th>' for c in columns)
    rows = []
    for i in range(len(board.shown)):
        status = board.raw.iloc[i].get("status", "ok")
        cells = [f'<td class="num" data-v="{i + 1}">{i + 1}</td>']
        for col in board.shown.columns:
            text = board.shown.iloc[i][col]
            text = _text(text)
            metric = names.get(col)
            raw = board.raw.iloc[i][metric if metric else col]
            num = _number(raw) if col != "cell" else None  # config values like patch sort as numbers too
            classes = (["num"] if num is not None else []) + (["best"] if i in board.best.get(metric, ()) else [])
            sort_value = repr(num) if num is not None else ("" if metric else text)
            inner = e(text)
            if col == "cell" and board.links[i]:
                inner = f'<a href="{e(Path(board.links[i]).as_posix())}">{inner}</a>'
            cls = f' class="{" ".join(classes)}"' if classes else ""
            cells.append(f'<td{cls} data-v="{e(sort_value)}">{inner}</td>')
        row_cls = ' class="failed"' if status != "ok" else ""
        rows.append(f'<tr{row_cls}>{"".join(cells)}</tr>')
    return _PAGE.format(title=e(title), legend=e(_legend(board, "bold")), head=head, body="\n".join(rows))


def render(records: list[dict], fmt: str = "markdown", metric: str | None = None,
           link_base: str | Path | None = None, title: str = "Leaderboard") -> str:
    if fmt not in FORMATS:
        raise UserError(f"unknown leaderboard format {fmt!r}{suggest(fmt, FORMATS)}")
    board = build(records, metric, link_base)
    if fmt == "html":
        return to_html(board, title)
    return {"markdown": to_markdown, "latex": to_latex, "csv": to_csv}[fmt](board)
