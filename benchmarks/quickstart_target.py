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

The check above is on the evaluation's 100 tasks and one seed, where success has a standard
error of about 0.045. A second table gives the same shares in expectation: always-large, the
cue rule, the cue rule that also goes large on every step once two attempts have failed,
both again reading the step's hidden difficulty instead of its cue (an information ceiling:
what the rule would reach if the cues never lied), and the RL routers (greedy) over every
held-out task and ``--seeds`` evaluation seeds.

usage: python benchmarks/quickstart_target.py [--results runs/quickstart/eval/results.json]
       [--recipe recipes/quickstart.yaml] [--json out.json] [--seeds 5]
Exit status 0 when some RL router meets the target on the evaluation, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SUCCESS_SHARE = 0.95
COST_SHARE = 0.50


class CueRule:
    """Large on moderate/hard cue phrases and after a failed step; with ``after_failures``,
    also on every step once that many attempts have failed in the episode.

    ``hidden=True`` reads the step's true difficulty bucket instead of its cue phrase (what
    the cue says when it does not lie). No router sees that: the row measures what the
    world's cue noise costs, an information ceiling for the same rule."""

    def __init__(self, after_failures: int | None = None, hidden: bool = False):
        self.after_failures = after_failures
        self.hidden = hidden
        self.name = ("difficulty-rule" if hidden else "cue-rule") + (
            "" if after_failures is None else f"+large-after-{after_failures}-failures")

    def begin(self, env, seed):
        self.env = env

    def step_bucket(self, view) -> int:
        if self.hidden:
            from envs.worlds.synthetic import difficulty_bucket

            state = self.env._state  # the world's hidden state: only this ceiling row reads it
            return difficulty_bucket(state.task.difficulties[min(state.position, state.task.length - 1)])
        from envs.worlds.synthetic import cue_bucket

        return cue_bucket(view["step_text"])

    def act(self, obs, info):
        view = self.env.view()
        failed = bool(view["history"]) and view["history"][-1]["event"] != "ok"
        failures = view["step_index"] - view["position"]
        want = int(self.step_bucket(view) >= 1 or failed
                   or (self.after_failures is not None and failures >= self.after_failures))
        return want if info["action_mask"][want] else 1 - want


def rule_rows(recipe_path: str, policies: list, tasks: int | None, seeds: list[int],
              routers: dict[str, str] | None = None) -> list[dict]:
    """Unbudgeted rows of ``policies`` (and greedy router checkpoints ``{name: path}``) on
    the first ``tasks`` held-out tasks (all: None), success and cost averaged over ``seeds``."""
    from envs.budget import Budget
    from rlrouter.config import load_recipe
    from rlrouter.evaluate.runner import evaluate, summarize
    from rlrouter.router.checkpoint import load_checkpoint
    from rlrouter.evaluate.router_policy import RouterPolicy

    recipe = load_recipe(recipe_path)
    env = recipe.make_env(recipe.eval.split)
    task_ids = env.task_ids[:tasks]
    players = []
    for name, path in (routers or {}).items():
        model, tokenizer, meta = load_checkpoint(path, recipe.pool.names)
        players.append(RouterPolicy.from_checkpoint(model, tokenizer, meta, recipe, name=name))
    per_seed = []
    for seed in seeds:
        records, _ = evaluate(env, policies, task_ids, [Budget()], seed=seed, progress=False)
        for router in players:
            records += router.evaluate(lambda: recipe.make_env(recipe.eval.split, world=env.world), task_ids,
                                       [Budget()], seed, progress=False)
        per_seed.append(summarize(records, recipe.pool.priciest.name))
    return [{**row, **{key: sum(s[i][key] for s in per_seed) / len(seeds) for key in ("success", "mean_cost_usd")}}
            for i, row in enumerate(per_seed[0])]


def print_expectation(recipe_path: str, seeds: int, routers: dict[str, str]) -> None:
    """The target in expectation: always-large, the cue rules and the RL routers (greedy) over
    every held-out task and ``seeds`` evaluation seeds (the 100-task check above has a
    standard error of about 0.045 on success)."""
    from rlrouter.evaluate.baselines import AlwaysTier

    policies = [AlwaysTier(1, "always-large"), CueRule(), CueRule(after_failures=2),
                CueRule(hidden=True), CueRule(after_failures=2, hidden=True)]
    rows = {r["policy"]: r for r in rule_rows(recipe_path, policies, None, list(range(seeds)), routers)}
    large = rows.pop("always-large")
    print(f"\nIn expectation (every held-out task x {seeds} evaluation seeds, budget none): always-large "
          f"{large['success']:.3f} @ ${large['mean_cost_usd']:.5f}")
    print("\n| policy | success | mean cost ($) | of always-large's success | of its cost |")
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['success']:.3f} | {row['mean_cost_usd']:.5f} | "
              f"{row['success'] / large['success']:.2%} | {row['mean_cost_usd'] / large['mean_cost_usd']:.2%} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", default="runs/quickstart/eval/results.json")
    parser.add_argument("--recipe", default="recipes/quickstart.yaml")
    parser.add_argument("--json", help="also write the table here")
    parser.add_argument("--seeds", type=int, default=5,
                        help="evaluation seeds of the in-expectation rule table (0: skip it)")
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
    extra = rule_rows(args.recipe, [CueRule()], meta["tasks"], [meta["seed"]])
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
        print(f"| {t['policy']} | {t['success']:.3f} | {t['mean_cost_usd']:.5f} | {t['success_vs_large']:.2%} | "
              f"{t['cost_vs_large']:.2%} | {'yes' if t['meets_target'] else 'no'} |")
    print(f"\nRL target {'MET' if met else 'NOT met'}")
    if args.seeds:
        rl = {name: path for name, path in meta.get("checkpoints", {}).items() if name != "sft"}
        print_expectation(args.recipe, args.seeds, rl)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": table, "violations": violations, "met": met}, indent=2))
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
