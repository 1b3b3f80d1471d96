"""Per-step outcomes of every tier, read from the boundary runs: the training data of the
embedding routers (``rlrouter.evaluate.learned``).

The boundary runs play each task always-cheapest and always-priciest from the same episode
seeds (``boundary_runs``' seeds). At every step this records what the router saw then (the
step text and the numeric state) and whether the step succeeded under each tier. Where the
world can copy an episode state (synthetic, replay) every tier is tried from a snapshot of
that state, so each row has every tier's outcome at the same state; where it cannot (a live
text game) a row has only the outcome of the tier that played it (``known`` marks which).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from envs.budget import Budget
from envs.routing import RoutingEnv

NUMERIC_STATE = ("steps taken / step limit", "sub-goals done / length", "last outcome (+1 ok, -1 failed, 0 none)",
                 "failed share of the steps so far", "cost so far (USD)")


def numeric_state(view: dict) -> list[float]:
    """The router-visible numbers of a step (``NUMERIC_STATE``), from ``RoutingEnv.view()``.

    The budget left is not among them: the boundary runs are unbudgeted, so it would be a
    constant in training; it enters the embedding routers' decision (rationing) instead.
    """
    history = view["history"]
    failed = sum(h["event"] != "ok" for h in history)
    last = 0.0 if not history else (1.0 if history[-1]["event"] == "ok" else -1.0)
    return [view["step_index"] / max(1, view["max_steps"]), view["position"] / max(1, view["length"]), last,
            failed / max(1, len(history)), float(view["cost_usd"])]


@dataclass
class StepTable:
    """One row per (boundary run, step): what the router saw and each tier's outcome.

    ``success[i, t]`` is 1.0 / 0.0 where ``known[i, t]``; ``cost_usd[i, t]`` the step's cost
    under tier t (NaN where unknown).
    """

    tiers: list[str]
    task_ids: list[str]
    texts: list[str]
    numeric: np.ndarray
    success: np.ndarray
    known: np.ndarray
    cost_usd: np.ndarray
    counterfactual: bool

    def __len__(self) -> int:
        return len(self.texts)

    def summary(self) -> dict:
        return {
            "rows": len(self),
            "tasks": len(set(self.task_ids)),
            "unique_texts": len(set(self.texts)),
            "counterfactual": self.counterfactual,
            "success_rate": {t: float(self.success[self.known[:, i], i].mean()) if self.known[:, i].any() else None
                             for i, t in enumerate(self.tiers)},
        }


def can_copy_states(env: RoutingEnv) -> bool:
    try:
        env.snapshot()
    except NotImplementedError:
        return False
    return True


def boundary_steps(env: RoutingEnv, task_ids: list[str], k: int = 1, seed: int = 0,
                   progress: bool = True) -> StepTable:
    """Play the boundary runs (``k`` seeds per task and boundary tier) and record every step."""
    if not task_ids:
        raise ValueError("no tasks to read boundary steps from")
    n = len(env.pool)
    boundary_tiers = sorted({0, n - 1})
    rows = {"task_ids": [], "texts": [], "numeric": [], "success": [], "cost": []}
    counterfactual = None
    for task_id in tqdm(task_ids, desc="boundary steps", disable=not progress, leave=False):
        for j in range(k):
            for played in boundary_tiers:
                env.reset(seed=seed * 1000 + j, options={"task_id": task_id, "budget": Budget()})
                if counterfactual is None:
                    counterfactual = can_copy_states(env)
                while True:
                    view = env.view()
                    success, cost = np.full(n, np.nan), np.full(n, np.nan)
                    tried = range(n) if counterfactual else [played]
                    snapshot = env.snapshot() if counterfactual else None
                    for tier in [t for t in tried if t != played] + [played]:  # the played tier last: it goes on
                        if snapshot is not None:
                            env.restore(snapshot)
                        _, _, terminated, truncated, info = env.step(tier)
                        success[tier], cost[tier] = float(info["step_ok"]), info["step_cost_usd"]
                    rows["task_ids"].append(task_id)
                    rows["texts"].append(view["step_text"])
                    rows["numeric"].append(numeric_state(view))
                    rows["success"].append(success)
                    rows["cost"].append(cost)
                    if terminated or truncated:
                        break
    success = np.asarray(rows["success"])
    return StepTable(tiers=list(env.pool.names), task_ids=rows["task_ids"], texts=rows["texts"],
                     numeric=np.asarray(rows["numeric"], dtype=np.float32), success=np.nan_to_num(success),
                     known=~np.isnan(success), cost_usd=np.asarray(rows["cost"]), counterfactual=bool(counterfactual))
