"""Whole-knob metrics of a routing policy family: PGR curves, APGR and CPT(x%).

A *family* is every policy whose name is ``family(knob=value)`` or just ``family``:
``random(p=0.25)``, ``knn(t=0.05)``, ``bopo(bias=1)`` and ``bopo`` form the families
``random``, ``knn`` and ``bopo``. Its curve, per budget, is success against the share of
calls that went to the priciest tier, through the family's points and the two boundary
policies of that budget (always-cheapest at one end, always-priciest at the other: the
knob's extreme values, which route everything to one tier).

Definitions (RouteLLM: Ong et al., "RouteLLM: Learning to Route LLMs with Preference
Data", ICLR 2025, arXiv:2406.18665, §3.2 Eq. 6-8, and ``routellm/evals/evaluate.py``):

- PGR = (succ − succ_small) / (succ_large − succ_small), the boundaries being the
  unbudgeted always-cheapest and always-priciest success rates.
- APGR = ∫ PGR(c) dc over the share c of strong calls: the trapezoid area of the points
  sorted by c, divided by the width of the c range they span (RouteLLM's ``apgr_metric``:
  ``(AUC − weak_auc) / (strong_auc − weak_auc)`` with both reference areas over the same
  range). Unbudgeted, the range is [0, 1] and this is Eq. 7; under a cap it is the range
  of shares the cap allows.
- CPT(x%) = the smallest share c at which the piecewise-linear PGR curve reaches x%.
  RouteLLM computes it with ``np.interp(target, accuracy, strong_pct)``, which assumes the
  accuracy rises along the curve; on a non-monotone curve we take the first crossing
  (the same value wherever ``np.interp`` is defined). ``None`` when the curve never
  reaches x%.

The same area on the dollar axis (``apgr_usd``) uses c = (cost − cost_small) /
(cost_large − cost_small) instead of the call share. Intervals are percentile bootstrap
intervals over tasks: every resample draws the held-out tasks with replacement and
recomputes every point, the boundaries included, from the same draw (paired).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

BOUNDARIES = ("always-small", "always-large")
CPT_LEVELS = (0.5, 0.8)


def family(policy: str) -> str:
    return policy.split("(", 1)[0]


def apgr(shares, pgrs) -> float:
    """Trapezoid area under PGR over the strong-call share, divided by the range width."""
    x, y = _sorted(shares, pgrs)
    width = x[-1] - x[0]
    if width <= 0:
        return float(y.mean())
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2 / width)


def cpt(shares, pgrs, level: float) -> float | None:
    """Smallest share at which the piecewise-linear curve reaches ``level`` (first crossing)."""
    x, y = _sorted(shares, pgrs)
    if y[0] >= level:
        return float(x[0])
    for x0, x1, y0, y1 in zip(x[:-1], x[1:], y[:-1], y[1:]):
        if y0 < level <= y1:
            return float(x0 + (level - y0) / (y1 - y0) * (x1 - x0))
    return None


def upper_frontier(costs, successes) -> tuple[np.ndarray, np.ndarray]:
    """The cost-success frontier of a set of policies: the vertices of the upper concave
    envelope of the points (cost, success), from the cheapest point to the first point of
    highest success. Every point on it is reachable by one policy or by a task-by-task random
    mix of two (the mix lands on the segment between them)."""
    order = sorted(zip(map(float, costs), map(float, successes)), key=lambda p: (p[0], -p[1]))
    hull: list[tuple[float, float]] = []
    for point in order:
        while len(hull) >= 2:
            (x0, y0), (x1, y1) = hull[-2], hull[-1]
            if (x1 - x0) * (point[1] - y0) - (y1 - y0) * (point[0] - x0) >= 0:  # hull[-1] on or under the chord
                hull.pop()
            else:
                break
        if not hull or point[0] > hull[-1][0]:  # at an equal cost the higher success came first
            hull.append(point)
    top = int(np.argmax([y for _, y in hull]))
    x, y = np.array(hull[: top + 1]).T
    return x, y


def frontier_gap(a: tuple, b: tuple, n_grid: int = 200) -> tuple[float, float, float]:
    """Mean, smallest and largest success gap A − B between two frontiers (``upper_frontier``
    vertices) at equal cost, on a grid from the dearer of the two cheapest points to the
    dearest point; past its dearest point a frontier stays flat (spending less than allowed
    never costs success)."""
    (xa, ya), (xb, yb) = a, b
    grid = np.linspace(max(xa[0], xb[0]), max(xa[-1], xb[-1]), n_grid)
    diff = np.interp(grid, xa, ya, right=ya[-1]) - np.interp(grid, xb, yb, right=yb[-1])
    return float(diff.mean()), float(diff.min()), float(diff.max())


def _sorted(shares, pgrs) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(shares, dtype=float), np.asarray(pgrs, dtype=float)
    if x.size == 0 or x.shape != y.shape:
        raise ValueError("a curve needs as many PGR values as shares, at least one")
    order = np.lexsort((y, x))  # by share; at equal shares the lower PGR first
    return x[order], y[order]


class EpisodeTable:
    """Per-task arrays of each (policy, budget): success, priciest-tier calls, calls, cost."""

    def __init__(self, records: list, top_tier: str):
        self.tasks = sorted({r.task_id for r in records})
        index = {t: i for i, t in enumerate(self.tasks)}
        cells = defaultdict(lambda: np.zeros((4, len(self.tasks))))
        counts = defaultdict(lambda: np.zeros(len(self.tasks)))
        for r in records:
            cell = cells[(r.policy, r.budget)]
            i = index[r.task_id]
            cell[:, i] += (r.success, r.calls.get(top_tier, 0), sum(r.calls.values()), r.cost_usd)
            counts[(r.policy, r.budget)][i] += 1
        self.cells = dict(cells)
        self.counts = dict(counts)

    def point(self, policy: str, budget: str, weights: np.ndarray) -> tuple[float, float, float]:
        """(success, priciest-call share, mean cost) over the tasks weighted by ``weights``."""
        cell, n = self.cells[(policy, budget)], self.counts[(policy, budget)]
        w = weights * (n > 0)
        success, top, calls, cost = (cell * w).sum(axis=1)
        episodes = (n * w).sum()
        return success / episodes, (top / calls if calls else 0.0), cost / episodes

    def families(self) -> dict[tuple[str, str], list[str]]:
        """(family, budget) -> that family's policies at that budget, the boundaries left out."""
        members = defaultdict(list)
        for policy, budget in self.cells:
            if policy not in BOUNDARIES:
                members[(family(policy), budget)].append(policy)
        return dict(members)


