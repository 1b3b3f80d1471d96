"""Gymnasium environments for budget-aware routing of multi-step LLM agents.

Importing ``envs`` registers the environment ids:

=============================  ============================================================
id                             world
=============================  ============================================================
``rlrouter/Synthetic-v0``      procedural multi-step tasks, simulated small/large executors
``rlrouter/RouteLLM-MMLU-v0``  replay of recorded MMLU outcomes (Mixtral = small, GPT-4 = large)
``rlrouter/RouteLLM-GSM8K-v0`` replay of recorded GSM8K outcomes and responses
``rlrouter/Replay-v0``         replay of your own table (``world={"table": path, ...}``)
``rlrouter/ScienceWorld-v0``   ScienceWorld tasks in the real simulator (JVM), simulated executors
``rlrouter/TextWorld-v0``      TextWorld games generated with tw-make, simulated executors
=============================  ============================================================

Every id takes the :class:`envs.routing.RoutingEnv` arguments (``budget``, ``cost_lambda``,
``split``, ...) plus ``pool`` (a Pool or a list of tier mappings) and ``world`` (that world's
config fields).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from gymnasium.envs.registration import register, registry

from envs.budget import Budget, parse_budget_arg, route_mask
from envs.pool import CostLedger, Pool, Tier
from envs.routing import RoutingEnv
from envs.worlds import build_world


def make_routing_env(
    kind: str = "synthetic",
    pool: Pool | Sequence[Mapping[str, Any]] | None = None,
    world: Mapping[str, Any] | None = None,
    **env_kwargs,
) -> RoutingEnv:
    """Build a :class:`RoutingEnv` from plain data (what gymnasium.make and recipes pass)."""
    if pool is None:
        pool = Pool.default()
    elif not isinstance(pool, Pool):
        pool = Pool.from_config(pool)
    spec = {"kind": kind, **dict(world or {})}
    env = RoutingEnv(build_world(spec, pool), pool, **env_kwargs)
    env.owns_world = True  # close() closes it (a text-game world ends its game processes)
    return env


ENV_IDS = {
    "rlrouter/Synthetic-v0": {"kind": "synthetic"},
    "rlrouter/RouteLLM-MMLU-v0": {"kind": "replay", "world": {"source": "routellm-mmlu"}},
    "rlrouter/RouteLLM-GSM8K-v0": {"kind": "replay", "world": {"source": "routellm-gsm8k"}},
    "rlrouter/Replay-v0": {"kind": "replay", "world": {"source": "table"}},
    "rlrouter/ScienceWorld-v0": {"kind": "scienceworld"},
    "rlrouter/TextWorld-v0": {"kind": "textworld"},
}


def _entry(kind: str, world: Mapping[str, Any] | None = None, defaults: Mapping[str, Any] | None = None):
    def make(**kwargs):
        merged = {**dict(defaults or {}), **dict(kwargs.pop("world", None) or {})}
        return make_routing_env(kind, world=merged, **kwargs)

    return make


for _env_id, _spec in ENV_IDS.items():
    if _env_id not in registry:
        register(_env_id, entry_point=_entry(_spec["kind"], defaults=_spec.get("world")))

__all__ = ["Budget", "CostLedger", "Pool", "Tier", "RoutingEnv", "build_world", "make_routing_env",
           "parse_budget_arg", "route_mask", "ENV_IDS"]
