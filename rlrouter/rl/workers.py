"""Rollout workers: who plays an iteration's episodes, in process or on a Ray cluster.

An iteration's episodes are cut into ``rl.rollout_shards`` contiguous *shards*. A shard is
the unit of work: one worker plays it as one lockstep batch (``play_episodes``), with the
torch generator seeded by ``shard_seed(seed, iteration, k)``. Because the seed and the
batch belong to the shard, not to whoever plays it, the same shard gives the same
episodes in this process (``LocalRollouts``: shards one after another, on the trainer's
own model) and on any Ray actor (``rlrouter.distributed.RayRollouts``: each actor holds a
replica of the policy and takes the next shard when it is free). That is what lets a Ray
run reproduce an in-process run whatever the number of actors, and what lets a shard
whose worker died be played again from scratch without changing the batch.

Reported per shard: episodes, wall seconds, seconds in generation and in environment
steps (the executors), and the queue wait from the iteration handing out its shards to a
worker starting this one. The trainer writes them to its JSONL log as ``shard<k>_*``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from rlrouter.router.episodes import EpisodeSpec, Rollout, play_episodes


def shard_specs(specs: list[EpisodeSpec], n: int) -> list[list[EpisodeSpec]]:
    """``n`` contiguous shards of ``specs`` (sizes differ by at most one; empty shards dropped)."""
    if n < 1:
        raise ValueError(f"rollout workers must be >= 1, got {n}")
    bounds = np.linspace(0, len(specs), n + 1).round().astype(int)
    return [specs[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def shard_seed(seed: int, iteration: int, shard: int) -> int:
    """The torch seed shard ``shard`` of ``iteration`` samples with (shard 0: the iteration's seed)."""
    return seed * 1_000_003 + iteration + shard * 1_000_000_007


@dataclass
class ShardResult:
    shard: int
    rollouts: list[Rollout]
    stats: dict  # episodes, wall_s, generate_s, env_s, started (time.time())


class RolloutWorker:
    """Plays shards with one engine and fresh environments from ``make_env``. Routes are
    constrained to the format and the budget; ``constrain=False`` samples freely (the
    trainer then scores the unconstrained distribution: ``benchmarks/rl_step.py`` compares
    with trainers that cannot constrain)."""

    def __init__(self, engine, make_env: Callable, prompt_mode: str, constrain: bool = True):
        self.engine = engine
        self.make_env = make_env
        self.prompt_mode = prompt_mode
        self.constrain = constrain

    def play(self, shard: int, specs: list[EpisodeSpec], torch_seed: int, temperature: float,
             sample: bool = True, logprobs: bool = True) -> ShardResult:
        started = time.time()
        timings: dict = {}
        torch.manual_seed(torch_seed)
        rollouts = play_episodes(self.engine, self.make_env, specs, self.prompt_mode, sample=sample,
                                 temperature=temperature, logprobs=logprobs, constrain=self.constrain,
                                 timings=timings)
        stats = {"episodes": len(rollouts), "wall_s": time.time() - started, "started": started,
                 **timings}
        return ShardResult(shard, rollouts, stats)


class LocalRollouts:
    """Every shard on one in-process worker, one after another (the default)."""

    def __init__(self, worker: RolloutWorker, shards: int = 1):
        self.worker = worker
        self.shards = shards

    def play(self, specs: list[EpisodeSpec], seed: int, iteration: int,
             temperature: float) -> tuple[list[Rollout], dict]:
        results, queued = [], time.time()
        for k, part in enumerate(shard_specs(specs, self.shards)):
            result = self.worker.play(k, part, shard_seed(seed, iteration, k), temperature)
            result.stats["queue_wait_s"] = result.stats["started"] - queued
            results.append(result)
        return collect(results)

    def sync(self, model) -> float:
        """Make the workers play with ``model``'s current weights; returns seconds spent."""
        start = time.perf_counter()
        if hasattr(self.worker.engine, "load_weights"):  # the vLLM engine holds its own copy
            self.worker.engine.load_weights(model)
        return time.perf_counter() - start

    def close(self) -> None:
        """Shut down the worker's engine if it is a vLLM engine (``VLLMEngine.close``)."""
        if hasattr(self.worker.engine, "close"):
            self.worker.engine.close()


def collect(results: list[ShardResult]) -> tuple[list[Rollout], dict]:
    """Rollouts in spec order, and the per-shard stats flattened for the JSONL log."""
    results = sorted(results, key=lambda r: r.shard)
    stats = {}
    for r in results:
        s = r.stats
        prefix = f"shard{r.shard}_"
        stats[prefix + "episodes"] = s["episodes"]
        stats[prefix + "episodes_per_s"] = s["episodes"] / max(s["wall_s"], 1e-9)
        for key in ("wall_s", "generate_s", "env_s", "queue_wait_s"):
            stats[prefix + key] = float(s.get(key, 0.0))
        for key in ("restarts", "actor"):  # Ray: times the shard was played again, and who played it
            if key in s:
                stats[prefix + key] = s[key]
    return [ro for r in results for ro in r.rollouts], stats
