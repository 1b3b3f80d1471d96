"""Evaluation on transformers against vLLM: one router checkpoint, the same held-out episodes.

Plays the checkpoint greedily over the recipe's test tasks and budgets at each route bias,
as ``rlrouter eval`` does (``RouterPolicy.evaluate``), once with ``eval.engine: hf``
(transformers ``generate``) and once with ``eval.engine: vllm`` (the in-process vLLM
engine, every bias on one engine), in this run. Prints the time of each (vLLM's engine
start on its own line), their ratio, and how many episodes came out the same (tiers
called, success, cost): the two engines apply one route rule, so greedy episodes differ
only where two tiers tie to float precision.

usage: python benchmarks/eval_engine.py --recipe recipes/smollm2-mmlu.yaml --checkpoint runs/smollm2-mmlu/sft
       [--tasks 100] [--biases 0,1.5]
"""

from __future__ import annotations

import argparse
import json
import time


def play(recipe, loaded, engine, biases: list[float], tasks: int) -> tuple[list, float]:
    from rlrouter.evaluate.router_policy import RouterPolicy

    model, tok, meta = loaded
    env = recipe.make_env(recipe.eval.split)
    world, task_ids = env.world, env.task_ids[:tasks]
    env.close()
    records = []
    start = time.perf_counter()
    for bias in biases:
        policy = RouterPolicy.from_checkpoint(model, tok, meta, recipe, name=f"bias={bias:g}", route_bias=bias,
                                              engine=engine)
        records += policy.evaluate(lambda: recipe.make_env(recipe.eval.split, world=world), task_ids,
                                   recipe.budgets(), recipe.seed, progress=False)
    return records, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--checkpoint", required=True, help="router checkpoint folder (e.g. runs/<name>/sft)")
    parser.add_argument("--tasks", type=int, help="held-out tasks (default: the recipe's eval.tasks)")
    parser.add_argument("--biases", help="comma-separated route biases (default: the recipe's eval.router_bias)")
    args = parser.parse_args()

    from rlrouter.config import load_recipe
    from rlrouter.router.checkpoint import load_checkpoint

    recipe = load_recipe(args.recipe)
    biases = [float(b) for b in args.biases.split(",")] if args.biases else [float(b) for b in recipe.eval.router_bias]
    tasks = args.tasks or recipe.eval.tasks
    loaded = load_checkpoint(args.checkpoint, recipe.pool.names)
    hf_records, hf_s = play(recipe, loaded, None, biases, tasks)
    start = time.perf_counter()
    engine = recipe.vllm_engine(args.checkpoint, loaded[1], loaded[2])
    start_s = time.perf_counter() - start
    vllm_records, vllm_s = play(recipe, loaded, engine, biases, tasks)

    def outcome(r):
        return r.policy, r.budget, r.task_id, sorted(r.calls.items()), r.success, round(r.cost_usd, 12)

    same = sum(outcome(a) == outcome(b) for a, b in zip(hf_records, vllm_records))
    decisions = sum(r.steps for r in hf_records)
    print(f"{len(hf_records)} episodes ({tasks} tasks x {len(recipe.budgets())} budgets x biases {biases}), "
          f"{decisions} decisions on transformers")
    print("| engine | play (s) | decisions/s |")
    print("|---|---|---|")
    print(f"| hf | {hf_s:.1f} | {decisions / hf_s:.1f} |")
    print(f"| vllm | {vllm_s:.1f} | {sum(r.steps for r in vllm_records) / vllm_s:.1f} |")
    print(f"vLLM engine start: {start_s:.1f} s (once per checkpoint)")
    print(f"hf / vllm: {hf_s / vllm_s:.2f}x (with the engine start: {hf_s / (vllm_s + start_s):.2f}x); "
          f"episodes identical: {same} of {len(hf_records)}")
    print(json.dumps({"episodes": len(hf_records), "decisions": decisions, "hf_s": round(hf_s, 2),
                      "vllm_s": round(vllm_s, 2), "vllm_start_s": round(start_s, 2), "identical": same}))


if __name__ == "__main__":
    main()
