"""`rlrouter report`: the RL ablation table of a recipe, over several seeds.

Rows: the baselines (always-small, always-large, random(p), first-large, escalate,
oracle), the SFT router, and RL variants trained from the same SFT checkpoint:

    grpo+cost      GRPO with the plain cost-penalized reward (λ in $⁻¹, see below)
    bopo-no-ref    BoPO without the reference-guided baseline (group mean only)
    bopo-no-bonus  BoPO without the difficulty bonus (β = 0)
    bopo           BoPO as the recipe's ``rl`` section sets it
    ppo            PPO (value head, GAE) on the BoPO reward

Each RL variant is trained once per seed (the seed changes the RL run: task order,
budgets, sampling; the SFT checkpoint is shared) and evaluated greedily on the recipe's
held-out tasks under every eval budget. Rows give the mean and the standard deviation over
seeds. ``trained cap`` says whether the budget was among ``rl.budgets``: the others show a
budget-conditioned router at caps it never trained with.

grpo+cost's λ is the recipe's BoPO λ converted to dollars at the training tasks' mean
always-large − always-small cost gap, so both rewards price "all large instead of all
small" the same on average.
"""

from __future__ import annotations

import copy
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

import numpy as np

from rlrouter.config import Recipe
from rlrouter.rl.config import RLConfig
from rlrouter.evaluate.report import budget_order, write_atomic

VARIANTS = {
    "grpo+cost": {"algorithm": "grpo", "reward": "cost"},
    "bopo-no-ref": {"algorithm": "bopo", "ref_weight_small": 0.0, "ref_weight_large": 0.0},
    "bopo-no-bonus": {"algorithm": "bopo", "hard_bonus": 0.0},
    "bopo": {"algorithm": "bopo"},
    "ppo": {"algorithm": "ppo", "reward": "bopo", "credit": "episode"},  # PPO's credit is its value function
}
METRICS = ("success", "mean_cost_usd", "large_fraction", "gap_recovered", "well_formed")


