"""Does a text-game router's prompt carry the signal a route needs? Linear probes on steps.

For a text-game recipe (TextWorld, ScienceWorld) with simulated executors, episodes are
played with random routing (the priciest tier with probability ``--p``) on the recipe's
train and test games. At every step the router's own step prompt is recorded
(``rlrouter.router.prompt.step_user_message``: task, budget, recent tiers and outcomes,
the game's last answer) beside the hidden *expected gain* of the step,
``P(priciest tier writes the gold command) - P(cheapest tier does)`` from the world's
executor model (it depends on the gold command's verb, which no router sees). A step is a
*gain step* when that difference is at least ``--gain`` (0.3: the unlock / cook / slice
steps, where the cheap tier mostly fails and the strong one mostly succeeds).

A logistic probe (standardized features, L2 strength by 5-fold cross-validation on the
train games' steps) predicts the gain step from each representation of the prompt:

- ``minilm``: the all-MiniLM-L6-v2 embedding (the embedding routers' features);
- ``base@L``: the router base's hidden states at layer L, mean-pooled (the step prompt alone
  cut to the recipe's ``router.max_prompt_tokens``, head and tail; the router's own prompt
  spends part of that limit on its system message);
- ``gold verb``: the hidden gold command's verb, one-hot: the upper bound of what a probe
  could reach, and a check on the measurement.

On the test games' steps each probe's score ranks the steps; sending the top-k to the
priciest tier for every k captures a share of the total expected gain; the area under that
curve is the step-level APGR (random 0.5; the ``oracle`` ranks by the hidden gain itself),
with a bootstrap standard error over test games, beside the probe's ROC AUC.

usage: python benchmarks/step_probe.py RECIPE [--episodes 2] [--p 0.5] [--layers 15,30]
                                          [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import time

from common import pooled_hidden_states


def capture_apgr(scores, gains) -> float:
    """Area under the share of the total expected gain captured by routing the top-k
    ``scores`` to the priciest tier, k = 0..n (ties broken by order)."""
    import numpy as np

    order = np.argsort(-np.asarray(scores), kind="stable")
    captured = np.concatenate([[0.0], np.cumsum(np.asarray(gains, dtype=float)[order])]) / max(np.sum(gains), 1e-12)
    return float(np.trapezoid(captured, np.linspace(0.0, 1.0, len(captured))))


def play_steps(recipe, world, split: str, episodes: int, p: float, seed: int) -> list[dict]:
    """Every step of ``episodes`` random-routed episodes per game of ``split``: the router's
    step prompt, the hidden expected gain and gold verb, and the game played."""
    import numpy as np

    from rlrouter.router.prompt import step_user_message

    env = recipe.make_env(split, world=world)
    names = recipe.pool.names
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    steps = []
    try:
        for n, task in enumerate(env.task_ids):
            for episode in range(episodes):
                env.reset(seed=int(rng.integers(2 ** 31 - 1)), options={"task_id": task})
                while not env.finished:
                    state = env._state
                    gold = world.gold_command(state) or ""
                    steps.append({"game": task, "prompt": step_user_message(env.view()),
                                  "gain": world.success_probability(state, names[-1])
                                  - world.success_probability(state, names[0]),
                                  "verb": gold.split(" ", 1)[0].lower()})
                    env.step(len(names) - 1 if rng.random() < p else 0)
            print(f"\r{split}: {n + 1}/{len(env.task_ids)} games, {len(steps)} steps", end="", flush=True)
    finally:
        env.close()
    print()
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("--episodes", type=int, default=2, help="random-routed episodes per game")
    parser.add_argument("--p", type=float, default=0.5, help="P(priciest tier) of the random routing played")
    parser.add_argument("--gain", type=float, default=0.3, help="expected gain from which a step is a gain step")
    parser.add_argument("--layers", default="15,30", help="base layers to probe (0 = embeddings)")
    parser.add_argument("--resamples", type=int, default=500)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    import numpy as np
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from rlrouter.config import load_recipe
    from rlrouter.evaluate.encoder import SentenceEncoder
    from rlrouter.router.checkpoint import load_router

    recipe = load_recipe(args.recipe)
    world = recipe.build_world()
    if not hasattr(world, "success_probability"):
        raise SystemExit(f"{args.recipe}: world.kind {recipe.world.kind!r} has no simulated executor model to "
                         "label steps with; use a text-game recipe (textworld, scienceworld)")
    started = time.perf_counter()
    try:
        steps = {split: play_steps(recipe, world, split, args.episodes, args.p, recipe.seed) for split in ("train", "test")}
    finally:
        world.close()
    seconds = {"play": time.perf_counter() - started}
    texts = {s: [x["prompt"] for x in steps[s]] for s in steps}
    gains = {s: np.array([x["gain"] for x in steps[s]]) for s in steps}
    label = {s: gains[s] >= args.gain for s in steps}
    games = np.array([x["game"] for x in steps["test"]])
    print(f"{recipe.name}: {len(steps['train'])} training and {len(steps['test'])} held-out steps; gain-step share "
          f"{label['train'].mean():.3f} / {label['test'].mean():.3f}; mean expected gain {gains['test'].mean():.3f}",
          flush=True)

    features = {}
    verbs = sorted({x["verb"] for s in steps for x in steps[s]})
    features["gold verb"] = {s: np.eye(len(verbs))[[verbs.index(x["verb"]) for x in steps[s]]] for s in steps}
    started = time.perf_counter()
    encoder = SentenceEncoder(recipe.eval.embedding.model, recipe.eval.embedding.cache_dir)
    features["minilm"] = {s: encoder.encode(texts[s]) for s in steps}
    seconds["minilm"] = time.perf_counter() - started
    base = recipe.router.base
    if base != "tiny":
        layers = [int(x) for x in args.layers.split(",")]
        started = time.perf_counter()
        model, tokenizer = load_router(base)
        model.eval()
        pooled = {s: pooled_hidden_states(model, tokenizer, texts[s], layers, recipe.router.max_prompt_tokens,
                                          recipe.router.cut_head_share, f"{s} steps") for s in steps}
        for layer in layers:
            features[f"base@{layer}"] = {s: pooled[s][layer] for s in steps}
        seconds["base"] = time.perf_counter() - started

    rng = np.random.default_rng(recipe.seed)
    names = sorted(set(games))
    rows = {g: np.flatnonzero(games == g) for g in names}

    def summarize(scores, auc=True) -> dict:
        draws = []
        for _ in range(args.resamples):  # resample test games, not steps: steps of a game are alike
            pick = np.concatenate([rows[g] for g in rng.choice(names, len(names))])
            draws.append(capture_apgr(scores[pick], gains["test"][pick]))
        return {"apgr": round(capture_apgr(scores, gains["test"]), 4), "apgr_se": round(float(np.std(draws)), 4),
                "auc": round(float(roc_auc_score(label["test"], scores)), 4) if auc else 0.5}

    results = {}
    for name, feats in features.items():
        probe = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=8, cv=5, scoring="roc_auc", max_iter=2000))
        probe.fit(feats["train"], label["train"])
        results[name] = {**summarize(probe.predict_proba(feats["test"])[:, 1]), "dim": int(feats["train"].shape[1])}
    results["oracle"] = {**summarize(gains["test"]), "dim": 0}
    random = [capture_apgr(rng.random(len(games)), gains["test"]) for _ in range(args.resamples)]
    results["random"] = {"apgr": round(float(np.mean(random)), 4), "apgr_se": round(float(np.std(random)), 4),
                         "auc": 0.5, "dim": 0}
    print(f"\nbase: {base}; max_prompt_tokens {recipe.router.max_prompt_tokens}; random routing p={args.p}")
    print("| probe | features | step-level APGR | ± SE | AUC (gain step) |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['dim']} | {r['apgr']:.3f} | {r['apgr_se']:.3f} | {r['auc']:.3f} |")
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"recipe": recipe.name, "base": base, "train": len(steps["train"]), "test": len(steps["test"]),
                       "gain_step_share_test": float(label["test"].mean()), "results": results, "seconds": seconds},
                      handle, indent=1)


if __name__ == "__main__":
    main()
