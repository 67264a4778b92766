"""Plots from records on disk (pandas + matplotlib, Agg backend: no display needed).

- :func:`pareto_plot`: quality against cost, every cell a point, the Pareto front drawn
  through the cells no other cell beats on both axes. Labels are moved apart (adjustText);
  where points sit on top of each other and no free place is left, a legend names them.
- :func:`scaling_plot`: a cost (GFLOPs, latency) against the number of tokens, one line
  per token mixer: the quadratic-versus-linear picture of the LaMamba-Diff paper.
"""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from .errors import UserError, suggest
from . import published as published_figures
from .table import ARROW, build_frame, metric_header, metric_value

SUFFIXES = (".png", ".svg", ".pdf")


def _metrics(records: list[dict]) -> list[str]:
    return list(dict.fromkeys(m for r in records for m in r.get("metrics", {})))


def _check_metric(name: str, records: list[dict], role: str) -> None:
    known = _metrics(records)
    if name not in known:
        raise UserError(f"{role}: unknown metric {name!r} in these records{suggest(name, known)}")


def _direction(name: str, records: list[dict]) -> str | None:
    for r in records:
        entry = r.get("metrics", {}).get(name)
        if isinstance(entry, dict) and entry.get("direction") in ARROW:
            return entry["direction"]
    return None


def _header(name: str, records: list[dict]) -> str:
    return metric_header(name, [r.get("metrics", {}).get(name) for r in records])


def _out_path(out: str | Path) -> Path:
    out = Path(out)
    if out.suffix.lower() not in SUFFIXES:
        raise UserError(f"--out {str(out)!r}: expected a file ending in {', '.join(SUFFIXES)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def pareto_front(points: list[tuple[float, float]], x_lower: bool = True, y_lower: bool = True) -> list[int]:
    """Indices of the points no other point beats on both axes, in order of x."""
    sx, sy = (1 if x_lower else -1), (1 if y_lower else -1)
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(sx * a <= sx * x and sy * b <= sy * y and (a, b) != (x, y) for a, b in points)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (sx * points[i][0], sy * points[i][1]))


def overlapping(texts, renderer) -> list[tuple[int, int]]:
    """Pairs of ``texts`` (matplotlib Text) whose drawn boxes intersect."""
    boxes = [t.get_window_extent(renderer) for t in texts]
    return [(i, j) for i in range(len(boxes)) for j in range(i + 1, len(boxes)) if boxes[i].overlaps(boxes[j])]


def _place_labels(ax, texts, points) -> bool:
    """Move the labels off each other and off the points (adjustText); False when some still
    overlap (points on top of each other), for the caller to fall back to a legend."""
    from adjustText import adjust_text

    fig = ax.figure
    adjust_text(texts, x=[p[0] for p in points], y=[p[1] for p in points], ax=ax,
                arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.5})
    return not overlapping(texts, fig.canvas.get_renderer())


def published_points(records: list[dict], x: str, y: str) -> dict[int, tuple[float, float]]:
    """Where the published figures of ``records`` put them (position -> (x, y)): a record with a
    published figure for ``x`` or ``y`` (its cell's ``published:`` block, see
    :mod:`harness.published`); the coordinate the paper does not give is ours."""
    out = {}
    for i, r in enumerate(records):
        figs = published_figures.figures(r)
        if r.get("status") != "ok" or not (x in figs or y in figs):
            continue
        coords = []
        for name in (x, y):
            value = figs[name]["published"] if name in figs else metric_value(r["metrics"].get(name))
            coords.append(float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None)
        if None not in coords:
            out[i] = (coords[0], coords[1])
    return out


