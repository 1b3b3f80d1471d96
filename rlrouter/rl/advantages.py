"""The three advantage estimators, side by side, with one signature. This is the only
place GRPO, BoPO and PPO differ; rollouts, rewards, the clipped loss and the update are
shared.

Every estimator takes the batch's N scored episodes (``Episodes``: rewards, group index,
routes, BoPO's reference rewards, PPO's values) and the RL config, and returns
``(advantages, returns)``: one array per episode with a value per router turn (verl's
``core_algos`` shape; GRPO and BoPO have no critic, so their returns are the advantages).

- GRPO (Shao et al. 2024, eq. 3 outcome supervision): A_i = (R_i − mean(R)) / (std(R) + ε)
  over the G rollouts of one task; every router turn of episode i gets A_i.
- BoPO (reference-guided, shared/DESIGN.md): the baseline mixes the group mean with the
  rewards of the two boundary policies on the same task,
  b = (1 − w_S − w_L)·mean(R) + w_S·R_S + w_L·R_L, and the scale is the std of the group's
  rewards pooled with R_S and R_L: A_i = (R_i − b) / (σ + ε). A group that collapsed to cheap
  failure on a task where always-large succeeds keeps a negative advantage, where GRPO's
  would be zero.
- Prefix-tree credit (``rl.credit: tree``, for GRPO and BoPO): the G rollouts of a group
  share the episode seed, and worlds draw their randomness from (seed, position,
  attempt), so rollouts with the same route prefix are in the same state. At turn t of
  rollout i, the node is every rollout with i's first t routes, the child those that also
  chose i's route at t: A_{i,t} = (mean R(child) − b(node)) / (σ + ε), with b the group's
  (BoPO: reference-mixed) baseline at the root and the node's mean reward below it. A
  turn where the whole node chose alike gets 0: the episode's reward is credited only to
  the decisions that made a difference (a Monte Carlo Q − V without extra rollouts).
- PPO (Schulman et al. 2017): a value per router turn, the episode reward at the last turn,
  GAE over turns (Schulman et al. 2016, eq. 16): δ_t = r_t + γ·V_{t+1} − V_t,
  A_t = Σ_k (γλ)^k δ_{t+k}; returns A_t + V_t train the value head; advantages are then
  normalized over the batch (CleanRL's ``norm_adv``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EPS = 1e-6


def normalized(rewards: np.ndarray, baseline: float, scale: float, eps: float = EPS) -> np.ndarray:
    """(R − baseline) / (scale + ε): every estimator's episode-level advantage."""
    return (np.asarray(rewards, dtype=np.float64) - baseline) / (scale + eps)


def grpo_baseline(rewards: np.ndarray) -> tuple[float, float]:
    """GRPO's (baseline, scale) for one group: the group's mean and std."""
    rewards = np.asarray(rewards, dtype=np.float64)
    return float(rewards.mean()), float(rewards.std())


def grpo_advantages(rewards: np.ndarray, eps: float = EPS) -> np.ndarray:
    """Group-normalized advantages of the G rewards of one task."""
    return normalized(rewards, *grpo_baseline(rewards), eps)


def bopo_baseline(rewards: np.ndarray, ref_small: float, ref_large: float, w_small: float = 0.25,
                  w_large: float = 0.25) -> tuple[float, float]:
    """BoPO's (baseline, scale) for one group: the group mean mixed with the two boundary
    policies' rewards, and the std of the group pooled with them."""
    rewards = np.asarray(rewards, dtype=np.float64)
    if w_small < 0 or w_large < 0 or w_small + w_large > 1:
        raise ValueError(f"reference weights must be >= 0 and sum to <= 1, got {w_small}, {w_large}")
    baseline = (1 - w_small - w_large) * rewards.mean() + w_small * ref_small + w_large * ref_large
    return float(baseline), float(np.concatenate([rewards, [ref_small, ref_large]]).std())


def bopo_advantages(rewards: np.ndarray, ref_small: float, ref_large: float, w_small: float = 0.25,
                    w_large: float = 0.25, eps: float = EPS) -> np.ndarray:
    """Reference-guided advantages; with w_small = w_large = 0 the baseline is the group
    mean (the scale still pools the references)."""
    return normalized(rewards, *bopo_baseline(rewards, ref_small, ref_large, w_small, w_large), eps)


def node_members(routes, t: int, prefix) -> list[int]:
    """The prefix-tree node at turn ``t`` below ``prefix``: indices of the rollouts whose
    first ``t`` routes are ``prefix[:t]`` and that played turn ``t``."""
    prefix = list(prefix[:t])
    return [j for j, r in enumerate(routes) if len(r) > t and list(r[:t]) == prefix]


