"""Can the router's prompt predict its own SFT labels? Linear probes on the synthesized decisions.

``benchmarks/tier_probe.py`` asks whether a trained router fits its SFT data;
``benchmarks/step_probe.py`` and ``query_probe.py`` whether the prompt predicts where the
priciest tier gains. This asks the question between them: do the step prompts predict the
tier that boundary-guided synthesis wrote for them? If a linear probe on the base's hidden
states cannot tell the decisions labelled with the priciest tier from the others, no
amount of fine-tuning will (the labels are the deficit: data); if it can and the trained
router does not, the fine-tuning is.

The decisions are the SFT dataset's (``rlrouter.boundary.synthesis.step_examples`` of the
recipe's synthesis output, so run the synth stage first). A logistic probe (standardized
features, L2 strength by inner cross-validation) is scored out of fold, folds grouped by
task so no task's steps are on both sides, on each representation of the step prompt:
``minilm`` (the embedding routers' features) and ``base@L`` (the router base's layer L,
mean-pooled over the step prompt cut to ``router.max_prompt_tokens``, the prompt
alone: the router spends part of that limit on its system message). The label is "the priciest tier";
AUC 0.5 is chance.

``--hidden-gain TAU`` also probes, at the very same decisions, the hidden label a clean
synthesis would write: "the priciest tier's gain at this step (P(priciest does it) −
P(cheapest does), the world's executor model) is at least TAU". Each row's episode is
replayed (its budget and seed as ``synthesize`` drew them, ``episode_draw``; the replay must
give the row's cost and outcome) to read the gain before each decision. If the hidden label
is predictable here and the synthesized one is not, the labels' noise is the deficit; if
neither is, it is the decisions (which steps, how many). Worlds with simulated executors only.

usage: python benchmarks/label_probe.py RECIPE [--layers 15,30] [--folds 4] [--hidden-gain 0.3]
                                       [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import time

from common import pooled_hidden_states


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("--layers", default="15,30", help="base layers to probe (0 = embeddings)")
    parser.add_argument("--folds", type=int, default=4, help="task-grouped cross-validation folds")
    parser.add_argument("--hidden-gain", type=float, help="also probe the hidden label gain >= this")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    from pathlib import Path

    import numpy as np
    from datasets import load_from_disk
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from rlrouter.config import load_recipe
    from rlrouter.evaluate.encoder import SentenceEncoder
    from rlrouter.router.checkpoint import load_router
    from rlrouter.router.prompt import parse_tolerant

    recipe = load_recipe(args.recipe)
    data_dir = Path(recipe.synth_dir()) / "dataset"
    if not data_dir.is_dir():
        raise SystemExit(f"{data_dir}: no synthesized dataset; run "
                         f"`python -m rlrouter synth {args.recipe}` first")
    dataset = load_from_disk(str(data_dir))
    names = recipe.pool.names
    texts, label, groups, routes = [], [], [], []
    for messages, prompts, task in zip(dataset["messages"], dataset["step_prompts"], dataset["task_id"]):
        route = [names.index(parse_tolerant(m["content"], names, names[0]).tier)
                 for m in messages if m["role"] == "assistant"]
        routes.append(route)
        for prompt, action in zip(prompts, route):
            texts.append(prompt)
            label.append(action == len(names) - 1)
            groups.append(task)
    label, groups = np.array(label), np.array(groups)
    labels, hidden_summary = {"synthesized": label}, {}
    if args.hidden_gain is not None:
        # the tiers the episodes played (relabelled rows write others; older datasets have no column)
        played = dataset["played"] if "played" in dataset.column_names else routes
        gains = decision_gains(recipe, dataset, played)
        hidden = f"gain>={args.hidden_gain:g}"
        labels[hidden] = gains >= args.hidden_gain
        agree = float(np.mean(labels[hidden] == label))
        hidden_summary = {"hidden_gain": {"tau": args.hidden_gain, "mean_gain": float(gains.mean()),
                                          "share": float(labels[hidden].mean()), "agreement": agree}}
        print(f"hidden gain at the decisions: mean {gains.mean():.3f}; share >= {args.hidden_gain:g} "
              f"{labels[hidden].mean():.3f}; agreement with the synthesized label {agree:.3f}",
              flush=True)
    folds = min(args.folds, len(set(groups)))
    print(f"{recipe.name}: {len(texts)} synthesized decisions of {len(set(groups))} tasks; "
          f"{label.mean():.3f} labelled {names[-1]}", flush=True)
    if label.all() or not label.any():
        raise SystemExit(f"{data_dir}: every decision has the same label; nothing to probe")

    seconds, features = {}, {}
    started = time.perf_counter()
    encoder = SentenceEncoder(recipe.eval.embedding.model, recipe.eval.embedding.cache_dir)
    features["minilm"] = encoder.encode(texts)
    seconds["minilm"] = time.perf_counter() - started
    if recipe.router.base != "tiny":
        layers = [int(x) for x in args.layers.split(",")]
        started = time.perf_counter()
        model, tokenizer = load_router(recipe.router.base)
        model.eval()
        pooled = pooled_hidden_states(model, tokenizer, texts, layers, recipe.router.max_prompt_tokens,
                                      recipe.router.cut_head_share, "decisions")
        features.update({f"base@{layer}": pooled[layer] for layer in layers})
        seconds["base"] = time.perf_counter() - started

    results = {}
    for name, feats in features.items():
        results[name] = {"dim": int(feats.shape[1])}
        for which, target in labels.items():
            scores = np.zeros(len(texts))
            for train, test in GroupKFold(n_splits=folds).split(feats, target, groups):
                probe = make_pipeline(StandardScaler(),
                                      LogisticRegressionCV(Cs=8, cv=3, scoring="roc_auc", max_iter=2000))
                probe.fit(feats[train], target[train])
                scores[test] = probe.predict_proba(feats[test])[:, 1]
            results[name]["auc" if which == "synthesized" else f"auc {which}"] = round(
                float(roc_auc_score(target, scores)), 4)
    print(f"\nbase: {recipe.router.base}; {folds} task-grouped folds")
    extra = [w for w in labels if w != "synthesized"]
    print(f"| probe | features | out-of-fold AUC ({names[-1]} label) |" + "".join(f" AUC ({w}) |" for w in extra))
    print("|---|---|---|" + "---|" * len(extra))
    for name, r in results.items():
        print(f"| {name} | {r['dim']} | {r['auc']:.3f} |" + "".join(f" {r[f'auc {w}']:.3f} |" for w in extra))
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"recipe": recipe.name, "base": recipe.router.base, "decisions": len(texts),
                       "priciest_share": float(label.mean()), "folds": folds, "results": results,
                       **hidden_summary, "seconds": seconds}, handle, indent=1)


def decision_gains(recipe, dataset, routes):
    """The priciest tier's hidden gain before every synthesized decision, in dataset order:
    each row's played route (tier indices) replayed under the budget and seed ``synthesize`` drew for it."""
    import numpy as np

    from rlrouter.boundary.synthesis import episode_draw

    env = recipe.make_env(recipe.synth.split)
    if not hasattr(env.world, "success_probability"):
        raise SystemExit(f"--hidden-gain: the {env.world.name!r} world has no executor model to read a gain from")
    task_ids = env.task_ids[: recipe.synth.tasks]
    budgets = recipe.synth_budgets()
    gains, cache = [], {}
    for row, route in zip(dataset, routes):
        key = (row["task_id"], tuple(route), row["budget"], row["cost_usd"])
        if key not in cache:
            index = task_ids.index(row["task_id"])
            draws = [episode_draw(recipe.seed, index, draw, budgets)
                     for draw in range(recipe.synth.hard_seeds if row["taxonomy"] == "hard" else 1)]
            cache[key] = row_gains(env, row, route, draws)
        gains.extend(cache[key])
    env.close()
    return np.array(gains)


def row_gains(env, row, route, draws):
    """The gains along the first of ``draws`` (budget, seed) that replays ``row``."""
    for budget, seed in draws:
        if budget.label == row["budget"]:
            found = replay_gains(env, row, route, budget, seed)
            if found is not None:
                return found
    raise SystemExit(f"{row['task_id']}: no draw of synthesize replays this row (cost "
                     f"{row['cost_usd']}); was the dataset made by this code and recipe?")


def replay_gains(env, row, route, budget, seed):
    """The priciest tier's gain before each step of ``route`` replayed from ``reset(seed)``,
    or None where the replay does not end as the row did (its cost and outcome)."""
    world, names = env.world, env.pool.names
    env.reset(seed=seed, options={"task_id": row["task_id"], "budget": budget})
    found = []
    for action in route:
        found.append(world.success_probability(env._state, names[-1])
                     - world.success_probability(env._state, names[0]))
        _, _, terminated, truncated, info = env.step(action)
        if terminated or truncated:
            break
    same = (len(found) == len(route) and bool(info["success"]) == row["success"]
            and abs(info["cost_usd"] - row["cost_usd"]) < 1e-9)
    return found if same else None


if __name__ == "__main__":
    main()
