"""SFT stage speed: TRL ``SFTTrainer`` steps as the SFT stage configures them
(``rlrouter.sft.train.sft_config``: full precision on a CPU, no gradient checkpointing)
against TRL's own defaults (bf16 autocast, gradient checkpointing), on the same examples,
model and seed, in one run.

The examples are the recipe world's first step prompts with a route-only answer (as in
``benchmarks/base_speed.py``), or with ``--synth DIR`` the SFT stage's own step examples of
a synthesized dataset (longer prompts: later steps carry history), cut as training cuts them; the base is prepared as the SFT
stage prepares it (``as_router``, ``router.base_layers``, ``router.train_layers``). Each
setting runs one epoch of ``--steps`` + 1 batches; the first step is a warm-up, the others
are timed between the trainer's step callbacks; tokens/s counts the examples' tokens (padding
excluded, the warm-up batch's share left out on average).

usage: python benchmarks/sft_speed.py [--recipe recipes/smollm2-textworld.yaml] [--synth runs/NAME/synth]
                                      [--steps 4] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace

from base_speed import step_conversations
from transformers import TrainerCallback


class StepTimer(TrainerCallback):
    """Seconds of each optimizer step (forward, backward, update) after the first."""

    def __init__(self):
        self.seconds: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self.start)


def measure(recipe, dataset, settings, trl_defaults: bool, steps: int) -> dict:
    import torch
    from trl import SFTTrainer

    from rlrouter.pipeline import build_router
    from rlrouter.router.model import freeze_below
    from rlrouter.sft.train import sft_config

    torch.manual_seed(recipe.seed)
    model, tokenizer = build_router(recipe, dataset)
    freeze_below(model, recipe.router.train_layers)
    args = sft_config(settings, tempfile.mkdtemp(prefix="sft-speed-"), seed=recipe.seed, progress=False)
    changes = {"max_steps": steps + 1, "save_strategy": "no", "logging_steps": 1000}
    if trl_defaults:  # what SFTConfig gives when precision and memory are left to it
        changes.update(bf16=True, gradient_checkpointing=True)
    args = replace(args, **changes)  # a new config: its __post_init__ sets up the precision
    timer = StepTimer()
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[timer])
    # one epoch of (steps + 1) batches; the warm-up batch's share of the tokens is left out on average
    tokens = round(sum(len(ids) for ids in trainer.train_dataset["input_ids"]) * steps / (steps + 1))
    trainer.train()
    seconds = sum(timer.seconds[1:])
    return {"setting": "TRL defaults (bf16 autocast, gradient checkpointing)" if trl_defaults
            else "SFT stage (sft_config)", "steps": steps, "tokens": tokens, "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/smollm2-textworld.yaml")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--synth", help="a synthesized dataset's folder: time its step examples")
    args = parser.parse_args()

    from datasets import Dataset

    from rlrouter.config import load_recipe

    recipe = load_recipe(args.recipe)
    fmt = recipe.router.format()
    settings = replace(recipe.sft, batch_size=args.batch)
    n = (args.steps + 1) * args.batch
    if args.synth:
        from datasets import load_from_disk

        from rlrouter.boundary.synthesis import step_examples

        steps = step_examples(load_from_disk(f"{args.synth}/dataset"))
        dataset = steps.shuffle(seed=recipe.seed).select(range(n)).select_columns(["messages"])
    else:
        conversations = step_conversations(recipe, fmt, n)
        dataset = Dataset.from_dict({"messages": [c + [{"role": "assistant", "content": fmt.route("small", "")}]
                                                  for c in conversations]})
    from rlrouter.pipeline import build_router

    _, tokenizer = build_router(recipe, dataset)
    dataset = dataset.map(lambda row: {"messages": fmt.as_training_example(tokenizer, row["messages"])})
    rows = []
    for trl_defaults in (False, True):
        row = measure(recipe, dataset, settings, trl_defaults, args.steps)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n| base {recipe.router.base} (top {recipe.router.train_layers} layers trained) | tokens | seconds | tokens/s |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['setting']} | {row['tokens']} | {row['seconds']} | {row['tokens_per_s']} |")
    print(f"\nSFT stage / TRL defaults: {rows[0]['tokens_per_s'] / rows[1]['tokens_per_s']:.2f}x tokens/s")


if __name__ == "__main__":
    main()