def family_curves(records: list, top_tier: str, reference_budget: str = "none", resamples: int = 200,
                  seed: int = 0, level: float = 0.95) -> list[dict]:
    """APGR, APGR on the dollar axis and CPT(50%/80%), with bootstrap intervals, per
    (family, budget) for every family with a point at that budget.

    Needs the unbudgeted boundaries (``reference_budget``) and both boundaries at each budget.
    """
    table = EpisodeTable(records, top_tier)
    if not all((b, reference_budget) in table.cells for b in BOUNDARIES):
        return []
    ones = np.ones(len(table.tasks))
    draws = _draws(len(table.tasks), resamples, seed)
    rows = []
    for (name, budget), policies in sorted(table.families().items()):
        if not all((b, budget) in table.cells for b in BOUNDARIES):
            continue
        estimate = _curve_metrics(table, policies, budget, reference_budget, ones)
        boot = [_curve_metrics(table, policies, budget, reference_budget, w) for w in draws]
        row = {"family": name, "budget": budget, "policies": sorted(policies), **estimate}
        for key in ("apgr", "apgr_usd", "cpt50", "cpt80"):
            values = [b[key] for b in boot if b[key] is not None]
            reached = len(values) / len(boot) if boot else 0.0
            row[f"{key}_ci"] = (
                [float(np.quantile(values, (1 - level) / 2)), float(np.quantile(values, (1 + level) / 2))]
                if values and reached >= level else None)
        rows.append(row)
    return rows


