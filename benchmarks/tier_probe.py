"""Which tier a trained router puts its probability on, for the synthesized decisions of
each labelled tier: teacher-forced P(tier | prompt, think text) at the route position, on
the SFT dataset's step examples (the data it was trained on, so this measures fitting,
not generalization).

A router that fits its data puts most mass on the labelled tier. If it puts little mass on
a middle tier even for the decisions labelled with it, the middle tier's decisions are
not learnable from what the prompt shows (or too rare to be fitted).

usage: python benchmarks/tier_probe.py RECIPE [--checkpoint DIR] [--per-tier 200]
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("--checkpoint", help="default: the recipe's SFT checkpoint")
    parser.add_argument("--per-tier", type=int, default=200)
    args = parser.parse_args()

    import numpy as np
    import torch
    from datasets import load_from_disk

    from rlrouter.boundary.synthesis import step_examples
    from rlrouter.config import load_recipe
    from rlrouter.router.checkpoint import load_checkpoint
    from rlrouter.router.prompt import ROUTE_OPEN, RouterFormat, parse_tolerant

    recipe = load_recipe(args.recipe)
    names = recipe.pool.names
    model, tokenizer, meta = load_checkpoint(args.checkpoint or recipe.sft_dir(), names)
    fmt = RouterFormat.from_meta(meta)
    steps = step_examples(load_from_disk(str(recipe.synth_dir() / "dataset")))
    first = [tokenizer(t, add_special_tokens=False)["input_ids"][0] for t in names]
    by_tier = {t: [] for t in names}
    for row in steps:
        route = row["messages"][-1]["content"]
        tier = parse_tolerant(route, names, names[0]).tier
        if len(by_tier[tier]) < args.per_tier:
            by_tier[tier].append(fmt.as_training_example(tokenizer, row["messages"]))
    model.eval()
    table = {}
    for tier, examples in by_tier.items():
        probs = []
        for messages in examples:
            turn = messages[-1]["content"]
            prefix = turn[: turn.index(ROUTE_OPEN) + len(ROUTE_OPEN)]
            ids = fmt.prompt_ids(tokenizer, [messages[:-1]])[0] + tokenizer(prefix, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0, -1]
            p = torch.softmax(logits[first], dim=0).numpy()  # over the tiers' first tokens
            probs.append(p)
        table[tier] = {"n": len(examples), "mean_p": {t: round(float(v), 3) for t, v in zip(names, np.mean(probs, axis=0))} if probs else {},
                       "argmax_share": {t: round(float(np.mean([np.argmax(p) == i for p in probs])), 3) for i, t in enumerate(names)} if probs else {}}
    print("| labelled tier | decisions | " + " | ".join(f"mean P({t})" for t in names) + " | " +
          " | ".join(f"argmax {t}" for t in names) + " |")
    print("|---|---|" + "---|" * (2 * len(names)))
    for tier, row in table.items():
        print(f"| {tier} | {row['n']} | " + " | ".join(str(row["mean_p"].get(t, "–")) for t in names) + " | " +
              " | ".join(str(row["argmax_share"].get(t, "–")) for t in names) + " |")
    print(json.dumps(table))


if __name__ == "__main__":
    main()
