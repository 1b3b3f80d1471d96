"""`rlrouter eval`: baselines on held-out tasks under budgets -> JSON, table, frontier PNG."""

from __future__ import annotations

import time
from pathlib import Path

from envs.budget import Budget
from rlrouter.boundary import boundary_runs, classify, taxonomy_counts
from rlrouter.config import Recipe
from rlrouter.evaluate.baselines import make_baselines
from rlrouter.evaluate.report import write_report
from rlrouter.evaluate.runner import REFERENCE_BUDGET, evaluate, summarize

REFERENCE_POLICIES = ("always-small", "always-large")


def eval_recipe(recipe: Recipe, budgets: list[Budget] | None = None, tasks: int | None = None,
                seed: int | None = None, out_dir: str | Path | None = None, policies: list[str] | None = None,
                checkpoint: str | Path | dict | None = None, progress: bool = True) -> dict:
    """Evaluate the recipe's baselines (and router checkpoints, if given) under budgets.

    ``checkpoint`` is one path (its rows are named ``router``) or ``{name: path}`` (e.g.
    ``{"sft": ..., "bopo": ...}``); each is evaluated at every ``eval.router_bias``
    (``name(bias=1)``). Returns ``{"rows", "paths", "meta"}``.
    """
    cfg = recipe.eval
    seed = recipe.seed if seed is None else seed
    budgets = budgets or recipe.budgets()
    for budget in budgets:
        budget.check_tiers(recipe.pool)
    env = recipe.make_env(cfg.split)
    n_tasks = cfg.tasks if tasks is None else tasks
    if n_tasks > len(env.task_ids):
        raise ValueError(f"eval.tasks = {n_tasks}, but split {cfg.split!r} has only {len(env.task_ids)} tasks")
    task_ids = env.task_ids[:n_tasks]

    start = time.perf_counter()
    stats = boundary_runs(env, task_ids, k=cfg.boundary_k, seed=seed + 1, progress=progress)
    labels = {t: classify(s.s_small, s.s_large, cfg.taxonomy_threshold) for t, s in stats.items()}

    names = list(policies or cfg.policies)
    kwargs = dict(random_p=cfg.random_p, first_large_k=cfg.first_large_k,
                  oracle_max_expansions=cfg.oracle_max_expansions)
    policy_objs = make_baselines(names, len(recipe.pool), **kwargs)
    records, timing = evaluate(env, policy_objs, task_ids, budgets, seed=seed, taxonomy=labels, progress=progress)
    env.close()  # hands a text game's session back before the routers play (the world stays open)
    checkpoints = {} if checkpoint is None else (checkpoint if isinstance(checkpoint, dict)
                                                 else {"router": checkpoint})
    for label, path in checkpoints.items():
        from rlrouter.router.checkpoint import load_checkpoint
        from rlrouter.evaluate.router_policy import RouterPolicy

        model, tokenizer, ckpt_meta = load_checkpoint(path, recipe.pool.names)
        world = env.world
        routed = []
        for bias in cfg.router_bias:
            name = label if not bias else f"{label}(bias={bias:g})"
            router = RouterPolicy.from_checkpoint(model, tokenizer, ckpt_meta, recipe, name=name, route_bias=float(bias))
            routed += router.evaluate(lambda: recipe.make_env(cfg.split, world=world), task_ids, budgets, seed,
                                      progress=progress)
        for record in routed:
            record.taxonomy = labels.get(record.task_id)
        records += routed
    # The two boundary policies without a budget are the reference of gap_recovered.
    if all(b.label != REFERENCE_BUDGET for b in budgets):
        refs = make_baselines(REFERENCE_POLICIES, len(recipe.pool))
        more, _ = evaluate(env, refs, task_ids, [Budget()], seed=seed, taxonomy=labels, progress=progress)
        records += more
    rows = summarize(records, recipe.pool.priciest.name)
    meta = {
        "recipe": recipe.name,
        "recipe_path": str(recipe.path) if recipe.path else None,
        "seed": seed,
        "split": cfg.split,
        "tasks": n_tasks,
        "budgets": [b.label for b in budgets],
        "pool": recipe.pool.describe(),
        "taxonomy_threshold": cfg.taxonomy_threshold,
        "taxonomy_counts": taxonomy_counts(labels),
        "boundary": {t: s.to_dict() for t, s in stats.items()},
        "checkpoints": {name: str(path) for name, path in checkpoints.items()},
        "seconds": time.perf_counter() - start,
    }
    paths = write_report(Path(out_dir) if out_dir else recipe.out_dir(), rows, [r.to_dict() for r in records], meta)
    return {"rows": rows, "paths": paths, "meta": meta}
