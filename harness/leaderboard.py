"""Leaderboard: every record under a results folder in one ranked table.

Built on :mod:`harness.table` (same rows, same formatting of figures) and adds what a
leaderboard needs: a ranking metric, the best value of every column marked, the direction
of every metric in its header, and a link from each row to the record it came from. Every
format reads measurements first: rank, the cell's short label, the ranking metric, the other
metrics, then the configuration. The HTML form is one self-contained page (inline CSS, JS
and SVG, no CDN) that sorts on a click, opens from disk without a server, and links each
row to its point on a Pareto plot of the ranking metric against a cost (and back).
"""
from __future__ import annotations

import html
import math
import numbers
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import UserError, suggest
from .table import ARROW, Layout, build_frame, lay_out, legend_notes, markdown_table, metric_header, notes

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
    """A ranked leaderboard: formatted and raw frames with the same rows, plus the marks.

    Columns: the short label of each cell, the ranking metric, the other metrics, then the
    configuration (see :func:`harness.table.build_frame`); a format adds the rank in front."""

    shown: pd.DataFrame            # formatted figures, columns renamed to headers
    raw: pd.DataFrame              # raw values, metric columns under their names
    metrics: dict[str, str]        # metric name -> header
    directions: dict[str, str | None]
    best: dict[str, set[int]]      # metric name -> row positions holding the best value
    links: list[str | None]        # row position -> path of its record (relative)
    rank_by: str | None
    id_columns: list[str] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)  # in rank order
    notes: list[str] = field(default_factory=list)  # what the published columns need said under the table

    @property
    def lead(self) -> list[str]:
        """The columns that say which row is which, whatever the others hold."""
        return [c for c in ("#", "suite", "label", "seed") if c in self.shown.columns or c == "#"]


def _number(v) -> float | None:
    """A finite float, or None; pandas hands back numpy scalars, which are Numbers too."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        return None
    return float(v) if math.isfinite(v) else None


def _metrics_first(df: pd.DataFrame, first: str | None, metric: str | None) -> pd.DataFrame:
    """The ranking metric's column (``first``), and its published figure's, right after the
    label: the figure the rank stands for."""
    if first is None or first not in df.columns:
        return df
    cols = list(df.columns)
    at = cols.index(first)
    moving = [first] + [c for c in cols[at + 1:] if str(c).startswith(f"{metric} ")]  # its published figure
    cols = [c for c in cols if c not in moving]
    at = max(cols.index(c) for c in ("suite", "label", "seed") if c in cols) + 1
    return df[cols[:at] + moving + cols[at:]]


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

    headers = {m: metric_header(m, entries[m]) for m in names}
    raw = _metrics_first(build_frame(records, raw=True), metric, metric)
    shown = _metrics_first(build_frame(records), headers.get(metric), metric)
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
    ranked_records = [records[i] for i in order]
    paths = [r.get("_path") for r in ranked_records]

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
    return Board(shown, raw, headers, directions, best, links, metric, id_columns, ranked_records,
                 legend_notes(records, shown))


def _text(v) -> str:
    """A config value as written: pandas turns an int column with gaps into floats (2.0)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))
    return str(v)


def _layout(board: Board) -> Layout:
    """The shown frame with the rank in front, config values as written, long n/a reasons as
    footnotes and the columns equal in every row moved to the caption."""
    df = board.shown.copy().astype(object)
    for col in board.id_columns:  # a config key a backbone does not have: blank, not "nan"
        df[col] = [_text(v) for v in df[col]]
    df.insert(0, "#", range(1, len(df) + 1))
    return lay_out(df, keep=board.lead + ["cell"])


def _under(board: Board, layout: Layout, best_mark: str) -> list[str]:
    """The lines under a table: the legend, the caption, the footnotes."""
    parts = notes(layout.frame, layout.constant)
    parts.append(f"{best_mark}: best in column")
    if board.rank_by:
        parts.append(f"ranked by {board.rank_by}")
    caption = [layout.caption()] if layout.constant else []
    return [" · ".join(parts + board.notes)] + caption + layout.footnote_lines()


