"""Seconds per generated token of a GRPO step: rlrouter's trainer vs TRL's GRPOTrainer, on
the same work.

Like for like:

- the same model: a tiny router, SFT'd for a few seconds on this workload's prompts so it
  writes ``<think>…</think><route>TIER</route>`` with both tiers (an untrained model writes
  no route at all, every reward is equal and neither side would train), saved once and
  loaded by both sides;
- the same single-turn workload: the router prompt of each query of a one-step replay
  world, G completions per prompt, the same completion cap, learning rate, batch, number of
  steps, no KL term, transformers ``generate`` on both sides, free decoding on both (TRL
  cannot apply rlrouter's route constraint; rlrouter's rollouts run unconstrained here);
- the same reward of the same text: the route read from the completion (strict parse,
  else the tolerant one with the cheapest tier as fallback) earns the query's recorded
  outcome under that tier, minus λ · its recorded cost, minus 0.5 if the strict parser
  rejected the text. rlrouter gets it from the replay environment, TRL from the same table.

Each side's wall time covers generation, rewards and the update, divided by the
completion tokens it generated. Each side also prints the share of its sequences that
trained: rlrouter's ``trained_fraction`` (sequences with a non-zero advantage; the rest skip
the update) and TRL's ``1 − frac_reward_zero_std`` (groups whose rewards differ). The ratio
is printed only when both sides trained on something.

usage: python benchmarks/rl_step.py [--steps 4] [--prompts 16] [--group 8] [--max-new-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from rlrouter.router.model import default_device

POOL = [{"name": "small", "usd_per_1m_input": 0.4, "usd_per_1m_output": 1.6, "executor": {"model": "cheap"}},
        {"name": "large", "usd_per_1m_input": 2.0, "usd_per_1m_output": 8.0, "executor": {"model": "strong"}}]
COST_LAMBDA = 100.0  # $⁻¹: a large call (recorded $0.002) costs 0.2 of reward
FORMAT_PENALTY = 0.5


def build_workload(root: Path, n_prompts: int):
    """A one-step replay world (one query per episode), its queries and router prompts."""
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
    messages, outcomes = [], {}
    for task in env.task_ids[:n_prompts]:
        env.reset(seed=0, options={"task_id": task})
        messages.append([{"role": "system", "content": system_message(env.pool.describe())},
                         {"role": "user", "content": step_user_message(env.view())}])
        for tier in ("small", "large"):  # the recorded outcome and cost of routing this query to each tier
            env.reset(seed=0, options={"task_id": task})
            info = env.step(recipe.pool.names.index(tier))[4]
            outcomes[(task, tier)] = (float(info["success"]), float(info["cost_usd"]))
    return recipe, env.task_ids[:n_prompts], messages, outcomes


def text_reward(text: str, task_id: str, outcomes: dict) -> float:
    """The reward both sides optimize, from the completion's text."""
    from rlrouter.router.prompt import parse_route

    route, well_formed = parse_route(text, ["small", "large"], fallback="small")
    success, cost = outcomes[(task_id, route.tier)]
    return success - COST_LAMBDA * cost - FORMAT_PENALTY * (not well_formed)


def warm_start(root: Path, messages: list, seed: int = 0) -> Path:
    """A tiny router SFT'd to write the route format, half its examples routing large."""
    from datasets import Dataset

    from rlrouter.router.model import build_tiny_router, train_tokenizer
    from rlrouter.router.prompt import format_route
    from rlrouter.sft.train import SFTSettings, run_sft

    rng = np.random.default_rng(seed)
    examples = [conv + [{"role": "assistant", "content": format_route(str(rng.choice(["small", "large"])), "start")}]
                for conv in messages for _ in range(4)]
    tok = train_tokenizer(["\n".join(m["content"] for m in conv) for conv in examples], 512)
    settings = SFTSettings(epochs=3, batch_size=8, learning_rate=3e-3, logging_steps=100)
    return run_sft(build_tiny_router(tok, seed=seed), tok, Dataset.from_dict({"messages": examples}), settings,
                   root / "router", {"pool": POOL, "router": {"prompt_mode": "step"}}, seed=seed, progress=False)


