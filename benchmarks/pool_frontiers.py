"""Compare the cost-success frontiers of one policy family across pools: does routing over
three tiers beat routing over a two-tier subset of them, at equal cost?

Each evaluation (``results.json`` of ``rlrouter eval``) gives, per policy, success and
mean cost on the same held-out tasks. A pool's frontier for a family is the upper concave
envelope of the family's points and the pool's two boundary policies (always-cheapest,
always-priciest): what a deployer reaches by picking a knob value, or by mixing two knob
values task by task (a random mix of two policies lands on the segment between them).
Beyond its costliest point a frontier stays flat (spending less never costs success).

Printed per pair of pools: the mean success gap at equal cost (A − B, averaged over a grid
of costs where both frontiers are defined), the smallest and largest gap on the grid, and
a paired 95% bootstrap interval of the mean gap over tasks (every resample recomputes every
point of both pools from the same task draw; the pools must share their task ids). A PNG
shows the frontiers and their points.

usage: python benchmarks/pool_frontiers.py RESULTS.json RESULTS.json [...] [--family bopo]
       [--budget none] [--resamples 200] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from rlrouter.evaluate.curves import family, frontier_gap, upper_frontier


class Pool:
    """One evaluation's per-task outcomes for a family and the pool's boundary policies."""

    def __init__(self, path: Path, fam: str, budget: str):
        data = json.loads(path.read_text())
        self.tiers = [t["name"] for t in data["meta"]["pool"]]
        self.label = f"{data['meta']['recipe']} ({' / '.join(self.tiers)})"
        keep = {f"always-{self.tiers[0]}", f"always-{self.tiers[-1]}"}
        table: dict[str, dict[str, tuple[float, float]]] = defaultdict(dict)
        for e in data["episodes"]:
            if e["budget"] == budget and (family(e["policy"]) == fam or e["policy"] in keep):
                table[e["policy"]][e["task_id"]] = (float(e["success"]), float(e["cost_usd"]))
        missing = [p for p in keep if p not in table]
        if missing or not any(family(p) == fam for p in table):
            raise SystemExit(f"{path}: budget {budget!r} has no episodes of "
                             f"{missing or [fam + ' (family)']}: evaluate them first (rlrouter eval)")
        self.policies = sorted(table)
        self.tasks = sorted(table[self.policies[0]])
        self.success = np.array([[table[p][t][0] for t in self.tasks] for p in self.policies])
        self.cost = np.array([[table[p][t][1] for t in self.tasks] for p in self.policies])
        self.shares = {p: _shares(data["summary"], p, budget) for p in self.policies}

    def points(self, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        index = slice(None) if rows is None else rows
        return self.cost[:, index].mean(axis=1), self.success[:, index].mean(axis=1)


def _shares(summary: list[dict], policy: str, budget: str) -> dict[str, float]:
    for row in summary:
        if row["policy"] == policy and row["budget"] == budget:
            return row.get("tier_shares", {})
    return {}


def gap(a: Pool, b: Pool, rows=None) -> tuple[float, float, float]:
    """Mean, smallest and largest success gap A − B at equal cost (on the tasks ``rows``)."""
    return frontier_gap(upper_frontier(*a.points(rows)), upper_frontier(*b.points(rows)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--family", default="bopo")
    parser.add_argument("--budget", default="none")
    parser.add_argument("--resamples", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/pool-frontiers"))
    args = parser.parse_args()
    if len(args.results) < 2:
        parser.error("give at least two results.json files (one per pool)")
    for path in args.results:
        if not path.is_file():
            parser.error(f"{path}: no such file; run `rlrouter train`/`rlrouter eval` on its recipe first")

    pools = [Pool(path, args.family, args.budget) for path in args.results]
    for pool in pools[1:]:
        if pool.tasks != pools[0].tasks:
            raise SystemExit(f"{pool.label} and {pools[0].label} were evaluated on different tasks: "
                             "the paired comparison needs the same held-out tasks (same world, split, eval.tasks)")
    rng = np.random.default_rng(args.seed)
    draws = [rng.integers(len(pools[0].tasks), size=len(pools[0].tasks)) for _ in range(args.resamples)]

    report = {"family": args.family, "budget": args.budget, "tasks": len(pools[0].tasks), "pools": [], "gaps": []}
    print(f"family {args.family}, budget {args.budget}, {len(pools[0].tasks)} held-out tasks\n")
    print("| pool | policy | success | mean cost ($) | tier shares |\n|---|---|---|---|---|")
    for pool in pools:
        costs, successes = pool.points()
        x, y = upper_frontier(costs, successes)
        report["pools"].append({"label": pool.label, "frontier": [[float(c), float(s)] for c, s in zip(x, y)],
                                "points": {p: {"success": float(s), "mean_cost_usd": float(c), "tier_shares": pool.shares[p]}
                                           for p, c, s in zip(pool.policies, costs, successes)}})
        for p, c, s in sorted(zip(pool.policies, costs, successes), key=lambda r: r[1]):
            shares = " / ".join(f"{pool.shares[p].get(t, 0):.2f}" for t in pool.tiers)
            print(f"| {pool.label} | {p} | {s:.3f} | {c:.5f} | {shares} |")
    print("\n| A | B | mean gap A − B | 95% CI | smallest | largest |\n|---|---|---|---|---|---|")
    for i, a in enumerate(pools):
        for b in pools[i + 1:]:
            mean, low, high = gap(a, b)
            boot = [gap(a, b, rows)[0] for rows in draws]
            ci = [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]
            report["gaps"].append({"a": a.label, "b": b.label, "mean": mean, "ci": ci, "min": low, "max": high})
            print(f"| {a.label} | {b.label} | {mean:+.3f} | [{ci[0]:+.3f}, {ci[1]:+.3f}] | {low:+.3f} | {high:+.3f} |")

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "frontiers.json").write_text(json.dumps(report, indent=2))
    _plot(pools, args, args.out / "frontiers.png")
    print(f"\nwrote {args.out / 'frontiers.json'} and {args.out / 'frontiers.png'}")


def _plot(pools: list[Pool], args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for pool, colour in zip(pools, plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        costs, successes = pool.points()
        x, y = upper_frontier(costs, successes)
        ax.plot(x, y, "-", color=colour, label=pool.label)
        ax.plot(costs, successes, "o", color=colour, alpha=0.6)
    ax.set_xlabel("mean cost per task ($)")
    ax.set_ylabel("success")
    ax.set_title(f"{args.family} frontiers, budget {args.budget}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