def tree_advantages(routes: list[list[int]], rewards: np.ndarray, root_baseline: float, scale: float,
                    eps: float = EPS) -> list[np.ndarray]:
    """Per-turn advantages of one group from its prefix tree (see the module docstring).

    ``routes[i]`` are rollout i's tiers, turn by turn; ``rewards[i]`` its episode reward.
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    out = []
    for mine in routes:
        adv = np.zeros(len(mine))
        for t in range(len(mine)):
            node = node_members(routes, t, mine)
            child = [j for j in node if routes[j][t] == mine[t]]
            baseline = root_baseline if t == 0 else rewards[node].mean()
            adv[t] = (rewards[child].mean() - baseline) / (scale + eps)
        out.append(adv)
    return out


def gae(rewards: np.ndarray, values: np.ndarray, gamma: float = 1.0, lam: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """(advantages, returns) over the T router turns of one finished episode.

    ``rewards[t]`` is the reward after turn t (the episode reward at the last turn, 0
    before); ``values[t]`` is V at turn t. The value after the last turn is 0 (terminal).
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    advantages = np.zeros_like(rewards)
    running = 0.0
    for t in reversed(range(len(rewards))):
        next_value = values[t + 1] if t + 1 < len(rewards) else 0.0  # bootstrap unless terminal
        delta = rewards[t] + gamma * next_value - values[t]
        running = delta + gamma * lam * running
        advantages[t] = running
    return advantages, advantages + values


def explained_variance(predicted: np.ndarray, target: np.ndarray) -> float:
    """1 − Var(target − predicted) / Var(target) (CleanRL's diagnostic); nan if Var(target) = 0."""
    var = np.var(target)
    return float("nan") if var == 0 else float(1 - np.var(np.asarray(target) - np.asarray(predicted)) / var)


# -- the estimators: (Episodes, config) -> (advantages, returns), one array per episode ------
@dataclass
class Episodes:
    """What an estimator reads about the batch's N episodes, in batch order."""

    rewards: np.ndarray  # (N,) episode rewards (``rewards.episode_reward``)
    group: np.ndarray  # (N,) group index: same task, seed, budget and λ
    routes: list[list[int]]  # tier index of every router turn
    references: np.ndarray | None = None  # (N, 2) BoPO: expected rewards of always-small / always-large
    values: list[np.ndarray] | None = None  # PPO: V at every router turn

    def groups(self):
        """(indices, rewards) of each group, in order of first appearance."""
        for g in dict.fromkeys(self.group.tolist()):
            members = np.flatnonzero(self.group == g)
            yield members, self.rewards[members]


def _credit(episodes: Episodes, baselines: dict, tree: bool) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Spread each group's (baseline, scale) over its episodes' turns: the same advantage on
    every turn (``episode``), or prefix-tree credit (``tree``)."""
    out: list[np.ndarray | None] = [None] * len(episodes.rewards)
    for members, rewards in episodes.groups():
        baseline, scale = baselines[members[0]]
        if tree:
            per_turn = tree_advantages([episodes.routes[i] for i in members], rewards, baseline, scale)
        else:
            per_turn = [np.full(len(episodes.routes[i]), a) for i, a in
                        zip(members, normalized(rewards, baseline, scale))]
        for i, adv in zip(members, per_turn):
            out[i] = adv
    return out, out


def grpo(episodes: Episodes, config) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """GRPO: each group's own mean and std."""
    baselines = {members[0]: grpo_baseline(rewards) for members, rewards in episodes.groups()}
    return _credit(episodes, baselines, config.credit == "tree")


def bopo(episodes: Episodes, config) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """BoPO: the group mean mixed with the boundary policies' rewards."""
    baselines = {}
    for members, rewards in episodes.groups():
        ref_small, ref_large = episodes.references[members[0]]
        baselines[members[0]] = bopo_baseline(rewards, ref_small, ref_large, config.ref_weight_small,
                                              config.ref_weight_large)
    return _credit(episodes, baselines, config.credit == "tree")


def ppo(episodes: Episodes, config) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """PPO: GAE over each episode's turns with the value head's V, then batch-normalized."""
    advantages, returns = [], []
    for reward, routes, values in zip(episodes.rewards, episodes.routes, episodes.values):
        per_turn = np.zeros(len(routes))
        per_turn[-1] = reward  # the reward arrives at the end of the episode
        a, ret = gae(per_turn, values, config.gamma, config.gae_lambda)
        advantages.append(a)
        returns.append(ret)
    flat = np.concatenate(advantages)
    mean, std = flat.mean(), flat.std() + 1e-8
    return [(a - mean) / std for a in advantages], returns


ESTIMATORS = {"grpo": grpo, "bopo": bopo, "ppo": ppo}
