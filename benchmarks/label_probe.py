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
mean-pooled over the prompt cut as the router reads it). The label is "the priciest tier";
AUC 0.5 is chance.

usage: python benchmarks/label_probe.py RECIPE [--layers 15,30] [--folds 4] [--json OUT.json]
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
    texts, label, groups = [], [], []
    for messages, prompts, task in zip(dataset["messages"], dataset["step_prompts"], dataset["task_id"]):
        routes = [m["content"] for m in messages if m["role"] == "assistant"]
        for prompt, route in zip(prompts, routes):
            texts.append(prompt)
            label.append(parse_tolerant(route, names, names[0]).tier == names[-1])
            groups.append(task)
    label, groups = np.array(label), np.array(groups)
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
        scores = np.zeros(len(texts))
        for train, test in GroupKFold(n_splits=folds).split(feats, label, groups):
            probe = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=8, cv=3, scoring="roc_auc", max_iter=2000))
            probe.fit(feats[train], label[train])
            scores[test] = probe.predict_proba(feats[test])[:, 1]
        results[name] = {"auc": round(float(roc_auc_score(label, scores)), 4), "dim": int(feats.shape[1])}
    print(f"\nbase: {recipe.router.base}; {folds} task-grouped folds")
    print(f"| probe | features | out-of-fold AUC ({names[-1]} label) |")
    print("|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['dim']} | {r['auc']:.3f} |")
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"recipe": recipe.name, "base": recipe.router.base, "decisions": len(texts),
                       "priciest_share": float(label.mean()), "folds": folds, "results": results,
                       "seconds": seconds}, handle, indent=1)


if __name__ == "__main__":
    main()
