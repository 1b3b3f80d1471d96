"""Episode rewards for the RL stage, all in one place.

Two reward kinds (recipe ``rl.reward``):

- ``cost``: R = 1[success] − λ·C_usd − format penalty. The plain cost-penalized reward
  (Router-R1's outcome + cost terms). With λ in dollars⁻¹ it is scale-dependent and, on its
  own, pushes a router toward "always small, fail cheaply".
- ``bopo``: the boundary-relative reward of shared/DESIGN.md,
  R = 1[success] + β·1[success ∧ hard] − λ·C_norm − format penalty, with
  C_norm = clip((C − c_S)/(c_L − c_S), 0, C_max): spending what always-small spends on this
  task costs nothing, spending what always-large spends costs λ. ``hard`` is the task's
  boundary taxonomy (s_S < θ ≤ s_L), the difficulty bonus β pays for solving the tasks that
  need the large model.

The format penalty is ``format_penalty`` × the fraction of the episode's router turns that
the strict parser rejected.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

REWARD_KINDS = ("bopo", "cost")


@dataclass(frozen=True)
class TaskBoundary:
    """A task's boundary statistics (from the synth stage's ``boundary.json``)."""

    s_small: float
    s_large: float
    c_small: float
    c_large: float
    taxonomy: str


@dataclass(frozen=True)
class RewardSpec:
    """Reward settings (recipe ``rl`` fields of the same names)."""

    kind: str = "bopo"
    hard_bonus: float = 0.5  # β
    cost_clip: float = 2.0  # C_max
    format_penalty: float = 0.5


def normalized_cost(cost_usd: float, boundary: TaskBoundary, cost_clip: float) -> float:
    """C_norm = clip((C − c_S)/(c_L − c_S), 0, C_max); 0 when the task's boundary costs coincide."""
    span = boundary.c_large - boundary.c_small
    if span <= 0:
        return 0.0
    return float(np.clip((cost_usd - boundary.c_small) / span, 0.0, cost_clip))


def episode_reward(spec: RewardSpec, success: bool, cost_usd: float, malformed_fraction: float, cost_lambda: float,
                   boundary: TaskBoundary | None = None) -> float:
    """The scalar reward of one finished episode."""
    penalty = spec.format_penalty * malformed_fraction
    if spec.kind == "cost":
        return float(success) - cost_lambda * cost_usd - penalty
    if spec.kind == "bopo":
        if boundary is None:
            raise ValueError("the bopo reward needs the task's boundary statistics (run the synth stage first)")
        bonus = spec.hard_bonus * float(success and boundary.taxonomy == "hard")
        return float(success) + bonus - cost_lambda * normalized_cost(cost_usd, boundary, spec.cost_clip) - penalty
    raise ValueError(f"rl.reward must be one of {list(REWARD_KINDS)}, got {spec.kind!r}")


def reference_rewards(spec: RewardSpec, boundary: TaskBoundary, cost_lambda: float) -> tuple[float, float]:
    """Expected rewards of always-small and always-large on the task (from s_S, c_S, s_L, c_L):
    the two boundary policies that BoPO's reference-guided advantage compares a group to."""
    out = []
    for s, c in ((boundary.s_small, boundary.c_small), (boundary.s_large, boundary.c_large)):
        if spec.kind == "cost":
            out.append(s - cost_lambda * c)
        else:
            bonus = spec.hard_bonus * s * float(boundary.taxonomy == "hard")
            out.append(s + bonus - cost_lambda * normalized_cost(c, boundary, spec.cost_clip))
    return out[0], out[1]