def variant_settings(recipe: Recipe, variant: str, boundaries: dict):
    """The recipe's RL settings with the variant's changes."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown report variant {variant!r}; choose from {list(VARIANTS)}")
    settings = {**vars(recipe.rl), **VARIANTS[variant]}
    if settings["reward"] == "cost" and recipe.rl.reward == "bopo":
        gap = float(np.mean([b.c_large - b.c_small for b in boundaries.values()]))
        low, high = recipe.rl.lambda_range()
        settings["cost_lambda"] = [low / gap, high / gap]
    return RLConfig(**settings)


def run_report(recipe: Recipe, train_rl: Callable, seeds: list[int], variants: list[str],
               out_dir: str | Path | None = None, tasks: int | None = None, progress: bool = True) -> dict:
    """Train every variant for every seed with ``train_rl(recipe, init=, out_dir=, progress=)``
    (the pipeline's RL stage, handed in) and evaluate it beside the baselines."""
    from rlrouter.evaluate.job import eval_recipe
    from rlrouter.evaluate.runner import summarize
    from rlrouter.rl.trainer import load_boundaries
    from rlrouter.router.checkpoint import load_checkpoint
    from rlrouter.evaluate.router_policy import RouterPolicy

    out_dir = Path(out_dir or f"runs/{recipe.name}/report")
    sft = recipe.sft_dir()
    if not (sft / "rlrouter.json").is_file():
        raise FileNotFoundError(f"no SFT checkpoint at {sft}: run `rlrouter train {recipe.path}` (synth and sft) first")
    boundaries = load_boundaries(recipe.synth_dir() / "boundary.json")
    start = time.perf_counter()
    base = copy.deepcopy(recipe)
    base.eval.router_bias = [0.0]
    baseline = eval_recipe(base, tasks=tasks, out_dir=out_dir / "baselines", checkpoint=sft, progress=progress)
    rows = [{**r, "policy": "sft" if r["policy"] == "router" else r["policy"], "seeds": 1} for r in baseline["rows"]]
    episodes = json.loads(Path(baseline["paths"]["json"]).read_text())["episodes"]
    references = [r for r in episodes if r["policy"] in ("always-small", "always-large") and r["budget"] == "none"]
    labels = {r["task_id"]: r["taxonomy"] for r in episodes}

    from rlrouter.evaluate.runner import EpisodeRecord

    reference_records = [EpisodeRecord(**r) for r in references]
    env = recipe.make_env(recipe.eval.split)
    world = env.world
    task_ids = env.task_ids[: tasks or recipe.eval.tasks]
    trained = {b.label for b in _rl_budgets(recipe)}
    per_seed: dict[tuple[str, str], list[dict]] = defaultdict(list)
    runs = []
    for variant in variants:
        for seed in seeds:
            run = copy.deepcopy(recipe)
            run.seed = seed
            run.rl = variant_settings(recipe, variant, boundaries)
            path = train_rl(run, init=sft, out_dir=out_dir / f"{variant}-seed{seed}", progress=progress)
            model, tok, meta = load_checkpoint(path, recipe.pool.names)
            policy = RouterPolicy.from_checkpoint(model, tok, meta, recipe, name=variant)
            records = policy.evaluate(lambda: recipe.make_env(recipe.eval.split, world=world), task_ids,
                                      recipe.budgets(), recipe.seed, progress=progress)
            for record in records:
                record.taxonomy = labels.get(record.task_id)
            for row in summarize(records + reference_records, recipe.pool.priciest.name, recipe.pool.names):
                if row["policy"] == variant:
                    per_seed[(variant, row["budget"])].append(row)
            runs.append({"variant": variant, "seed": seed, "checkpoint": str(path),
                         "last_metrics": meta["rl"]["last_metrics"]})
    for (variant, budget), group in per_seed.items():
        row = {"policy": variant, "budget": budget, "seeds": len(group), "trained_cap": budget in trained,
               "budget_violations": sum(r["budget_violations"] for r in group)}
        for key in METRICS:
            values = [r[key] for r in group if r.get(key) is not None]
            row[key] = float(np.mean(values)) if values else None
            row[f"{key}_std"] = float(np.std(values)) if values else None
        rows.append(row)
    meta = {"recipe": recipe.name, "seeds": seeds, "variants": variants, "tasks": len(task_ids),
            "rl_budgets": sorted(trained), "runs": runs, "seconds": time.perf_counter() - start,
            "taxonomy_counts": baseline["meta"]["taxonomy_counts"]}
    paths = write_ablation(out_dir, rows, meta)
    return {"rows": rows, "paths": paths, "meta": meta}


def _rl_budgets(recipe: Recipe):
    from rlrouter.config import parse_budgets

    return parse_budgets(recipe.rl.budgets, where="rl.budgets")


def _pm(row: dict, key: str, spec: str) -> str:
    value, std = row.get(key), row.get(f"{key}_std")
    if value is None:
        return "–"
    return format(value, spec) + (f" ± {format(std, spec)}" if std is not None and row.get("seeds", 1) > 1 else "")


def ablation_table(rows: list[dict]) -> str:
    header = ("| budget | policy | seeds | success | mean cost ($) | large frac | gap recovered | violations | "
              "trained cap |")
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    for row in sorted(rows, key=lambda r: (budget_order(r["budget"]), r["mean_cost_usd"])):
        cap = {True: "yes", False: "no", None: "–"}[row.get("trained_cap")]
        lines.append(f"| {row['budget']} | {row['policy']} | {row.get('seeds', 1)} | {_pm(row, 'success', '.3f')} | "
                     f"{_pm(row, 'mean_cost_usd', '.4f')} | {_pm(row, 'large_fraction', '.2f')} | "
                     f"{_pm(row, 'gap_recovered', '.2f')} | {row['budget_violations']} | {cap} |")
    return "\n".join(lines)


def write_ablation(out_dir: Path, rows: list[dict], meta: dict) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {"json": out_dir / "report.json", "markdown": out_dir / "report.md", "plot": out_dir / "report.png"}
    write_atomic(paths["json"], json.dumps({"meta": meta, "rows": rows}, indent=1))
    text = (f"# RL report: {meta['recipe']}\n\n{meta['tasks']} held-out tasks; RL variants over seeds "
            f"{meta['seeds']} (mean ± std); trained caps: {meta['rl_budgets']}.\n\n" + ablation_table(rows) + "\n")
    write_atomic(paths["markdown"], text)
    budgets = sorted({r["budget"] for r in rows}, key=budget_order)
    fig, axes = plt.subplots(1, len(budgets), figsize=(4.6 * len(budgets), 4.0), squeeze=False, sharey=True)
    for ax, budget in zip(axes[0], budgets):
        for row in (r for r in rows if r["budget"] == budget):
            is_rl = row["policy"] in VARIANTS
            ax.errorbar(row["mean_cost_usd"], row["success"], xerr=row.get("mean_cost_usd_std") if is_rl else None,
                        yerr=row.get("success_std") if is_rl else None, fmt="D" if is_rl else "o",
                        markersize=7 if is_rl else 5, capsize=3, label=row["policy"], alpha=0.9 if is_rl else 0.6)
        ax.set_title(f"budget: {budget}")
        ax.set_xlabel("mean cost per task (USD)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("success rate")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower right")
    fig.suptitle(f"{meta['recipe']}: RL variants (mean ± std over {len(meta['seeds'])} seeds) vs baselines")
    fig.tight_layout()
    fig.savefig(paths["plot"], dpi=110)
    plt.close(fig)
    return paths
