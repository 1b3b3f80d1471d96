"""Play policies on held-out tasks under budgets, and summarize the cost-success trade-off.

Every policy sees the same episodes: task i is reset with seed ``seed * 1_000_003 + i``
for every policy and budget, so comparisons are paired (common random numbers).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field

from tqdm.auto import tqdm

from envs.budget import Budget
from envs.routing import RoutingEnv

REFERENCE_BUDGET = "none"


@dataclass
class EpisodeRecord:
    policy: str
    budget: str
    task_id: str
    success: bool
    cost_usd: float
    calls: dict[str, int]
    steps: int
    budget_exhausted: bool
    violation: bool  # cost or calls above the budget (must never happen)
    taxonomy: str | None = None
    switches: int = 0  # steps whose tier differs from the step before
    input_tokens: int = 0
    cached_tokens: int = 0  # input tokens billed at a cached price (env prompt_cache)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def episode_seed(seed: int, index: int) -> int:
    return seed * 1_000_003 + index


def budget_violated(budget: Budget, cost_usd: float, calls: dict[str, int]) -> bool:
    """Independent check of the final accounting against the caps."""
    if budget.usd is not None and cost_usd > budget.usd + 1e-12:
        return True
    return any(calls.get(tier, 0) > cap for tier, cap in budget.max_calls.items())


def run_episode(env: RoutingEnv, policy, task_id: str, budget: Budget, seed: int) -> EpisodeRecord:
    obs, info = env.reset(seed=seed, options={"task_id": task_id, "budget": budget})
    policy.begin(env, seed)
    steps = 0
    while True:
        obs, _, terminated, truncated, info = env.step(policy.act(obs, info))
        steps += 1
        if terminated or truncated:
            break
    calls = dict(info["calls"])
    extra = {"oracle_found": policy.found} if hasattr(policy, "found") else {}
    tiers = [tier for tier, _, _ in env.history]
    return EpisodeRecord(
        policy=policy.name,
        budget=budget.label,
        task_id=task_id,
        success=bool(info["success"]),
        cost_usd=float(info["cost_usd"]),
        calls=calls,
        steps=steps,
        budget_exhausted=bool(info["budget_exhausted"]),
        violation=budget_violated(budget, float(info["cost_usd"]), calls),
        switches=sum(a != b for a, b in zip(tiers, tiers[1:])),
        input_tokens=sum(env.ledger.input_tokens.values()),
        cached_tokens=sum(env.ledger.cached_tokens.values()),
        extra=extra,
    )


def evaluate(env: RoutingEnv, policies: list, task_ids: list[str], budgets: list[Budget], seed: int = 0,
             taxonomy: dict[str, str] | None = None, progress: bool = True) -> tuple[list[EpisodeRecord], dict]:
    """Run every (policy, budget) on every task. Returns the records and timing."""
    records = []
    total = len(policies) * len(budgets) * len(task_ids)
    start = time.perf_counter()
    with tqdm(total=total, desc="evaluating", disable=not progress) as bar:
        for budget in budgets:
            for policy in policies:
                bar.set_postfix_str(f"{policy.name} @ {budget.label}")
                for i, task_id in enumerate(task_ids):
                    record = run_episode(env, policy, task_id, budget, episode_seed(seed, i))
                    record.taxonomy = (taxonomy or {}).get(task_id)
                    records.append(record)
                    bar.update()
    return records, {"episodes": total, "seconds": time.perf_counter() - start}


def summarize(records: list[EpisodeRecord], top_tier: str, tiers: list[str] | None = None) -> list[dict]:
    """One row per (policy, budget): the metrics of the eval table.

    ``gap_recovered = (succ - succ_small) / (succ_large - succ_small)`` uses the unbudgeted
    always-small / always-large rows as the two boundaries; ``cost_vs_large`` divides the
    mean cost by unbudgeted always-large's; ``large_fraction`` is the priciest tier's share
    of calls and ``tier_shares`` every tier's (in ``tiers`` order); ``switch_rate`` the share
    of consecutive step pairs on different tiers; ``cached_input_share`` the share of input
    tokens billed at a cached price (0 unless the env models a prompt cache).
    """
    groups: dict[tuple[str, str], list[EpisodeRecord]] = defaultdict(list)
    for r in records:
        groups[(r.policy, r.budget)].append(r)

    def mean(values):
        values = list(values)
        return sum(values) / len(values) if values else float("nan")

    ref = {name: groups.get((name, REFERENCE_BUDGET)) for name in ("always-small", "always-large")}
    succ_small = mean(r.success for r in ref["always-small"]) if ref["always-small"] else None
    succ_large = mean(r.success for r in ref["always-large"]) if ref["always-large"] else None
    cost_large = mean(r.cost_usd for r in ref["always-large"]) if ref["always-large"] else None

    rows = []
    for (policy, budget), group in groups.items():
        calls_total = sum(sum(r.calls.values()) for r in group)
        calls_top = sum(r.calls.get(top_tier, 0) for r in group)
        success = mean(r.success for r in group)
        cost = mean(r.cost_usd for r in group)
        by_label = defaultdict(list)
        for r in group:
            if r.taxonomy:
                by_label[r.taxonomy].append(r.success)
        row = {
            "policy": policy,
            "budget": budget,
            "episodes": len(group),
            "success": success,
            "mean_cost_usd": cost,
            "cost_vs_large": cost / cost_large if cost_large else None,
            "large_fraction": calls_top / calls_total if calls_total else 0.0,
            "tier_shares": {t: (sum(r.calls.get(t, 0) for r in group) / calls_total if calls_total else 0.0)
                            for t in (tiers or sorted({t for r in group for t in r.calls}))},
            "success_by_taxonomy": {label: mean(v) for label, v in sorted(by_label.items())},
            "switch_rate": (sum(r.switches for r in group) / max(1, sum(max(r.steps - 1, 0) for r in group))),
            "cached_input_share": (sum(r.cached_tokens for r in group) / max(1, sum(r.input_tokens for r in group))),
            "budget_violations": sum(r.violation for r in group),
            "budget_exhausted": sum(r.budget_exhausted for r in group),
            "gap_recovered": (
                (success - succ_small) / (succ_large - succ_small)
                if succ_small is not None and succ_large is not None and succ_large != succ_small
                else None
            ),
        }
        if any("well_formed" in r.extra for r in group):
            turns = sum(r.extra["turns"] for r in group)
            row["well_formed"] = sum(r.extra["well_formed"] * r.extra["turns"] for r in group) / max(1, turns)
        if any("oracle_found" in r.extra for r in group):
            row["oracle_found"] = mean(r.extra.get("oracle_found", False) for r in group)
        rows.append(row)
    return rows
