"""Throughput of the synthetic RoutingEnv, single and vectorized, and where eval time goes.

Prints steps/s of one env, of gymnasium's sync vector env (N copies), the ratio of the
two, and for a baseline evaluation the share of wall time spent inside ``env.step``.

    python benchmarks/env_throughput.py [--steps 20000] [--num-envs 8] [--tasks 100]
"""

from __future__ import annotations

import argparse
import json
import time

import gymnasium as gym
import numpy as np

import envs  # noqa: F401  (registers the ids)
from envs import Budget
from rlrouter.evaluate.baselines import make_baselines
from rlrouter.evaluate.runner import evaluate


def single_env_steps_per_s(steps: int) -> float:
    env = gym.make("rlrouter/Synthetic-v0", budget={"large_calls": 10})
    rng = np.random.default_rng(0)
    env.reset(seed=0)
    start = time.perf_counter()
    for _ in range(steps):
        _, _, terminated, truncated, info = env.step(int(rng.choice(np.flatnonzero(info_mask(env)))))
        if terminated or truncated:
            env.reset()
    return steps / (time.perf_counter() - start)


def info_mask(env) -> np.ndarray:
    return env.unwrapped.action_mask


def vector_env_steps_per_s(steps: int, num_envs: int) -> float:
    vec = gym.make_vec("rlrouter/Synthetic-v0", num_envs=num_envs, vectorization_mode="sync")
    vec.reset(seed=0)
    actions = np.zeros(num_envs, dtype=int)  # always-small: never masked without a budget
    start = time.perf_counter()
    for _ in range(steps // num_envs):
        vec.step(actions)
    elapsed = time.perf_counter() - start
    vec.close()
    return (steps // num_envs) * num_envs / elapsed


class TimedEnv:
    """Wraps env.step to measure time spent inside the environment."""

    def __init__(self, env):
        self.env, self.seconds = env, 0.0

    def __getattr__(self, name):
        return getattr(self.env, name)

    def step(self, action):
        start = time.perf_counter()
        out = self.env.step(action)
        self.seconds += time.perf_counter() - start
        return out

    def reset(self, **kwargs):
        start = time.perf_counter()
        out = self.env.reset(**kwargs)
        self.seconds += time.perf_counter() - start
        return out


def eval_env_share(tasks: int) -> dict:
    env = TimedEnv(envs.make_routing_env("synthetic", split="test"))
    policies = make_baselines(["always-small", "always-large", "random", "escalate"], 2, random_p=[0.5])
    start = time.perf_counter()
    records, _ = evaluate(env, policies, env.task_ids[:tasks], [Budget(max_calls={"large": 10})], progress=False)
    total = time.perf_counter() - start
    return {"episodes": len(records), "total_s": total, "env_s": env.seconds, "env_share": env.seconds / total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--num-envs", type=int, default=8)
    parser.add_argument("--tasks", type=int, default=100)
    args = parser.parse_args()
    single = single_env_steps_per_s(args.steps)
    vector = vector_env_steps_per_s(args.steps, args.num_envs)
    share = eval_env_share(args.tasks)
    result = {
        "single_env_steps_per_s": round(single),
        f"sync_vector_env_x{args.num_envs}_steps_per_s": round(vector),
        "vector_over_single": round(vector / single, 3),
        "baseline_eval": {k: round(v, 4) if isinstance(v, float) else v for k, v in share.items()},
    }
    print(f"single env        : {single:10.0f} steps/s")
    print(f"sync vector x{args.num_envs:<3d}  : {vector:10.0f} steps/s  (ratio to single: {vector / single:.2f})")
    print(f"baseline eval     : {share['episodes']} episodes in {share['total_s']:.2f}s, "
          f"env.step/reset time = {share['env_share']:.1%} of total")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
