"""Training speed of a pretrained router base: SFT step tokens/s with the top k layers
trained (``router.train_layers``) against all layers, on the same batches in one run.

The base is prepared as the SFT stage prepares it (``as_router``: format tags as tokens,
the router template), the batches are router step prompts of the recipe's world with a
route-only answer, cut to ``router.max_prompt_tokens`` as training cuts them. Each setting
runs ``--warmup`` steps, then ``--steps`` timed AdamW steps (forward, backward, update);
tokens/s counts the tokens of the batches (padding excluded).

Rollout tokens/s on transformers and on vLLM (and their ratio) come from
``benchmarks/rollout.py --recipe recipes/smollm2-mmlu.yaml --checkpoint runs/smollm2-mmlu/sft``.

usage: python benchmarks/base_speed.py [--recipe recipes/smollm2-mmlu.yaml] [--layers 4] [--batch 8] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import time


def step_conversations(recipe, fmt, n: int) -> list[list[dict]]:
    """The first step prompt (system, user) of ``n`` training tasks of the recipe's world."""
    from envs import Budget
    from rlrouter.router.prompt import step_user_message

    env = recipe.make_env("train")
    conversations = []
    for task in env.task_ids[:n]:
        env.reset(seed=0, options={"task_id": task, "budget": Budget()})
        conversations.append([{"role": "system", "content": fmt.system(env.pool.describe())},
                              {"role": "user", "content": step_user_message(env.view())}])
    return conversations


def step_batches(recipe, tokenizer, fmt, n: int, batch: int):
    """``n`` batches of rendered step examples (system, step prompt, route) as padded tensors."""
    import torch

    prompts = fmt.prompt_ids(tokenizer, step_conversations(recipe, fmt, n * batch))
    answer = tokenizer(fmt.route("small", "") + "<|im_end|>", add_special_tokens=False)["input_ids"]
    batches = []
    for i in range(n):
        rows = [p + answer for p in prompts[i * batch:(i + 1) * batch]]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), tokenizer.pad_token_id)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, width - len(row):] = torch.tensor(row)
            mask[r, width - len(row):] = 1
        batches.append((ids, mask))
    return batches


def measure(model, batches, warmup: int) -> dict:
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    model.train()
    tokens, seconds = 0, 0.0
    for i, (ids, mask) in enumerate(batches):
        start = time.perf_counter()
        labels = ids.masked_fill(mask == 0, -100)
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            seconds += time.perf_counter() - start
            tokens += int(mask.sum())
    return {"trainable_params": sum(p.numel() for p in params), "tokens": tokens, "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/smollm2-mmlu.yaml")
    parser.add_argument("--layers", type=int, default=None, help="top layers to train (default: router.train_layers)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()

    import torch

    from rlrouter.config import load_recipe
    from rlrouter.router.checkpoint import load_router
    from rlrouter.router.model import as_router, freeze_below

    recipe = load_recipe(args.recipe)
    layers = args.layers or recipe.router.train_layers or 4
    fmt = recipe.router.format()
    rows = []
    for setting in (layers, None):
        torch.manual_seed(0)
        model, tokenizer = as_router(*load_router(recipe.router.base))
        freeze_below(model, setting)
        batches = step_batches(recipe, tokenizer, fmt, args.steps + args.warmup, args.batch)
        row = measure(model, batches, args.warmup)
        row["trained"] = f"top {setting} layers" if setting else "all layers"
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model
    print(f"\n| base {recipe.router.base} | trainable params | tokens | seconds | SFT tokens/s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['trained']} | {r['trainable_params']:,} | {r['tokens']} | {r['seconds']} | {r['tokens_per_s']} |")
    print(f"top-{layers} / all: {rows[0]['tokens_per_s'] / rows[1]['tokens_per_s']:.2f}x tokens/s")


if __name__ == "__main__":
    main()
