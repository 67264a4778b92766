"""Published figures beside a cell's own: the ``published:`` block of a suite cell.

A cell (in ``base``, a matrix value or an ``include``) may name the figures a paper prints
for it::

    published:
      source: "DiT (Peebles & Xie 2023), Table 4"
      fid: 2.27
      isc: 278.24
      pickscore.change: -0.040      # a number the metric's entry holds besides its value
      tolerance: 0.1                # or per figure: {fid: 0.1, isc: 5}

Every key but ``source`` and ``tolerance`` names a metric of the cell (its value) or
``metric.field``, a number the metric's record entry keeps beside its value (``change``:
the relative change against the teacher). ``tolerance`` is absolute, in the figure's own
unit: one number for every figure, or a mapping from figure to number (figures it does not
name have none). A figure lies outside its tolerance when ``|ours - published| > tolerance``.

The record keeps, in each such metric entry, ``published`` and ``delta`` (ours - published),
plus ``tolerance`` and ``within_tolerance`` when a tolerance is given; a ``metric.field``
figure is kept as ``published.field``, ``delta.field`` and so on. The block is no part of a
cell's identity: correcting a published figure re-annotates the finished record instead of
running the cell again (:func:`refresh`).
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, Iterable, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from .errors import UserError, suggest

RESERVED = ("source", "tolerance")
_KEY = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z_][A-Za-z0-9_]*)?$")


class PublishedSpec(BaseModel):
    """``published: {source, <figure>: number, ..., tolerance}`` (see the module docstring)."""

    model_config = ConfigDict(extra="allow")
    source: str = Field(min_length=1)
    tolerance: Optional[Union[float, dict[str, float]]] = None

    def figures(self) -> dict[str, float]:
        """The published figures by key (``fid``, ``pickscore.change``)."""
        return {k: float(v) for k, v in (self.model_extra or {}).items() if _is_number(v)}

    def tolerance_for(self, key: str) -> Optional[float]:
        if isinstance(self.tolerance, dict):
            return self.tolerance.get(key)
        return self.tolerance


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def split(key: str) -> tuple[str, Optional[str]]:
    """``"pickscore.change"`` -> ``("pickscore", "change")``; ``"fid"`` -> ``("fid", None)``."""
    metric, _, field = key.partition(".")
    return metric, field or None


def check(spec: PublishedSpec, metrics: Iterable[str], where: Callable[[tuple], str]) -> None:
    """Every figure a number keyed by a metric of the cell, every tolerance a number >= 0 for
    a figure the block gives. ``where(path)`` is ``file:line`` of a path inside the block;
    raises UserError naming it."""
    metrics = list(metrics)
    extra = spec.model_extra or {}
    for key, value in extra.items():
        at = f"{where((key,))}: published.{key}"
        metric, field = split(str(key))
        if not _KEY.match(str(key)):
            raise UserError(f"{at}: expected a metric name, or metric.field (such as pickscore.change)")
        if metric not in metrics:
            known = ", ".join(metrics)
            raise UserError(f"{at}: {metric!r} is not a metric of this cell (every key but source and tolerance "
                            f"names one of its metrics: {known}){suggest(metric, metrics)}")
        if not _is_number(value):
            hint = ""
            if isinstance(value, str):
                try:
                    float(value)
                    hint = "; YAML reads an exponent without its sign as text: write 3.29e+7, not 3.29e7"
                except ValueError:
                    pass
            raise UserError(f"{at}: expected a number, the published figure (got {value!r}){hint}")
    tol = spec.tolerance
    pairs = tol.items() if isinstance(tol, dict) else ([] if tol is None else [(None, tol)])
    for key, value in pairs:
        path = ("tolerance",) if key is None else ("tolerance", key)
        at = f"{where(path)}: published.{'.'.join(path)}"
        if key is not None and key not in extra:
            raise UserError(f"{at}: no published figure {key!r} in this block"
                            f"{suggest(key, list(extra))}; tolerance names figures the block gives")
        if not _is_number(value) or value < 0:
            raise UserError(f"{at}: expected a number >= 0, an absolute tolerance (got {value!r})")


def _names(field: Optional[str]) -> tuple[str, str, str, str]:
    suffix = f".{field}" if field else ""
    return (f"published{suffix}", f"delta{suffix}", f"tolerance{suffix}", f"within_tolerance{suffix}")


def annotate(metrics: dict, spec: Optional[PublishedSpec]) -> None:
    """Put each published figure, and our distance from it, into the metric entries (in place).
    Annotations of figures the block no longer gives are removed."""
    for entry in metrics.values():
        if isinstance(entry, dict):
            for k in [k for k in entry if k.split(".")[0] in ("published", "delta", "tolerance", "within_tolerance")]:
                del entry[k]
    if spec is None:
        return
    for key, figure in spec.figures().items():
        metric, field = split(key)
        entry = metrics.get(metric)
        if entry is None:
            continue
        if not isinstance(entry, dict):
            entry = metrics[metric] = {"value": entry}
        ours = entry.get(field or "value")
        delta = float(f"{ours - figure:.12g}") if _is_number(ours) else None  # 2.31 - 2.27 reads 0.04
        published, delta_key, tol_key, within_key = _names(field)
        entry[published], entry[delta_key] = figure, delta
        tol = spec.tolerance_for(key)
        if tol is not None:
            entry[tol_key] = tol
            entry[within_key] = None if delta is None else abs(delta) <= tol * (1 + 1e-12)


def spec_of(config: dict) -> Optional[PublishedSpec]:
    block = config.get("published") if isinstance(config, dict) else None
    return PublishedSpec.model_validate(block) if block is not None else None


def refresh(record: dict, config: dict) -> bool:
    """Bring a finished record's published figures in line with ``config`` (the cell as the
    suite now gives it); returns whether anything changed."""
    before = repr((record.get("config", {}).get("published"), record.get("metrics")))
    record.setdefault("config", {})
    if "published" in config:
        record["config"]["published"] = config["published"]
    else:
        record["config"].pop("published", None)
    annotate(record.get("metrics") or {}, spec_of(config))
    return repr((record["config"].get("published"), record.get("metrics"))) != before


# -- reading records back (tables, leaderboards) -----------------------------------------------
class Figure(dict):
    """One published figure of one record: ours, published, delta, tolerance, within."""


def figures(record: dict) -> dict[str, Figure]:
    """The published figures a record's metric entries keep, by key (``fid``, ``pickscore.change``)."""
    out: dict[str, Figure] = {}
    for metric, entry in (record.get("metrics") or {}).items():
        if not isinstance(entry, dict):
            continue
        for k in entry:
            if k != "published" and not k.startswith("published."):
                continue
            field = k.partition(".")[2] or None
            published, delta, tol, within = _names(field)
            out[f"{metric}.{field}" if field else metric] = Figure(
                ours=entry.get(field or "value"), published=entry.get(published), delta=entry.get(delta),
                tolerance=entry.get(tol), within=entry.get(within))
    return out


def source(record: dict) -> Optional[str]:
    block = (record.get("config") or {}).get("published")
    return block.get("source") if isinstance(block, dict) else None


def format_figure(fig: Figure, number: Callable[[Any], str]) -> str:
    """``2.27 (Δ +0.04)``, with ``†`` when outside the tolerance."""
    if fig.get("published") is None:
        return ""
    text = number(fig["published"])
    if fig.get("delta") is not None:
        d = fig["delta"]
        text += f" (Δ {'+' if d >= 0 else '−'}{number(abs(d))})"
    if fig.get("within") is False:
        text += " " + OUTSIDE
    return text


OUTSIDE = "†"
LEGEND = "paper: the published figure, Δ = ours − paper"
OUTSIDE_NOTE = f"{OUTSIDE} outside the published figure's tolerance"