def run_rlrouter(checkpoint: Path, recipe, task_ids, args) -> dict:
    from rlrouter.rl.config import RLConfig
    from rlrouter.rl.trainer import RLTrainer
    from rlrouter.rl.workers import LocalRollouts, RolloutWorker
    from rlrouter.router.checkpoint import load_checkpoint
    from rlrouter.router.generation import HFEngine

    model, tok, _ = load_checkpoint(checkpoint)
    config = RLConfig(algorithm="grpo", reward="cost", cost_lambda=COST_LAMBDA, iterations=args.steps + 1,
                      tasks_per_iteration=len(task_ids), group_size=args.group, tasks=len(task_ids),
                      learning_rate=args.lr, micro_batch_size=len(task_ids) * args.group,
                      format_penalty=FORMAT_PENALTY)
    world = recipe.build_world()
    make_env = lambda: recipe.make_env("train", world=world)  # noqa: E731
    engine = HFEngine(model, tok, recipe.pool.names, args.max_new_tokens)
    trainer = RLTrainer(model, tok, config, make_env, task_ids, {}, recipe.pool.names, checkpoint.parent / "ours",
                        {}, engine=engine, rollouts=LocalRollouts(RolloutWorker(engine, make_env, "step",
                                                                                constrain=False)))
    trainer.iterate()  # warm-up step, not timed
    tokens, trained, start = 0, [], time.perf_counter()
    for _ in range(args.steps):
        metrics = trainer.iterate()
        tokens += metrics["generated_tokens"]
        trained.append(metrics["trained_fraction"])
    seconds = time.perf_counter() - start
    return {"trainer": "rlrouter", "steps": args.steps, "seconds": seconds, "generated_tokens": tokens,
            "s_per_token": seconds / tokens, "trained_fraction": float(np.mean(trained))}


def run_trl(checkpoint: Path, messages, task_ids, outcomes, args) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tok = AutoTokenizer.from_pretrained(checkpoint)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    counted = {"tokens": 0}

    def route_reward(completions, completion_ids, task_id, **kwargs):
        counted["tokens"] += sum(len(ids) for ids in completion_ids)
        return [text_reward(c[0]["content"], t, outcomes) for c, t in zip(completions, task_id)]

    config = GRPOConfig(
        output_dir=str(checkpoint.parent / "trl"), max_steps=args.steps + 1, learning_rate=args.lr,
        per_device_train_batch_size=len(messages) * args.group, num_generations=args.group,
        max_completion_length=args.max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, beta=0.0,
        num_iterations=1, logging_steps=1, report_to=[], use_cpu=default_device() == "cpu", bf16=False,
        save_strategy="no", lr_scheduler_type="constant", warmup_steps=0, seed=0, disable_dropout=True,
    )
    dataset = Dataset.from_dict({"prompt": messages * (args.steps + 2), "task_id": task_ids * (args.steps + 2)})
    trainer = GRPOTrainer(model=model, reward_funcs=[route_reward], args=config, processing_class=tok,
                          train_dataset=dataset)
    times, logged = [], []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            times.append([time.perf_counter(), counted["tokens"]])

        def on_step_end(self, a, state, control, **kw):
            times[-1] += [time.perf_counter(), counted["tokens"]]

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "frac_reward_zero_std" in logs:
                logged.append(logs)

    trainer.add_callback(StepTimer())
    trainer.train()
    timed = times[1:]  # the first step is the warm-up, as on our side
    seconds = sum(t[2] - t[0] for t in timed)
    tokens = sum(t[3] - t[1] for t in timed)
    trained = float(np.mean([1 - line["frac_reward_zero_std"] for line in logged[1:]])) if len(logged) > 1 else 0.0
    return {"trainer": "trl.GRPOTrainer", "steps": len(timed), "seconds": seconds, "generated_tokens": tokens,
            "s_per_token": seconds / tokens, "trained_fraction": trained}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        recipe, task_ids, messages, outcomes = build_workload(root, args.prompts)
        checkpoint = warm_start(root, messages)
        ours = run_rlrouter(checkpoint, recipe, task_ids, args)
        trl = run_trl(checkpoint, messages, task_ids, outcomes, args)
    print(f"device: {default_device()}; free decoding and the same text reward on both sides")
    print("| trainer | steps | generated tokens | seconds | s / generated token | share that trained |")
    print("|---|---|---|---|---|---|")
    for r in (ours, trl):
        print(f"| {r['trainer']} | {r['steps']} | {r['generated_tokens']} | {r['seconds']:.2f} | "
              f"{r['s_per_token']:.2e} | {r['trained_fraction']:.2f} |")
    ratio = None
    if ours["trained_fraction"] > 0 and trl["trained_fraction"] > 0:
        ratio = ours["s_per_token"] / trl["s_per_token"]
        print(f"\nratio rlrouter / TRL (seconds per generated token): {ratio:.2f}  (goal <= 1.0)")
    else:
        print("\nno ratio: one side trained on nothing (every group's rewards were equal)")
    print(json.dumps({"rlrouter": ours, "trl": trl, "ratio": ratio}))


if __name__ == "__main__":
    main()