def pareto_figure(records: list[dict], x: str, y: str, anchors: list[str] | None = None, published: bool = False):
    """The Pareto figure of ``y`` against ``x``: (figure, positions of the plotted records in
    ``records``, positions on the front). ``anchors`` (one per record) make each point an SVG
    element ``pareto-<anchor>`` linking to ``#row-<anchor>`` (the leaderboard page).
    ``published`` marks each published figure (hollow) beside our point, joined to it by a
    dotted line; the front stays ours."""
    _check_metric(x, records, "--x")
    _check_metric(y, records, "--y")
    for name, role in ((x, "--x"), (y, "--y")):
        if _direction(name, records) is None:
            raise UserError(f"{role}: metric {name!r} has no direction (lower or higher is better), "
                            "so it has no Pareto front")
    positions = [i for i, r in enumerate(records) if r["status"] == "ok"]
    ok = [records[i] for i in positions]
    frame = build_frame(ok, raw=True) if ok else pd.DataFrame()
    if frame.empty or x not in frame or y not in frame:
        raise UserError(f"no ok record has both {x!r} and {y!r}")
    keep = pd.to_numeric(frame[x], errors="coerce").notna() & pd.to_numeric(frame[y], errors="coerce").notna()
    if not keep.any():
        raise UserError(f"no ok record has both {x!r} and {y!r} as numbers")
    positions = [p for p, k in zip(positions, keep) if k]
    frame = frame[keep].reset_index(drop=True)
    labels = [str(v) for v in frame["label"]]
    points = list(zip(frame[x].astype(float), frame[y].astype(float)))
    front = pareto_front(points, _direction(x, records) == "lower", _direction(y, records) == "lower")

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    fx, fy = zip(*(points[i] for i in front))
    ax.plot(fx, fy, "-", color="tab:red", zorder=2, drawstyle="steps-post")
    dots = [_point(ax, px, py, "o", "tab:red" if i in front else "0.6", anchors and anchors[positions[i]])
            for i, (px, py) in enumerate(points)]
    paper = published_points(records, x, y) if published else {}
    if published and not paper:
        raise UserError(f"--published: no ok record has a published figure for {x!r} or {y!r} "
                        "(a cell's published: block)")
    for i, (px, py) in enumerate(points):
        if positions[i] in paper:
            qx, qy = paper[positions[i]]
            ax.plot([px, qx], [py, qy], ":", color="0.5", lw=0.8, zorder=1)
            ax.plot([qx], [qy], "D", mfc="none", mec="tab:blue", ms=6, zorder=3)
    xs = [p[0] for p in points] + [q[0] for q in paper.values()]
    if min(xs) > 0 and max(xs) / min(xs) > 20:  # costs spanning decades read better on a log axis
        ax.set_xscale("log")
    ax.set_xlabel(_header(x, records))
    ax.set_ylabel(_header(y, records))
    suites = sorted({r["suite"] for r in ok})
    ax.set_title(f"{y} vs {x}: {', '.join(suites)}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.margins(0.15)  # room for the labels around the outermost points
    fig.tight_layout()
    texts = [ax.text(px, py, labels[i], fontsize=7, color="tab:red" if i in front else "0.3", zorder=4)
             for i, (px, py) in enumerate(points)]
    if len(texts) > 1 and not _place_labels(ax, texts, points):
        # points on top of each other leave no free place: a legend names every point instead
        for artist in texts + dots:
            artist.remove()
        handles = [_point(ax, px, py, _MARKERS[i % len(_MARKERS)], f"C{i % 10}", anchors and anchors[positions[i]],
                          label=labels[i] + (" (front)" if i in front else ""))
                   for i, (px, py) in enumerate(points)]
    else:
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], marker="o", color="tab:red", label="Pareto front")]
        if len(front) < len(points):
            handles.append(Line2D([], [], marker="o", ls="", color="0.6", label="cells"))
    if paper:
        from matplotlib.lines import Line2D

        handles.append(Line2D([], [], marker="D", ls=":", color="0.5", mfc="none", mec="tab:blue",
                              label="published (dotted: to ours)"))
    # outside the axes: a legend inside could cover a label or a point
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return fig, positions, {positions[i] for i in front}


_MARKERS = "osD^vP*Xhp<>"


def _point(ax, px: float, py: float, marker: str, color: str, anchor: str | None, label: str | None = None):
    """One point as its own artist, so that an HTML page can link to it (``pareto-<anchor>``)
    and from it (to the row ``row-<anchor>``)."""
    point, = ax.plot([px], [py], marker, color=color, ls="", zorder=3, label=label)
    if anchor:
        point.set_gid(f"pareto-{anchor}")
        point.set_url(f"#row-{anchor}")
    return point


