"""The ``rlrouter`` command."""

from __future__ import annotations

import argparse
import sys

from envs.budget import parse_budget_arg


def _eval(args) -> int:
    from rlrouter.config import load_recipe
    from rlrouter.evaluate.job import eval_recipe
    from rlrouter.evaluate.report import markdown_table

    recipe = load_recipe(args.recipe)
    budgets = [b for spec in args.budget for b in parse_budget_arg(spec)] if args.budget else None
    policies = args.policies.split(",") if args.policies else None
    result = eval_recipe(recipe, budgets=budgets, tasks=args.tasks, seed=args.seed, out_dir=args.out,
                         policies=policies, progress=not args.quiet)
    print(markdown_table(result["rows"]))
    counts = result["meta"]["taxonomy_counts"]
    print(f"\ntaxonomy of the {result['meta']['tasks']} tasks: {counts}")
    for kind, path in result["paths"].items():
        print(f"{kind}: {path}")
    return 0


def _train(args) -> int:
    from rlrouter.config import load_recipe
    from rlrouter.evaluate.job import eval_recipe
    from rlrouter.evaluate.report import markdown_table

    recipe = load_recipe(args.recipe)
    for stage in recipe.stages:
        print(f"== stage: {stage}", flush=True)
        if stage == "eval":
            result = eval_recipe(recipe, progress=not args.quiet)
            print(markdown_table(result["rows"]))
            for kind, path in result["paths"].items():
                print(f"{kind}: {path}")
    return 0


def _check(args) -> int:
    from rlrouter.config import load_recipe

    recipe = load_recipe(args.recipe)
    print(f"{args.recipe}: ok (world {recipe.world.get('kind')}, tiers {recipe.pool.names}, "
          f"stages {recipe.stages}, budgets {[b.label for b in recipe.budgets()]})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlrouter", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("eval", help="evaluate baselines on held-out tasks under per-task budgets")
    p.add_argument("recipe", help="recipe YAML (e.g. recipes/quickstart.yaml)")
    p.add_argument("--budget", action="append",
                   help="budget spec, repeatable: none | usd=0.05 | large_calls=5,10,15 | usd=0.05+large_calls=5")
    p.add_argument("--tasks", type=int, help="number of held-out tasks (default: recipe eval.tasks)")
    p.add_argument("--seed", type=int, help="seed (default: recipe seed)")
    p.add_argument("--policies", help="comma-separated baselines (default: recipe eval.policies)")
    p.add_argument("--out", help="output folder (default: recipe eval.out_dir or runs/<name>/eval)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_eval)

    p = sub.add_parser("train", help="run the recipe's stages in order")
    p.add_argument("recipe")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_train)

    p = sub.add_parser("check", help="validate a recipe")
    p.add_argument("recipe")
    p.set_defaults(func=_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"rlrouter {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