def _marked(board: Board, layout: Layout, wrap, link) -> pd.DataFrame:
    """The laid-out frame with best cells wrapped and each label turned into a link to its record."""
    df = layout.frame.copy()
    for m, rows in board.best.items():
        col = board.metrics[m]
        if col in df.columns:
            for i in rows:
                df.at[i, col] = wrap(df.at[i, col])
    df["label"] = [link(c, p) if p else c for c, p in zip(df["label"], board.links)]
    return df


# -- formats ------------------------------------------------------------------------------
def to_markdown(board: Board) -> str:
    layout = _layout(board)
    df = _marked(board, layout, lambda v: f"**{v}**", lambda c, p: f"[{c}]({p.replace(' ', '%20')})")
    return markdown_table(df) + "\n\n" + "\n\n".join(_under(board, layout, "**bold**"))  # a paragraph each


_LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
          "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
          "↓": r"$\downarrow$", "↑": r"$\uparrow$", "±": r"$\pm$",
          "Δ": r"$\Delta$", "−": r"$-$", "†": r"$^\dagger$"}


def _tex(v) -> str:
    return "".join(_LATEX.get(ch, ch) for ch in str(v))


def to_latex(board: Board) -> str:
    """A tabular for papers; row links use hyperref's \\href."""
    layout = _layout(board)
    df = _marked(board, layout, lambda v: rf"\textbf{{{_tex(v)}}}", lambda c, p: rf"\href{{{p}}}{{{_tex(c)}}}")
    done = {board.metrics[m] for m in board.best}
    for col in df.columns:
        if col == "label":
            continue
        df[col] = [v if (col in done and str(v).startswith(r"\textbf")) else _tex(v) for v in df[col]]
    df.columns = [_tex(c) for c in df.columns]
    under = "\n".join(f"% {_tex(line)}" for line in _under(board, layout, "bold"))
    return df.to_latex(index=False, escape=False) + under


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
div.scroll {{ overflow-x: auto; }}
table {{ border-collapse: collapse; }}
th, td {{ padding: .3em .7em; border-bottom: 1px solid #ddd; text-align: left; white-space: nowrap; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
th {{ cursor: pointer; user-select: none; background: #f4f4f4; }}
th.config {{ color: #666; font-weight: normal; }}
td.config {{ color: #555; }}
th[aria-sort=ascending]::after {{ content: " \\25B4"; }}
th[aria-sort=descending]::after {{ content: " \\25BE"; }}
td.best {{ font-weight: bold; background: #e8f5e9; }}
td.off {{ color: #b71c1c; }}
tr.failed td {{ color: #b71c1c; }}
tr:target td {{ background: #fff3c4; }}
p.legend, p.caption, ol.notes {{ color: #555; }}
#pareto svg {{ max-width: 100%; height: auto; }}
#pareto g:target {{ filter: drop-shadow(0 0 4px #000); }}
</style></head><body>
<h1>{title}</h1>
<p class="legend">{legend}. Click a column header to sort; click again to reverse.</p>
<div class="scroll"><table id="leaderboard"><thead><tr>{head}</tr></thead>
<tbody>
{body}
</tbody></table></div>
{under}
{pareto}
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


def anchor(record: dict) -> str:
    """A record's id in the page (``row-<anchor>``) and in the Pareto plot (``pareto-<anchor>``)."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", f"{record.get('suite')}-{record.get('cell')}")


def pareto_axes(records: list[dict], quality: str | None) -> tuple[str, str] | None:
    """The page's Pareto plot: ``quality`` (the ranking metric) against a cost (GFLOPs when
    recorded, else the first cost metric with a direction); None when there is no such pair."""
    roles = metric_roles(records)
    directed = [m for m in roles if any(isinstance(e := (r.get("metrics") or {}).get(m), dict) and e.get("direction")
                                        in ARROW for r in records)]
    costs = [m for m in directed if roles[m] == "cost" and m != quality]
    if quality is None or quality not in directed or not costs:
        return None
    return ("gflops" if "gflops" in costs else costs[0]), quality


PARETO_COLUMN = "Pareto"


def _pareto(board: Board) -> tuple[str, dict[int, str]]:
    """The page's Pareto section (inline SVG: each point links to its row and is the target of
    the row's link) and each plotted row's place: "front" or "behind" (another cell beats it
    on both axes)."""
    axes = pareto_axes(board.records, board.rank_by)
    if axes is None:
        return "", {}
    from .plot import pareto_svg

    x, y = axes
    try:
        svg, plotted, front = pareto_svg(board.records, x, y, [anchor(r) for r in board.records])
    except UserError:  # no ok record has both figures: no plot, the table stands alone
        return "", {}
    place = {i: ("front" if i in front else "behind") for i in plotted}
    section = (f'<section id="pareto"><h2>Pareto position: {html.escape(y)} against {html.escape(x)}</h2>\n'
               f'<p class="legend">Red points: the Pareto front (no other cell is better on both). '
               f'A row\'s &ldquo;{PARETO_COLUMN}&rdquo; cell links to its point; a point links back to its row.</p>\n'
               f"{svg}</section>")
    return section, place


def to_html(board: Board, title: str = "Leaderboard") -> str:
    e = html.escape
    layout = _layout(board)
    names = {h: m for m, h in board.metrics.items()}
    pareto, place = _pareto(board)
    columns = list(layout.frame.columns)
    if place:  # after the metrics, before the configuration
        at = max([columns.index(c) for c in columns if c in names] + [columns.index("label")]) + 1
        columns.insert(at, PARETO_COLUMN)
    config = set(board.shown.attrs.get("config", ()))  # greyed: what tells the cells apart, not a figure

    def th(c):
        cls = ' class="config"' if c in config else ""
        return f'<th{cls} data-col="{e(names.get(c, c))}" title="click to sort">{e(str(c))}</th>'

    reasons = {f"n/a [{k}]": text for k, text in enumerate(layout.footnotes, 1)}
    rows = []
    for i in range(len(layout.frame)):
        record = board.records[i]
        cells = []
        for col in columns:
            if col == PARETO_COLUMN:
                where = place.get(i)
                inner = f'<a class="pareto" href="#pareto-{anchor(record)}">{where}</a>' if where else ""
                cells.append(f'<td data-v="{where or ""}">{inner}</td>')
                continue
            text = _text(layout.frame.iloc[i][col])
            metric = names.get(col)
            raw = board.raw.iloc[i][metric] if metric else board.raw.iloc[i].get(col)
            num = _number(raw) if col not in ("label", "cell", "#") else (i + 1 if col == "#" else None)
            classes = ((["num"] if num is not None else []) + (["best"] if i in board.best.get(metric, ()) else [])
                       + (["config"] if col in config else []))
            if col.endswith(" paper") and board.raw.iloc[i].get(col[:-len(" paper")] + " within tolerance") is False:
                classes.append("off")  # outside the published figure's tolerance (its † says so too)
            sort_value = repr(num) if num is not None else ("" if metric else text)
            inner = e(text)
            if text in reasons:  # a footnote: the reason on hover, and a jump to it
                k = text.split("[")[1].rstrip("]")
                inner = f'<a href="#note-{k}" title="{e(reasons[text])}">{inner}</a>'
            if col == "label" and board.links[i]:
                inner = f'<a href="{e(Path(board.links[i]).as_posix())}">{inner}</a>'
            cls = f' class="{" ".join(classes)}"' if classes else ""
            cells.append(f'<td{cls} data-v="{e(sort_value)}">{inner}</td>')
        row_cls = ' class="failed"' if board.raw.iloc[i].get("status", "ok") != "ok" else ""
        rows.append(f'<tr id="row-{anchor(record)}"{row_cls}>{"".join(cells)}</tr>')
    under = []
    if layout.constant:
        under.append(f'<p class="caption">{e(layout.caption())}</p>')
    if layout.footnotes:
        under.append('<ol class="notes">' + "".join(f'<li id="note-{k}">{e(text)}</li>'
                                                    for k, text in enumerate(layout.footnotes, 1)) + "</ol>")
    legend = _under(board, layout, "bold")[0]
    return _PAGE.format(title=e(title), legend=e(legend), head="".join(th(c) for c in columns),
                        body="\n".join(rows), under="\n".join(under), pareto=pareto)


def render(records: list[dict], fmt: str = "markdown", metric: str | None = None,
           link_base: str | Path | None = None, title: str = "Leaderboard") -> str:
    if fmt not in FORMATS:
        raise UserError(f"unknown leaderboard format {fmt!r}{suggest(fmt, FORMATS)}")
    board = build(records, metric, link_base)
    if fmt == "html":
        return to_html(board, title)
    return {"markdown": to_markdown, "latex": to_latex, "csv": to_csv}[fmt](board)
