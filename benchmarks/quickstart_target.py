"""The quickstart's RL target, checked from an evaluation's results.json.

Target (issue "RL stage"): on the held-out tasks, with no budget, the RL router reaches
>= 95% of always-large's success at <= 50% of always-large's mean cost, and no evaluated
episode (any policy, any budget) exceeds its budget.

Beside the routers it plays, on the same tasks and episode seeds, a hand-written rule that
reads only what a router sees — the step's cue phrase (routine / moderate / hard) and
whether the last step failed — and sends moderate, hard and retried steps to the large
tier. It is not a deployable policy for other worlds; it estimates how far the synthetic
world's visible information can take a router (the cues match a step's difficulty 80% of
the time), i.e. whether the target is reachable at all from what the router sees.

usage: python benchmarks/quickstart_target.py [--results runs/quickstart/eval/results.json]
       [--recipe recipes/quickstart.yaml] [--json out.json]
Exit status 0 when some RL router meets the target, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SUCCESS_SHARE = 0.95
COST_SHARE = 0.50


def cue_rule_rows(recipe_path: str, tasks: int, seed: int) -> list[dict]:
    from envs.budget import Budget
    from envs.worlds.synthetic import CUES
    from rlrouter.config import load_recipe
    from rlrouter.evaluate.runner import evaluate, summarize

    cue_bucket = {cue: b for b, cues in enumerate(CUES) for cue in cues}

    class CueRule:
        name = "cue-rule"

        def begin(self, env, seed):
            self.env = env

        def act(self, obs, info):
            view = self.env.view()
            bucket = next(b for cue, b in cue_bucket.items() if view["step_text"].startswith(cue + " "))
            failed = bool(view["history"]) and view["history"][-1]["event"] not in ("ok",)
            want = 1 if bucket >= 1 or failed else 0
            return want if info["action_mask"][want] else 1 - want

    recipe = load_recipe(recipe_path)
    env = recipe.make_env(recipe.eval.split)
    records, _ = evaluate(env, [CueRule()], env.task_ids[:tasks], [Budget()], seed=seed, progress=False)
    return summarize(records, recipe.pool.tiers[-1].name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", default="runs/quickstart/eval/results.json")
    parser.add_argument("--recipe", default="recipes/quickstart.yaml")
    parser.add_argument("--json", help="also write the table here")
    args = parser.parse_args()
    path = Path(args.results)
    if not path.is_file():
        print(f"{path} not found: run `python -m rlrouter train {args.recipe}` first (or pass --results)")
        return 2
    data = json.loads(path.read_text())
    rows = data["summary"]
    meta = data["meta"]
    ref = {r["policy"]: r for r in rows if r["budget"] == "none"}
    large = ref.get("always-large")
    if large is None:
        print(f"{path}: no unbudgeted always-large row to compare with")
        return 2
    violations = sum(r["budget_violations"] for r in rows)
    routers = [p for p in ref if p.split("(")[0] in set(meta.get("checkpoints", {}))]
    extra = cue_rule_rows(args.recipe, meta["tasks"], meta["seed"])
    table, met = [], False
    for row in [ref[p] for p in routers] + extra + [large]:
        s_share = row["success"] / large["success"]
        c_share = row["mean_cost_usd"] / large["mean_cost_usd"]
        ok = s_share >= SUCCESS_SHARE and c_share <= COST_SHARE and violations == 0
        rl = row["policy"].split("(")[0] not in ("sft", "always-large", "cue-rule")
        met |= ok and rl
        table.append({"policy": row["policy"], "success": row["success"], "mean_cost_usd": row["mean_cost_usd"],
                      "success_vs_large": s_share, "cost_vs_large": c_share, "meets_target": ok})
    print(f"{path}: {meta['tasks']} held-out tasks, seed {meta['seed']}, budget none; "
          f"target >= {SUCCESS_SHARE:.0%} of always-large's success at <= {COST_SHARE:.0%} of its cost, "
          f"0 violations (all budgets: {violations})")
    print("\n| policy | success | mean cost ($) | of always-large's success | of its cost | meets target |")
    print("|---|---|---|---|---|---|")
    for t in table:
        print(f"| {t['policy']} | {t['success']:.3f} | {t['mean_cost_usd']:.5f} | {t['success_vs_large']:.1%} | "
              f"{t['cost_vs_large']:.1%} | {'yes' if t['meets_target'] else 'no'} |")
    print(f"\nRL target {'MET' if met else 'NOT met'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": table, "violations": violations, "met": met}, indent=2))
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
