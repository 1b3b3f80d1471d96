"""Rollout throughput on Ray vs the number of rollout workers.

Every executor step makes a real HTTP call to a local OpenAI-compatible server
(``rlrouter.serve.local_pool``) that answers after ``--delay-s`` (default 200 ms, a
realistic API latency); the outcome of the step stays simulated. The same episodes
(tasks, budgets, episode seeds), cut into as many shards as the largest worker count, are
played by 1, 2, 4 rollout actors on a local Ray cluster (a free actor takes the next
shard), after a warm-up that starts the actors and loads the weights. Since shards fix
the episodes, every worker count plays exactly the same episodes and executor calls.
Printed: episodes/s per worker count and the scaling ratio
``throughput(n) / (n * throughput(1))`` (goal at 4 workers: >= 0.8).

usage: python benchmarks/ray_scaling.py [--workers 1,2,4] [--episodes 16] [--delay-s 0.2]
       [--max-length 8] [--checkpoint DIR] [--cpus 2] [--out runs/bench/ray_scaling.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import router_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="recipes/quickstart.yaml")
    parser.add_argument("--checkpoint", help="router checkpoint (default: the recipe's SFT one, else untrained)")
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--episodes", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=8, help="sub-goals per task (episode length)")
    parser.add_argument("--delay-s", type=float, default=0.2, help="latency of every executor call")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--out", default="runs/bench/ray_scaling.json")
    args = parser.parse_args()

    import ray
    import yaml

    from envs import Budget
    from rlrouter.config import recipe_from_dict
    from rlrouter.distributed import RayRollouts, connect
    from rlrouter.router.episodes import EpisodeSpec
    from rlrouter.router.checkpoint import load_checkpoint
    from rlrouter.serve.local_pool import LocalPoolServer

    counts = [int(n) for n in args.workers.split(",")]
    data = yaml.safe_load(Path(args.recipe).read_text())
    with LocalPoolServer(delay_s=args.delay_s) as pool:
        for tier in data["pool"]["tiers"]:
            tier["executor"] = {**tier.get("executor", {}), "endpoint": pool.base_url}
        data["world"] = {**data.get("world", {}), "max_length": args.max_length,
                         "min_length": min(4, args.max_length)}
        recipe = recipe_from_dict(data)
        checkpoint, tmp = router_checkpoint(recipe, args.checkpoint)
        model, tok, meta = load_checkpoint(checkpoint, recipe.pool.names)
        prompt_mode = meta.get("router", {}).get("prompt_mode", "step")
        budgets = [Budget(), Budget(max_calls={recipe.pool.names[-1]: 3})]
        specs = [EpisodeSpec(f"train-{i}", budgets[i % 2], seed=1000 + i) for i in range(args.episodes)]
        connect(num_cpus=args.cpus)
        rows = []
        for n in counts:
            # the same shards for every worker count: the same episodes, only placed differently
            rollouts = RayRollouts(recipe, model, tok, prompt_mode, "train", shards=max(counts), workers=n,
                                   cpus_per_worker=min(1.0, args.cpus / n))
            rollouts.play(specs[:max(counts)], seed=0, iteration=0, temperature=1.0)  # warm-up: actors up, weights in
            start = time.perf_counter()
            played, stats = rollouts.play(specs, seed=0, iteration=1, temperature=1.0)
            seconds = time.perf_counter() - start
            rollouts.close()
            steps = sum(len(r.turns) for r in played)
            routes = [[t.tier for t in r.turns] for r in played]
            same = routes == rows[0]["routes"] if rows else True
            rows.append({"routes": routes, "same_episodes_as_1": same, "workers": n, "episodes": len(played),
                         "executor_calls": steps, "seconds": seconds,
                         "episodes_per_s": len(played) / seconds, "calls_per_s": steps / seconds,
                         "generate_s": sum(v for k, v in stats.items() if k.endswith("generate_s")),
                         "env_s": sum(v for k, v in stats.items() if k.endswith("env_s"))})
            print(f"{n} worker(s): {len(played)} episodes, {steps} executor calls in {seconds:.1f} s", flush=True)
        ray.shutdown()
        if tmp is not None:
            tmp.cleanup()
    base = rows[0]
    print(f"\nexecutor latency {args.delay_s * 1000:.0f} ms per call, {args.episodes} episodes in {max(counts)} "
          f"shards, {args.cpus} CPUs, checkpoint {checkpoint}")
    print("| workers | episodes/s | executor calls | same episodes | scaling vs linear | generate s | env s |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        row["scaling"] = row["episodes_per_s"] / (row["workers"] / base["workers"] * base["episodes_per_s"])
        print(f"| {row['workers']} | {row['episodes_per_s']:.2f} | {row['executor_calls']} | "
              f"{'yes' if row['same_episodes_as_1'] else 'NO'} | {row['scaling']:.2f} | {row['generate_s']:.1f} | "
              f"{row['env_s']:.1f} |")
        del row["routes"]
    last = rows[-1]
    print(f"\nscaling at {last['workers']} workers: {last['scaling']:.2f} of linear; goal >= 0.8: "
          f"{'met' if last['scaling'] >= 0.8 else 'NOT met'}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    print(f"json: {out}")


if __name__ == "__main__":
    main()
