"""Boundary runs and the easy / hard / intractable taxonomy (shared/DESIGN.md, BoPO).

Each task runs K times always-small and K times always-large (no budget), giving per task
success rates s_S, s_L and mean costs c_S, c_L. With threshold θ (default 0.5):

- easy:        s_S ≥ θ                (the small model alone usually solves it)
- hard:        s_S < θ ≤ s_L          (only the large model usually solves it)
- intractable: s_S < θ and s_L < θ    (neither does)
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass

from tqdm.auto import tqdm

from envs.budget import Budget
from envs.routing import RoutingEnv

LABELS = ("easy", "hard", "intractable")


@dataclass(frozen=True)
class BoundaryStats:
    task_id: str
    s_small: float
    s_large: float
    c_small: float
    c_large: float
    k: int

    def to_dict(self) -> dict:
        return asdict(self)


def classify(s_small: float, s_large: float, theta: float = 0.5) -> str:
    """Taxonomy label from boundary success rates (see module docstring)."""
    if s_small >= theta:
        return "easy"
    if s_large >= theta:
        return "hard"
    return "intractable"


def play_fixed_tier(env: RoutingEnv, task_id: str, tier_index: int, seed: int) -> tuple[bool, float]:
    """One unbudgeted episode that routes every step to ``tier_index``: (success, cost)."""
    env.reset(seed=seed, options={"task_id": task_id, "budget": Budget()})
    while True:
        _, _, terminated, truncated, info = env.step(tier_index)
        if terminated or truncated:
            return bool(info["success"]), float(info["cost_usd"])


def boundary_runs(env: RoutingEnv, task_ids: list[str], k: int = 5, seed: int = 0,
                  progress: bool = True) -> dict[str, BoundaryStats]:
    """K always-cheapest and K always-priciest episodes per task (seeds ``seed*1000+j``)."""
    if k < 1:
        raise ValueError(f"boundary runs need k >= 1, got {k}")
    saved_budget = env.budget
    top = len(env.pool) - 1
    stats = {}
    for task_id in tqdm(task_ids, desc="boundary runs", disable=not progress, leave=False):
        small = [play_fixed_tier(env, task_id, 0, seed * 1000 + j) for j in range(k)]
        large = [play_fixed_tier(env, task_id, top, seed * 1000 + j) for j in range(k)]
        stats[task_id] = BoundaryStats(
            task_id,
            s_small=sum(s for s, _ in small) / k,
            s_large=sum(s for s, _ in large) / k,
            c_small=sum(c for _, c in small) / k,
            c_large=sum(c for _, c in large) / k,
            k=k,
        )
    env.budget = saved_budget
    return stats


def taxonomy_counts(labels: dict[str, str]) -> dict[str, int]:
    counts = Counter(labels.values())
    return {label: counts.get(label, 0) for label in LABELS}