def pareto_plot(records: list[dict], x: str, y: str, out: str | Path, published: bool = False) -> Path:
    """Scatter ``y`` (quality) against ``x`` (cost) over the ok records; mark the Pareto front
    (and with ``published``, the papers' figures beside ours)."""
    out = _out_path(out)
    fig, _, _ = pareto_figure(records, x, y, published=published)
    fig.savefig(out, bbox_inches="tight")
    _pyplot().close(fig)
    return out


def pareto_svg(records: list[dict], x: str, y: str, anchors: list[str]) -> tuple[str, list[int], set[int]]:
    """:func:`pareto_figure` as an inline ``<svg>`` element for an HTML page (no XML prolog,
    no date: the same records give the same bytes), with the plotted and front positions."""
    import io

    fig, plotted, front = pareto_figure(records, x, y, anchors)
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    _pyplot().close(fig)
    text = buf.getvalue()
    # matplotlib opens every link in a new tab; a jump to a row of the same page stays in it
    text = re.sub(r'(<a xlink:href="#row-[\w-]+") target="_blank"', r"\1", text)
    return text[text.index("<svg"):], plotted, front


# -- scaling ------------------------------------------------------------------------------
def tokens_of(record: dict, metric: str) -> int | None:
    """Tokens the mixers see at full resolution: a metric's own ``tokens`` detail if it
    reports one, else (resolution / patch)^2 with the backbone's patch (1 when it has none)."""
    entry = record.get("metrics", {}).get(metric)
    details = [entry] + list(record.get("metrics", {}).values())
    for e in details:
        if isinstance(e, dict) and isinstance(e.get("tokens"), int):
            return e["tokens"]
    backbone = record.get("config", {}).get("backbone", {})
    data = record.get("config", {}).get("data") or {}
    resolution = next((e.get("resolution") for e in details if isinstance(e, dict) and e.get("resolution")),
                      backbone.get("input_size") or data.get("resolution"))
    if not isinstance(resolution, int):
        return None
    patch = backbone.get("patch", 1) or 1
    return (resolution // patch) ** 2


def _mixer_of(record: dict, several_backbones: bool) -> str:
    backbone = record.get("config", {}).get("backbone", {})
    mixer = backbone.get("mixer")
    name = mixer.get("name") if isinstance(mixer, dict) else mixer
    name = name or "(default mixer)"
    return f"{backbone.get('name')} / {name}" if several_backbones else name


def scaling_plot(records: list[dict], y: str, out: str | Path) -> Path:
    """``y`` (a cost) against tokens, one line per mixer, log-log."""
    _check_metric(y, records, "--y")
    out = _out_path(out)
    ok = [r for r in records if r["status"] == "ok"]
    several = len({r["config"].get("backbone", {}).get("name") for r in ok}) > 1
    rows = []
    for r in ok:
        value, tokens = r.get("metrics", {}).get(y), tokens_of(r, y)
        value = value.get("value") if isinstance(value, dict) else value
        if isinstance(value, (int, float)) and not isinstance(value, bool) and tokens:
            rows.append({"mixer": _mixer_of(r, several), "tokens": tokens, y: float(value)})
    if not rows:
        raise UserError(f"no ok record has {y!r} and a token count (resolution and patch)")
    frame = pd.DataFrame(rows).groupby(["mixer", "tokens"], as_index=False)[y].median()

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for mixer, group in frame.groupby("mixer"):
        group = group.sort_values("tokens")
        ax.plot(group["tokens"], group[y], "o-", label=mixer)
    if frame["tokens"].nunique() > 1:
        ax.set_xscale("log", base=2)
        if (frame[y] > 0).all():
            ax.set_yscale("log")
    ax.set_xlabel("tokens (H·W seen by the mixers)")
    ax.set_ylabel(_header(y, records))
    ax.set_title(f"{y} vs tokens per mixer: {', '.join(sorted({r['suite'] for r in ok}))}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
