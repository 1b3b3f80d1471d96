"""Does a synthetic world leave room for a middle tier? The frontier of every cue-reading
routing rule, over the whole pool and over each two-tier subset of it.

A router in the synthetic world sees, at each step, a cue phrase naming the step's
difficulty bucket (routine / moderate / hard; right with probability ``cue_fidelity``).
A *cue rule* maps each bucket to a tier (``n_tiers ** 3`` rules); it is the routing a
text router can learn from the cue alone. Each rule runs unbudgeted on the same held-out
tasks and episode seeds (common random numbers: the worlds' draws are shared by all
rules). A pool's frontier is the upper concave envelope of its rules' (cost, success)
points: the best success a cue-reading router over that pool reaches at each cost.

Printed: every rule's success and mean cost, and the mean / smallest / largest success
gap, at equal cost, of the full pool's frontier over each two-tier subset's, with a paired
95% bootstrap interval over tasks. When the full pool's frontier is not above the best
subset's, no rule that reads only the cue gains from the extra tier: the world (skills,
prices) leaves the middle tier no kind of step where it is the best value. (Routers also see
the history, so a trained router may do better than every cue rule; the rules are a
reference for what the cue alone is worth, not a ceiling.)

usage: python benchmarks/cue_policies.py RECIPE [--tasks 100] [--seeds 2] [--split test]
       [--resamples 200] [--out DIR]
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np

from envs import Budget
from envs.worlds.synthetic import CUES, cue_bucket
from rlrouter.evaluate.curves import frontier_gap, upper_frontier
from rlrouter.evaluate.runner import evaluate


class CueBucketRule:
    """Routes each step to ``rule[bucket]``, the bucket named by the step's cue phrase."""

    def __init__(self, rule: tuple[int, ...], names: list[str]):
        self.rule = rule
        self.name = "/".join(names[t] for t in rule)

    def begin(self, env, seed: int) -> None:
        self.env = env

    def act(self, obs, info) -> int:
        return self.rule[cue_bucket(self.env.view()["step_text"])]


def rule_points(env, rules: list, tasks: list[str], seeds: int) -> dict:
    """Per rule and task: (success rate, mean cost) over ``seeds`` unbudgeted episodes."""
    index = {t: i for i, t in enumerate(tasks)}
    points = {r.rule: np.zeros((len(tasks), 2)) for r in rules}
    by_name = {r.name: r.rule for r in rules}
    for seed in range(seeds):
        records, _ = evaluate(env, rules, tasks, [Budget()], seed=seed)
        for rec in records:
            points[by_name[rec.policy]][index[rec.task_id]] += (rec.success / seeds, rec.cost_usd / seeds)
    return points


def frontier(points: dict, rules: list, weights: np.ndarray):
    costs = [np.average(points[r][:, 1], weights=weights) for r in rules]
    succ = [np.average(points[r][:, 0], weights=weights) for r in rules]
    return upper_frontier(costs, succ)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--split", default="test")
    parser.add_argument("--resamples", type=int, default=200)
    parser.add_argument("--out", help="default: runs/cue-policies/RECIPE_NAME")
    args = parser.parse_args()

    from rlrouter.config import load_recipe

    recipe = load_recipe(args.recipe)
    if recipe.world.get("kind", "synthetic") != "synthetic":
        raise SystemExit(f"{args.recipe}: world.kind is {recipe.world.get('kind')!r}; cue rules need the synthetic world")
    env = recipe.make_env(args.split, masked_action="error")
    names = env.pool.names
    if len(names) < 3:
        raise SystemExit(f"{args.recipe}: the pool has {len(names)} tiers; the comparison needs three or more")
    tasks = env.task_ids[: args.tasks]
    rules = list(itertools.product(range(len(names)), repeat=len(CUES)))
    points = rule_points(env, [CueBucketRule(r, names) for r in rules], tasks, args.seeds)
    for rule in rules:
        print(f"routine/moderate/hard -> {'/'.join(names[t] for t in rule)}: "
              f"success {points[rule][:, 0].mean():.3f}, ${points[rule][:, 1].mean():.4f}")

    subsets = {"/".join(names[t] for t in pair): [r for r in rules if set(r) <= set(pair)]
               for pair in itertools.combinations(range(len(names)), 2)}
    ones = np.ones(len(tasks))
    full = frontier(points, rules, ones)
    rng = np.random.default_rng(0)
    draws = [np.bincount(rng.integers(len(tasks), size=len(tasks)), minlength=len(tasks))
             for _ in range(args.resamples)]
    full_boot = [frontier(points, rules, w) for w in draws]  # shared by every subset's interval
    report = {"recipe": recipe.name, "tiers": names, "tasks": len(tasks), "seeds": args.seeds,
              "rules": {"/".join(names[t] for t in r): {"success": round(float(p[:, 0].mean()), 4),
                                                         "cost_usd": round(float(p[:, 1].mean()), 6)}
                        for r, p in points.items()},
              "full_frontier": [[round(float(x), 6), round(float(y), 4)] for x, y in zip(*full)],
              "gaps": {}}
    print(f"\nfull pool frontier ({'/'.join(names)}): " + ", ".join(f"{y:.3f}@${x:.4f}" for x, y in zip(*full)))
    for label, subset in subsets.items():
        sub = frontier(points, subset, ones)
        mean, lo, hi = frontier_gap(full, sub)
        boot = [frontier_gap(f, frontier(points, subset, w))[0] for f, w in zip(full_boot, draws)]
        ci = np.quantile(boot, [0.025, 0.975])  # percentile interval, as rlrouter.evaluate.curves
        report["gaps"][label] = {"mean": round(mean, 4), "min": round(lo, 4), "max": round(hi, 4),
                                 "ci95": [round(float(ci[0]), 4), round(float(ci[1]), 4)],
                                 "frontier": [[round(float(x), 6), round(float(y), 4)] for x, y in zip(*sub)]}
        print(f"full − {label}: mean {mean:+.4f} [{ci[0]:+.4f}, {ci[1]:+.4f}] (min {lo:+.4f}, max {hi:+.4f}); "
              f"{label} frontier " + ", ".join(f"{y:.3f}@${x:.4f}" for x, y in zip(*sub)))
    out = Path(args.out or f"runs/cue-policies/{recipe.name}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "cue_policies.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {out / 'cue_policies.json'}")


if __name__ == "__main__":
    main()
