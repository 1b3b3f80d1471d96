"""Does a router's base carry the signal a route needs? Linear probes on recorded queries.

For a two-model replay table (the recipe's cheapest and priciest tiers), each query is
labelled *gain* when the priciest model answered it correctly and the cheapest did not: the
only queries where routing to the expensive model pays. A logistic probe (standardized
features, L2 strength chosen by 5-fold cross-validation on the training queries) predicts the
gain from each representation of the query text:

- ``subject``: the query's recorded subject, one-hot (what a router learns from a task tag);
- ``minilm``: the all-MiniLM-L6-v2 sentence embedding (the embedding routers' features);
- ``base@L``: the pretrained router base's hidden states at layer L, mean-pooled over the
  query's tokens (the query cut to the recipe's ``router.max_prompt_tokens`` head and tail).

Each probe's score ranks the held-out queries; routing the top-k to the priciest model for
every k gives a PGR curve and its APGR at query level (random routing: 0.5), with a
bootstrap standard error over the held-out queries, beside the probe's ROC AUC for the gain
label. A base whose probe reaches the embedding's APGR has the information a trained
router needs; a trained router below it fails in its data, format or training, not in its
base.

usage: python benchmarks/query_probe.py RECIPE [--train 1500] [--test 600] [--layers 15,30]
                                           [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import time

from common import pooled_hidden_states


def query_apgr(scores, cheap, strong) -> float:
    """APGR of routing the top-k ``scores`` to the strong model, k = 0..n (ties broken by order)."""
    import numpy as np

    from rlrouter.evaluate.curves import apgr

    order = np.argsort(-np.asarray(scores), kind="stable")
    n = len(order)
    gain = (strong.astype(float) - cheap.astype(float))[order]
    quality = (cheap.sum() + np.concatenate([[0.0], np.cumsum(gain)])) / n
    low, high = cheap.mean(), strong.mean()
    return apgr(np.arange(n + 1) / n, (quality - low) / (high - low))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("--train", type=int, default=1500, help="training queries (from the recipe's train split)")
    parser.add_argument("--test", type=int, default=600, help="held-out queries (from its test split)")
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
    env = recipe.make_env("train")
    world = env.world
    table = world.table
    cheap_model, strong_model = world.models[recipe.pool.names[0]], world.models[recipe.pool.names[-1]]
    rng = np.random.default_rng(recipe.seed)
    rows = {split: np.sort(rng.choice(world.split_rows(split), min(n, len(world.split_rows(split))), replace=False))
            for split, n in (("train", args.train), ("test", args.test))}
    texts = {s: [table.prompts[r][:world.config.prompt_chars] for r in rows[s]] for s in rows}
    cheap = {s: table.correct[cheap_model][rows[s]] for s in rows}
    strong = {s: table.correct[strong_model][rows[s]] for s in rows}
    label = {s: strong[s] & ~cheap[s] for s in rows}
    print(f"{table.source}: {len(rows['train'])} training and {len(rows['test'])} held-out queries; "
          f"gain share {label['train'].mean():.3f} / {label['test'].mean():.3f}; "
          f"{cheap_model} {cheap['test'].mean():.3f}, {strong_model} {strong['test'].mean():.3f} correct (held out)",
          flush=True)

    features, seconds = {}, {}
    if table.subjects:
        names = sorted(set(table.subjects))
        index = {name: i for i, name in enumerate(names)}
        features["subject"] = {s: np.eye(len(names))[[index[table.subjects[r]] for r in rows[s]]] for s in rows}
    started = time.perf_counter()
    encoder = SentenceEncoder(recipe.eval.embedding.model, recipe.eval.embedding.cache_dir)
    features["minilm"] = {s: encoder.encode(texts[s]) for s in rows}
    seconds["minilm"] = time.perf_counter() - started

    base = recipe.router.base
    if base != "tiny":
        layers = [int(x) for x in args.layers.split(",")]
        started = time.perf_counter()
        model, tokenizer = load_router(base)
        model.eval()
        pooled = {split: pooled_hidden_states(model, tokenizer, split_texts, layers, recipe.router.max_prompt_tokens,
                                              recipe.router.cut_head_share, f"{split} queries")
                  for split, split_texts in texts.items()}
        for layer in layers:
            features[f"base@{layer}"] = {split: pooled[split][layer] for split in pooled}
        seconds["base"] = time.perf_counter() - started

    results = {}
    for name, feats in features.items():
        probe = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=8, cv=5, scoring="roc_auc", max_iter=2000))
        probe.fit(feats["train"], label["train"])
        scores = probe.predict_proba(feats["test"])[:, 1]
        value = query_apgr(scores, cheap["test"], strong["test"])
        draws = []
        for _ in range(args.resamples):
            pick = rng.integers(0, len(scores), len(scores))
            draws.append(query_apgr(scores[pick], cheap["test"][pick], strong["test"][pick]))
        results[name] = {"apgr": round(value, 4), "apgr_se": round(float(np.std(draws)), 4),
                         "auc": round(float(roc_auc_score(label["test"], scores)), 4), "dim": int(feats["train"].shape[1])}
    draws = [query_apgr(rng.random(len(rows["test"])), cheap["test"], strong["test"]) for _ in range(args.resamples)]
    results["random"] = {"apgr": round(float(np.mean(draws)), 4), "apgr_se": round(float(np.std(draws)), 4),
                         "auc": 0.5, "dim": 0}
    print(f"\nbase: {base}; max_prompt_tokens {recipe.router.max_prompt_tokens}")
    print("| probe | features | query-level APGR | ± SE | AUC (gain) |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['dim']} | {r['apgr']:.3f} | {r['apgr_se']:.3f} | {r['auc']:.3f} |")
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"recipe": recipe.name, "base": base, "train": len(rows["train"]), "test": len(rows["test"]),
                       "gain_share_test": float(label["test"].mean()), "results": results, "seconds": seconds},
                      handle, indent=1)


if __name__ == "__main__":
    main()