def family_difference(records: list, first: str, second: str, top_tier: str, budget: str = "none",
                      reference_budget: str = "none", resamples: int = 1000, seed: int = 0) -> dict:
    """APGR of family ``first`` minus family ``second`` at ``budget`` (and the same on the
    dollar axis), with a paired bootstrap over tasks: each resample draws the tasks once and
    scores both families and the boundaries on that draw, so what the tasks share cancels.
    "Above random by two standard errors" is ``difference > 2 * se`` against ``random``.
    Returns ``{"apgr": {"difference", "se", "ci"}, "apgr_usd": {...}}`` (95% percentile CI)."""
    table = EpisodeTable(records, top_tier)
    members = {name: policies for (name, b), policies in table.families().items() if b == budget}
    for name in (first, second):
        if name not in members:
            raise ValueError(f"family {name!r} has no policy at budget {budget!r}; families there: {sorted(members)}")
    missing = [f"{p} @ {b}" for p in BOUNDARIES for b in {budget, reference_budget} if (p, b) not in table.cells]
    if missing:
        raise ValueError(f"the records lack the boundary policies {missing}: evaluate them beside the families")

    def difference(weights: np.ndarray) -> dict:
        a, b = (_curve_metrics(table, members[name], budget, reference_budget, weights) for name in (first, second))
        return {key: (None if a[key] is None or b[key] is None else a[key] - b[key]) for key in ("apgr", "apgr_usd")}

    estimate = difference(np.ones(len(table.tasks)))
    boot = [difference(w) for w in _draws(len(table.tasks), resamples, seed)]
    out = {}
    for key in ("apgr", "apgr_usd"):
        values = np.array([d[key] for d in boot if d[key] is not None])
        out[key] = {"difference": estimate[key], "se": float(values.std()) if values.size else None,
                    "ci": [float(np.quantile(values, 0.025)), float(np.quantile(values, 0.975))] if values.size else None}
    return out


def _draws(n: int, resamples: int, seed: int) -> list[np.ndarray]:
    """Bootstrap resamples of ``n`` tasks as per-task counts (the weights of ``EpisodeTable.point``)."""
    rng = np.random.default_rng(seed)
    return [np.bincount(rng.integers(n, size=n), minlength=n) for _ in range(resamples)]


def _curve_metrics(table: EpisodeTable, policies: list[str], budget: str, reference: str,
                   weights: np.ndarray) -> dict:
    s_small, _, c_small = table.point("always-small", reference, weights)
    s_large, _, c_large = table.point("always-large", reference, weights)
    gap, spend = s_large - s_small, c_large - c_small
    points = [table.point(p, budget, weights) for p in [*BOUNDARIES, *policies]]
    if gap == 0 or spend == 0:
        return {"apgr": None, "apgr_usd": None, "cpt50": None, "cpt80": None, "points": []}
    pgrs = [(s - s_small) / gap for s, _, _ in points]
    shares = [share for _, share, _ in points]
    usd = [(cost - c_small) / spend for _, _, cost in points]
    return {
        "apgr": apgr(shares, pgrs),
        "apgr_usd": apgr(usd, pgrs),
        "cpt50": cpt(shares, pgrs, CPT_LEVELS[0]),
        "cpt80": cpt(shares, pgrs, CPT_LEVELS[1]),
        "points": [{"policy": p, "share": round(c, 6), "usd_share": round(u, 6), "pgr": round(g, 6)}
                   for p, c, u, g in zip([*BOUNDARIES, *policies], shares, usd, pgrs)],
    }
