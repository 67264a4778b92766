"""Which units to remove under a budget, and whether single-unit losses add up.

LAPTOP-Diff removes the set whose summed one-shot losses are smallest while the removed
parameters reach the target: a 0-1 knapsack (covering form). ``knapsack`` solves it exactly
as an integer program (scipy's HiGHS); ``greedy`` takes units by score per unit of weight,
then puts back any it can spare.
"""
from __future__ import annotations

import numpy as np

from harness import UserError

SELECTIONS = ("knapsack", "greedy")


def select_units(scores: dict[str, float], weights: dict[str, float], target: float,
                 method: str = "knapsack", clashes: list[tuple[str, str]] = ()) -> list[str]:
    """Names to remove: minimise the summed scores subject to sum(weights) >= target, never
    two units of a clash (units that share a module, see ``units.conflicts``)."""
    names = [n for n in scores if weights.get(n, 0) > 0]
    clashes = [(a, b) for a, b in clashes if a in names and b in names]
    available = sum(weights[n] for n in names)
    if target <= 0:
        return []
    if available < target:
        raise UserError(f"pruning budget not reachable: the removable units hold {available:,.0f} "
                        f"but {target:,.0f} must go; lower prune.ratio")
    if method == "knapsack":
        return _knapsack(names, scores, weights, target, clashes)
    if method == "greedy":
        return _greedy(names, scores, weights, target, clashes=clashes)
    from harness import suggest

    raise UserError(f"unknown selection {method!r}{suggest(method, SELECTIONS)}")


def _knapsack(names, scores, weights, target, clashes) -> list[str]:
    from scipy.optimize import Bounds, LinearConstraint, milp

    cost = np.array([scores[n] for n in names], dtype=float)
    w = np.array([weights[n] for n in names], dtype=float)
    scale = w.max()  # keep the constraint well conditioned for the solver
    constraints = [LinearConstraint((w / scale)[None, :], lb=target / scale, ub=np.inf)]
    if clashes:
        index = {n: i for i, n in enumerate(names)}
        rows = np.zeros((len(clashes), len(names)))
        for r, (a, b) in enumerate(clashes):
            rows[r, index[a]] = rows[r, index[b]] = 1
        constraints.append(LinearConstraint(rows, lb=0, ub=1))
    res = milp(c=cost, constraints=constraints, integrality=np.ones(len(names)), bounds=Bounds(0, 1))
    if res.status == 2:  # infeasible: the clashes leave too little to remove
        raise UserError("pruning budget not reachable without removing a module twice; lower prune.ratio")
    if not res.success:
        raise RuntimeError(f"knapsack solver failed: {res.message}")
    chosen = [n for n, x in zip(names, res.x) if x > 0.5]
    if sum(weights[n] for n in chosen) < target * (1 - 1e-9):  # solver tolerance: top up greedily
        chosen = _greedy(names, scores, weights, target, start=chosen, clashes=clashes)
    return chosen


def _greedy(names, scores, weights, target, start=(), clashes=()) -> list[str]:
    chosen = list(start)
    rivals: dict[str, set] = {}
    for a, b in clashes:
        rivals.setdefault(a, set()).add(b)
        rivals.setdefault(b, set()).add(a)
    lo = min(scores[n] for n in names)
    # cost per unit of weight; shifted so a zero-score unit still ranks by its weight
    order = sorted((n for n in names if n not in chosen), key=lambda n: (scores[n] - lo + 1e-12) / weights[n])
    total = sum(weights[n] for n in chosen)
    for n in order:
        if total >= target:
            break
        if rivals.get(n, set()) & set(chosen):
            continue
        chosen.append(n)
        total += weights[n]
    if total < target:
        raise UserError("pruning budget not reachable without removing a module twice; lower prune.ratio")
    # put back the most important units the budget can spare
    for n in sorted(chosen, key=lambda n: -scores[n]):
        if total - weights[n] >= target:
            chosen.remove(n)
            total -= weights[n]
    return chosen


def additivity(names: list[str], single: dict[str, float], loss_of_set, subsets: int = 20,
               seed: int = 0, max_size: int | None = None, compatible=None) -> dict:
    """Pearson correlation between the sum of single-unit losses and the measured loss of
    removing the whole set, over random subsets of 2..max_size units."""
    rng = np.random.default_rng(seed)
    max_size = max(2, min(max_size or len(names) // 2, len(names)))
    pairs = []
    for _ in range(subsets):
        k = int(rng.integers(2, max_size + 1))
        subset = sorted(rng.choice(len(names), size=k, replace=False).tolist())
        chosen = [names[i] for i in subset]
        if compatible is not None:  # drop units that clash with one already drawn
            chosen = compatible(chosen)
        pairs.append((sum(single[n] for n in chosen), loss_of_set(chosen), k))
    pred = np.array([p[0] for p in pairs])
    meas = np.array([p[1] for p in pairs])
    return {"pearson": _pearson(pred, meas), "spearman": _spearman(pred, meas), "subsets": len(pairs),
            **_bootstrap(pred, meas, rng),
            "pairs": [{"sum_single": float(a), "measured": float(b), "size": k} for a, b, k in pairs]}


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:  # a resample of one repeated subset
        return float("nan")
    return float(spearmanr(x, y).statistic)


def _bootstrap(x: np.ndarray, y: np.ndarray, rng, resamples: int = 2000) -> dict:
    """95% percentile intervals of both correlations over resampled subsets: with a few
    dozen subsets a single correlation says little about how near 0.9 the truth is."""
    if len(x) < 3:
        return {}
    out = {}
    for name, fn in (("pearson", _pearson), ("spearman", _spearman)):
        values = []
        for _ in range(resamples):
            idx = rng.integers(0, len(x), len(x))
            v = fn(x[idx], y[idx])
            if np.isfinite(v):
                values.append(v)
        if values:
            out[f"{name}_ci95"] = [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]
    return out
