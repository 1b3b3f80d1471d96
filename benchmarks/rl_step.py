"""Seconds per generated token of a GRPO step: rlrouter's trainer vs TRL's GRPOTrainer.

Same tiny model (built once, saved, loaded twice), same single-turn workload: the first
router prompt of each task of a one-step replay world, G completions per prompt, the same
completion cap, learning rate, batch and number of steps, no KL term, transformers
``generate`` on both sides, both on CUDA when it is available (fp32), else on the CPU.
Each side's wall time covers generation, rewards and the update; divided by the
completion tokens it generated. Prints both and the ratio
rlrouter / TRL (goal ≤ 1.0).

usage: python benchmarks/rl_step.py [--steps 4] [--prompts 16] [--group 8] [--max-new-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from rlrouter.router.model import default_device

POOL = [{"name": "small", "usd_per_1m_input": 0.4, "usd_per_1m_output": 1.6, "executor": {"model": "cheap"}},
        {"name": "large", "usd_per_1m_input": 2.0, "usd_per_1m_output": 8.0, "executor": {"model": "strong"}}]


def build_workload(root: Path, n_prompts: int):
    """A one-step replay world (one query per episode) and its first router prompts."""
    from rlrouter.config import recipe_from_dict
    from rlrouter.router.prompt import step_user_message, system_message

    rows = [{"prompt": f"Question {i}: which of the {i % 7 + 2} options holds for case {i}?",
             "cheap": i % 3 == 0, "strong": i % 5 != 0, "cheap_cost": 0.0002, "strong_cost": 0.002}
            for i in range(2 * n_prompts)]
    table = root / "queries.jsonl"
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = recipe_from_dict({"name": "rl-step-bench", "world": {"kind": "replay", "source": "table",
                                                                  "table": str(table), "episode_length": 1,
                                                                  "success_fraction": 1.0},
                               "pool": {"tiers": POOL}})
    env = recipe.make_env("train")
    messages = []
    for task in env.task_ids[:n_prompts]:
        env.reset(seed=0, options={"task_id": task})
        messages.append([{"role": "system", "content": system_message(env.pool.describe())},
                         {"role": "user", "content": step_user_message(env.view())}])
    return recipe, env.task_ids[:n_prompts], messages


def run_rlrouter(checkpoint: Path, recipe, task_ids, args) -> dict:
    from rlrouter.rl.trainer import RLSettings, RLTrainer
    from rlrouter.router.checkpoint import load_checkpoint

    model, tok, _ = load_checkpoint(checkpoint)
    settings = RLSettings(algorithm="grpo", reward="cost", cost_lambda=1.0, iterations=args.steps,
                          tasks_per_iteration=len(task_ids), group_size=args.group, tasks=len(task_ids),
                          learning_rate=args.lr, micro_batch_size=len(task_ids) * args.group, format_penalty=0.0)
    world = recipe.build_world()
    trainer = RLTrainer(model, tok, settings, lambda: recipe.make_env("train", world=world), task_ids, {},
                        recipe.pool.names, checkpoint.parent / "ours", {}, max_new_tokens=args.max_new_tokens)
    trainer.iterate()  # warm-up step, not timed
    tokens, start = 0, time.perf_counter()
    for _ in range(args.steps):
        tokens += trainer.iterate()["generated_tokens"]
    seconds = time.perf_counter() - start
    return {"trainer": "rlrouter", "steps": args.steps, "seconds": seconds, "generated_tokens": tokens,
            "s_per_token": seconds / tokens}


def run_trl(checkpoint: Path, messages, args) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    tok = AutoTokenizer.from_pretrained(checkpoint)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    counted = {"tokens": 0}

    def route_reward(completions, completion_ids, **kwargs):
        counted["tokens"] += sum(len(ids) for ids in completion_ids)
        return [1.0 if "<route>large" in c[0]["content"] else 0.0 for c in completions]

    config = GRPOConfig(
        output_dir=str(checkpoint.parent / "trl"), max_steps=args.steps + 1, learning_rate=args.lr,
        per_device_train_batch_size=len(messages) * args.group, num_generations=args.group,
        max_completion_length=args.max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, beta=0.0,
        num_iterations=1, logging_steps=1, report_to=[], use_cpu=default_device() == "cpu", bf16=False,
        save_strategy="no", lr_scheduler_type="constant", warmup_steps=0, seed=0, disable_dropout=True,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=[route_reward], args=config, processing_class=tok,
                          train_dataset=Dataset.from_dict({"prompt": messages * (args.steps + 2)}))
    times = []

    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            times.append([time.perf_counter(), counted["tokens"]])

        def on_step_end(self, a, state, control, **kw):
            times[-1] += [time.perf_counter(), counted["tokens"]]

    trainer.add_callback(StepTimer())
    trainer.train()
    timed = times[1:]  # the first step is the warm-up, as on our side
    seconds = sum(t[2] - t[0] for t in timed)
    tokens = sum(t[3] - t[1] for t in timed)
    return {"trainer": "trl.GRPOTrainer", "steps": len(timed), "seconds": seconds, "generated_tokens": tokens,
            "s_per_token": seconds / tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4)
    args = parser.parse_args()

    from rlrouter.router.checkpoint import save_checkpoint
    from rlrouter.router.model import build_tiny_router, train_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        recipe, task_ids, messages = build_workload(root, args.prompts)
        tok = train_tokenizer(["\n".join(m["content"] for m in conv) for conv in messages] * 4, 512)
        checkpoint = save_checkpoint(build_tiny_router(tok), tok, root / "router",
                                     {"pool": recipe.pool.describe(), "router": {"prompt_mode": "step"}})
        ours = run_rlrouter(checkpoint, recipe, task_ids, args)
        trl = run_trl(checkpoint, messages, args)
    print(f"device: {default_device()}")
    print("| trainer | steps | generated tokens | seconds | s / generated token |")
    print("|---|---|---|---|---|")
    for r in (ours, trl):
        print(f"| {r['trainer']} | {r['steps']} | {r['generated_tokens']} | {r['seconds']:.2f} | {r['s_per_token']:.2e} |")
    ratio = ours["s_per_token"] / trl["s_per_token"]
    print(f"\nratio rlrouter / TRL (seconds per generated token): {ratio:.2f}  (goal <= 1.0)")
    print(json.dumps({"rlrouter": ours, "trl": trl, "ratio": ratio}))


if __name__ == "__main__":
    main()
