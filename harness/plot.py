"""Plots from records on disk (pandas + matplotlib, Agg backend: no display needed).

- :func:`pareto_plot`: quality against cost, every cell a point, the Pareto front drawn
  through the cells no other cell beats on both axes.
- :func:`scaling_plot`: a cost (GFLOPs, latency) against the number of tokens, one line
  per token mixer: the quadratic-versus-linear picture of the LaMamba-Diff paper.
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from .errors import UserError, suggest
from .table import ARROW, build_frame, metric_header

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


def _labels(frame: pd.DataFrame, metric_cols: list[str]) -> list[str]:
    """A short name per cell: the config values that vary between the plotted cells."""
    keys = [c for c in frame.columns if c not in metric_cols and c not in ("cell", "status")]
    keys = [k for k in keys if frame[k].astype(str).nunique() > 1] or ["cell"]
    names = [k.split(".")[-1] for k in keys]
    return [" ".join(f"{n}={v}" for n, v in zip(names, row) if not pd.isna(v))
            for row in frame[keys].itertuples(index=False)]


def pareto_front(points: list[tuple[float, float]], x_lower: bool = True, y_lower: bool = True) -> list[int]:
    """Indices of the points no other point beats on both axes, in order of x."""
    sx, sy = (1 if x_lower else -1), (1 if y_lower else -1)
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(sx * a <= sx * x and sy * b <= sy * y and (a, b) != (x, y) for a, b in points)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (sx * points[i][0], sy * points[i][1]))


def pareto_plot(records: list[dict], x: str, y: str, out: str | Path) -> Path:
    """Scatter ``y`` (quality) against ``x`` (cost) over the ok records; mark the Pareto front."""
    _check_metric(x, records, "--x")
    _check_metric(y, records, "--y")
    for name, role in ((x, "--x"), (y, "--y")):
        if _direction(name, records) is None:
            raise UserError(f"{role}: metric {name!r} has no direction (lower or higher is better), "
                            "so it has no Pareto front")
    out = _out_path(out)
    ok = [r for r in records if r["status"] == "ok"]
    frame = build_frame(ok, raw=True) if ok else pd.DataFrame()
    if frame.empty or x not in frame or y not in frame:
        raise UserError(f"no ok record has both {x!r} and {y!r}")
    frame = frame[pd.to_numeric(frame[x], errors="coerce").notna() & pd.to_numeric(frame[y], errors="coerce").notna()]
    if frame.empty:
        raise UserError(f"no ok record has both {x!r} and {y!r} as numbers")
    frame = frame.reset_index(drop=True)
    labels = _labels(frame, _metrics(ok))
    points = list(zip(frame[x].astype(float), frame[y].astype(float)))
    front = pareto_front(points, _direction(x, records) == "lower", _direction(y, records) == "lower")

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    ax.scatter(*zip(*points), color="0.6", zorder=2, label="cells")
    fx, fy = zip(*(points[i] for i in front))
    ax.plot(fx, fy, "o-", color="tab:red", zorder=3, label="Pareto front", drawstyle="steps-post")
    for i, (px, py) in enumerate(points):
        ax.annotate(labels[i], (px, py), textcoords="offset points", xytext=(4, 4), fontsize=7,
                    color="tab:red" if i in front else "0.3")
    xs = [p[0] for p in points]
    if min(xs) > 0 and max(xs) / min(xs) > 20:  # costs spanning decades read better on a log axis
        ax.set_xscale("log")
    ax.set_xlabel(_header(x, records))
    ax.set_ylabel(_header(y, records))
    suites = sorted({r["suite"] for r in ok})
    ax.set_title(f"{y} vs {x}: {', '.join(suites)}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


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
