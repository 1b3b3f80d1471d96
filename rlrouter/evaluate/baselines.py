"""Baseline routing policies.

A policy is an object with ``name``, ``begin(env, seed)`` (called after ``env.reset``) and
``act(obs, info) -> tier index``. Every baseline respects ``info["action_mask"]``: when the
tier it wants is masked by the budget it takes the nearest allowed tier, cheaper first.

- ``AlwaysTier``: one tier every step (always-small / always-large: the boundary policies).
- ``RandomRouter(p)``: with probability p one of the tiers above the cheapest (uniformly;
  with two tiers, the priciest), else the cheapest.
- ``FirstLarge(k)``: the priciest tier for the first k steps, then the cheapest.
- ``EscalateOnFailure``: the cheapest tier; after a failed step one tier above the tier
  that failed (with two tiers: the priciest), until a step succeeds again.
- ``HindsightOracle``: the cheapest successful route found by uniform-cost search over
  replays of the same episode (same seed), where the world allows it. It sees the future:
  an upper bound on what any router can reach, not a deployable policy.
"""

from __future__ import annotations

import heapq
import itertools

import numpy as np

from envs.routing import RoutingEnv, nearest_allowed
from rlrouter.config import is_always_tier


def respect_mask(action: int, info: dict) -> int:
    """``action`` if the budget allows it, else the nearest allowed tier (cheaper first)."""
    mask = info["action_mask"]
    return action if mask[action] else nearest_allowed(action, mask)


class AlwaysTier:
    def __init__(self, tier_index: int, name: str):
        self.tier_index = tier_index
        self.name = name

    def begin(self, env: RoutingEnv, seed: int) -> None:
        pass

    def act(self, obs, info) -> int:
        return respect_mask(self.tier_index, info)


class RandomRouter:
    def __init__(self, p_large: float, n_tiers: int):
        self.p_large = float(p_large)
        self.top = n_tiers - 1
        self.name = f"random(p={self.p_large:g})"
        self.rng = np.random.default_rng(0)

    def begin(self, env: RoutingEnv, seed: int) -> None:
        self.rng = np.random.default_rng([seed, 99])

    def act(self, obs, info) -> int:
        if self.rng.random() >= self.p_large:
            return respect_mask(0, info)
        pricier = 1 + (int(self.rng.integers(self.top)) if self.top > 1 else 0)  # no extra draw with two tiers
        return respect_mask(pricier, info)


class FirstLarge:
    def __init__(self, k: int, n_tiers: int):
        self.k = int(k)
        self.top = n_tiers - 1
        self.name = f"first-large(k={self.k})"
        self.steps = 0

    def begin(self, env: RoutingEnv, seed: int) -> None:
        self.steps = 0

    def act(self, obs, info) -> int:
        self.steps += 1
        return respect_mask(self.top if self.steps <= self.k else 0, info)


class EscalateOnFailure:
    def __init__(self, n_tiers: int):
        self.top = n_tiers - 1
        self.name = "escalate"
        self.tiers: list[str] = []

    def begin(self, env: RoutingEnv, seed: int) -> None:
        self.tiers = list(env.pool.names)

    def act(self, obs, info) -> int:
        if "step_ok" not in info or info["step_ok"]:
            return respect_mask(0, info)
        failed = self.tiers.index(info["tier"]) if info.get("tier") in self.tiers else 0
        return respect_mask(min(self.top, failed + 1), info)


class HindsightOracle:
    """Cheapest successful route, by A* search over snapshots of the same episode.

    The search starts from the best fixed-tier route (an incumbent that bounds the cost),
    orders nodes by cost so far plus the world's admissible lower bound on the cost still
    to pay, and merges states by ``env.search_key()`` (world progress and calls per tier).
    It is exact where the key summarizes the future (replay) and a close upper bound on
    the optimal cost otherwise; it never costs more than the cheapest fixed-tier route
    that succeeds. Without any successful route within ``max_expansions`` nodes it plays
    always-cheapest (a cheap failure).
    """

    name = "oracle"

    def __init__(self, max_expansions: int = 4000):
        self.max_expansions = int(max_expansions)
        self.plan: list[int] = []
        self.found = False
        self.expansions = 0

    def begin(self, env: RoutingEnv, seed: int) -> None:
        root = env.snapshot()
        self.plan, self.found, self.expansions = self._search(env, root)
        env.restore(root)

    @staticmethod
    def _fixed_route(env: RoutingEnv, root, tier_index: int) -> tuple[list[int], bool, float]:
        env.restore(root)
        route = []
        while not env.finished and env.action_mask.any():
            action = tier_index if env.action_mask[tier_index] else nearest_allowed(tier_index, env.action_mask)
            env.step(action)
            route.append(action)
        return route, env.success, env.ledger.cost_usd

    def _search(self, env: RoutingEnv, root) -> tuple[list[int], bool, int]:
        best_route, best_cost = [], float("inf")
        for tier_index in range(len(env.pool)):
            route, success, cost = self._fixed_route(env, root, tier_index)
            if success and cost < best_cost:
                best_route, best_cost = route, cost
        env.restore(root)
        tie = itertools.count()
        frontier = [(env.ledger.cost_usd + env.cost_to_go_lower_bound(), next(tie), root, [])]
        seen = set()
        expansions = 0
        while frontier and expansions < self.max_expansions:
            bound, _, snap, route = heapq.heappop(frontier)
            if bound >= best_cost:
                break  # nothing left can beat the incumbent
            env.restore(snap)
            if env.finished:
                if env.success and env.ledger.cost_usd < best_cost:
                    best_route, best_cost = route, env.ledger.cost_usd
                continue
            key = env.search_key()
            if key is not None:
                if key in seen:
                    continue
                seen.add(key)
            expansions += 1
            for action in np.flatnonzero(env.action_mask):  # empty when nothing is affordable
                env.restore(snap)
                env.step(int(action))
                priority = env.ledger.cost_usd + (0.0 if env.finished else env.cost_to_go_lower_bound())
                heapq.heappush(frontier, (priority, next(tie), env.snapshot(), route + [int(action)]))
        return best_route, best_cost < float("inf"), expansions

    def act(self, obs, info) -> int:
        if self.plan:
            return respect_mask(self.plan.pop(0), info)
        return respect_mask(0, info)


def make_baselines(names, n_tiers: int, random_p=(0.5,), first_large_k=(3,), oracle_max_expansions=4000,
                   tiers: list[str] | None = None) -> list:
    """Instantiate the named baselines (random and first-large once per p / k; always-TIER
    for any tier of ``tiers``, the pool's names)."""
    policies = []
    for name in names:
        if name == "always-small":
            policies.append(AlwaysTier(0, "always-small"))
        elif name == "always-large":
            policies.append(AlwaysTier(n_tiers - 1, "always-large"))
        elif tiers and is_always_tier(name, tiers):
            policies.append(AlwaysTier(tiers.index(name[len("always-"):]), name))
        elif name == "random":
            policies += [RandomRouter(p, n_tiers) for p in random_p]
        elif name == "first-large":
            policies += [FirstLarge(k, n_tiers) for k in first_large_k]
        elif name == "escalate":
            policies.append(EscalateOnFailure(n_tiers))
        elif name == "oracle":
            policies.append(HindsightOracle(oracle_max_expansions))
        else:
            raise ValueError(f"unknown baseline {name!r}")
    return policies
