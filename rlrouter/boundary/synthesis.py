"""Stratified synthesis of SFT trajectories from the boundary taxonomy (BoPO; shared/DESIGN.md).

- easy and intractable tasks -> an always-small trajectory (cheap success, cheap failure);
- hard tasks -> for every stratum, M trajectories that draw each step's tier from the
  stratum's shares, all with the task's episode seed; keep the cheapest successful one, then
  prune it (move each call to the cheapest tier that still succeeds, cheaper). If none
  succeeds: the always-priciest trajectory when it succeeds, else the task is left out and
  counted. ``hard_labels: hindsight`` routes each step of a hard task to the cheapest tier
  that does what the priciest tier does there, in hindsight, instead (labels whose mean is
  the step's gain; with ``hindsight_draws`` > 1, taken over redraws of each step, labels
  that threshold the gain). ``hard_labels: relabel`` plays each hard task with random
  routing (P(priciest) = ``relabel_p``) and writes at every state it visits the hindsight
  tier of that state, not the tier played (DAgger-style: labels off the cheap successful
  route too; failed episodes kept). With ``hard_seeds`` > 1 this is done under that many
  episode seeds per hard task: fresh draws of the world, so fresh labels (``hard_repeat``
  copies one).

Strata (``strata``) are the shares of the tiers on a grid of step 1/N: with two tiers,
P(priciest) = k/N for k = 0..N (BoPO); with n tiers, every point of the simplex grid
(``N + n − 1`` choose ``n − 1`` of them), so a middle tier can carry a trajectory alone.

Each trajectory is written as the router conversation (rlrouter.router.prompt), with the
think text built only from what the router could see at that step. Every trajectory is
played under a budget drawn (seeded) from ``synth.budgets`` and written in its prompt, so
the router sees budgets during SFT. Same recipe + seed -> the same dataset.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from envs.budget import Budget
from envs.routing import RoutingEnv, nearest_allowed
from rlrouter.boundary.runs import BoundaryStats, boundary_runs, classify, taxonomy_counts
from rlrouter.router.prompt import (feedback_user_message, first_user_message, format_route, step_user_message,
                                    system_message, think_text)


HARD_LABELS = ("search", "hindsight", "relabel")


@dataclass
class Trajectory:
    task_id: str
    budget: str
    success: bool
    cost_usd: float
    actions: list[int]  # the tiers the episode played
    messages: list[dict] = field(default_factory=list)
    step_prompts: list[str] = field(default_factory=list)  # step_user_message at each decision
    written: list[int] | None = None  # the tiers the route turns write, where not the played ones

    @property
    def labels(self) -> list[int]:
        """The tier each route turn of the conversation writes (what SFT learns)."""
        return self.actions if self.written is None else self.written


def play_trajectory(env: RoutingEnv, task_id: str, budget: Budget, seed: int, choose,
                    written: list[int] | None = None) -> Trajectory:
    """Play one episode; ``choose(view) -> tier index`` (remapped to the mask); record the chat.
    ``written``: the tier each route turn writes instead of the played one (a relabelled
    state, ``relabeled_trajectory``), remapped to the mask the same way."""
    env.reset(seed=seed, options={"task_id": task_id, "budget": budget})
    messages = [{"role": "system", "content": system_message(env.pool.describe())}]
    actions, step_prompts, labels = [], [], []
    while True:
        view = env.view()
        messages.append({"role": "user",
                         "content": first_user_message(view) if not view["history"] else feedback_user_message(view)})
        step_prompts.append(step_user_message(view))
        mask = np.asarray(view["action_mask"], dtype=np.int8)
        action = int(choose(view))
        if mask.any() and not mask[action]:
            action = nearest_allowed(action, mask)
        label = action if written is None else int(written[len(actions)])
        if mask.any() and not mask[label]:
            label = nearest_allowed(label, mask)
        messages.append({"role": "assistant", "content": format_route(env.pool.tiers[label].name, think_text(view))})
        _, _, terminated, truncated, info = env.step(action)
        actions.append(action)
        labels.append(label)
        if terminated or truncated:
            return Trajectory(task_id, budget.label, bool(info["success"]), float(info["cost_usd"]), actions, messages,
                              step_prompts, None if written is None else labels)


def strata(n_tiers: int, n_strata: int) -> list[np.ndarray]:
    """The tiers' shares of every stratum, cheapest tier first: the points of the simplex
    grid of step 1/N, ordered by the pricier tiers' total share, lowest first. Two tiers
    give (1 − k/N, k/N) for k = 0..N."""
    if n_tiers == 1:
        return [np.ones(1)]

    def compositions(total: int, parts: int):  # non-negative integer vectors summing to total
        if parts == 1:
            yield (total,)
            return
        for first in range(total + 1):
            for rest in compositions(total - first, parts - 1):
                yield (first, *rest)

    pricier = sorted((c for total in range(n_strata + 1) for c in compositions(total, n_tiers - 1)),
                     key=lambda c: (sum(c), c[::-1]))
    return [np.array([n_strata - sum(c), *c]) / n_strata for c in pricier]


def draw_tier(u: float, shares: np.ndarray) -> int:
    """The tier a uniform draw ``u`` picks under ``shares``, the priciest tier's interval
    first (two tiers: the priciest iff u < its share, as BoPO's P(large) = k/N)."""
    cumulative = 0.0
    for tier in range(len(shares) - 1, 0, -1):
        cumulative += shares[tier]
        if u < cumulative:
            return tier
    return 0


def cheapest_successful(env: RoutingEnv, task_id: str, budget: Budget, seed: int, n_strata: int,
                        samples: int) -> Trajectory | None:
    """Stratified search over ``strata``, ``samples`` each; the cheapest success, pruned.

    Every sample plays the episode with the same ``seed``."""
    best = None
    for k, shares in enumerate(strata(len(env.pool), n_strata)):
        for m in range(samples):
            # One episode seed for every sample: the world's draws are shared (common random
            # numbers), so samples differ only in where they spend pricier calls, and the
            # cheapest success puts them where the cheaper tiers would fail, not on luck.
            rng = np.random.default_rng([seed, k, m])
            traj = play_trajectory(env, task_id, budget, seed, lambda view: draw_tier(rng.random(), shares))
            if traj.success and (best is None or traj.cost_usd < best.cost_usd):
                best = traj
    return prune_calls(env, task_id, budget, seed, best) if best is not None else None


def prune_calls(env: RoutingEnv, task_id: str, budget: Budget, seed: int, traj: Trajectory) -> Trajectory:
    """Move every call the success did not need to a cheaper tier: replay (same seed) with
    each call above the cheapest tier switched to each cheaper tier, cheapest first, in
    order, and keep the first switch that still succeeds at a lower cost. Random placement
    puts many pricey calls on routine steps; this pass leaves them where the cheaper tiers
    would have failed (and, with three tiers, moves a large call to medium where medium
    suffices)."""
    for index in range(len(traj.actions)):
        for cheaper in range(traj.actions[index]):
            route = list(traj.actions)
            route[index] = cheaper
            candidate = play_trajectory(env, task_id, budget, seed, lambda view, r=route: (
                r[len(view["history"])] if len(view["history"]) < len(r) else 0))
            if candidate.success and candidate.cost_usd < traj.cost_usd:
                traj = candidate
                break
    return traj


def replay_route(env: RoutingEnv, task_id: str, budget: Budget, seed: int, route: list[int],
                 redraw: int = 0) -> tuple[tuple, bool]:
    """Replay ``route`` from the episode's start (same seed): (its last step's outcome, did
    the episode end there). The outcome is what the step did as the environment shows it
    (event and observation), the same for two tiers only if they did the same thing. A tier
    the budget forbids is remapped as in an episode. ``redraw`` > 0 plays the last step
    under that redraw of its random numbers (``RoutingEnv.redraw``)."""
    env.reset(seed=seed, options={"task_id": task_id, "budget": budget})
    for index, action in enumerate(route):
        mask = np.asarray(env.view()["action_mask"], dtype=np.int8)
        if mask.any() and not mask[action]:
            action = nearest_allowed(action, mask)
        if redraw and index == len(route) - 1:
            env.redraw(redraw)
        _, _, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            break
    _, event, observation = env.history[-1]
    return (event, observation), bool(terminated or truncated)


def hindsight_trajectory(env: RoutingEnv, task_id: str, budget: Budget, seed: int, draws: int = 1,
                         tolerance: float = 0.5) -> Trajectory:
    """Route every step to the cheapest tier that does what the priciest tier does there,
    in hindsight: the same event and observation under the episode's seed.

    Under common random numbers the cheaper tier differs from the priciest one at a step
    exactly where the priciest gets it right and the cheaper one does not (the step's draw
    falls between their success probabilities), so a "pricier" label has probability equal
    to the pricier tier's gain at that step — where the cheapest sampled success
    (``cheapest_successful``) marks wherever a sampled route happened to succeed. It needs
    no hidden outcome: in a text game, where every played command is "ok", the tiers
    differ by the command's effect on the game. Each step is found by replaying the route
    so far (any world, no state copy): O(steps²) environment steps per episode.

    With ``draws`` > 1 each step is also played under ``draws − 1`` redraws of its random
    numbers (``RoutingEnv.redraw``; the route so far stays the episode's own), and a
    cheaper tier takes the step when it does otherwise than the priciest tier in at most a
    ``tolerance`` share of the draws: the label becomes "the pricier tier's gain here is
    above ``tolerance``", a function of the step rather than one Bernoulli draw of it. The
    episode goes on under its own draws, so the route may fail where the priciest tier
    would not have. ``draws = 1`` is the rule above for any ``tolerance`` < 1. Bad ``draws``
    or ``tolerance`` raise in the first ``hindsight_label``, before any replay."""
    route: list[int] = []
    while True:
        tier, ended = hindsight_label(env, task_id, budget, seed, route, draws, tolerance)
        route.append(tier)
        if ended:
            return play_trajectory(env, task_id, budget, seed, lambda view: (
                route[len(view["history"])] if len(view["history"]) < len(route) else 0))


def check_hindsight(draws: int, tolerance: float) -> None:
    """Raise ``ValueError`` unless ``draws`` is an integer >= 1 and ``tolerance`` in [0, 1)."""
    if not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws must be an integer >= 1, got {draws!r}")
    if not 0 <= tolerance < 1:
        raise ValueError(f"tolerance must be in [0, 1), got {tolerance!r}")


def hindsight_label(env: RoutingEnv, task_id: str, budget: Budget, seed: int, route: list[int], draws: int,
                    tolerance: float) -> tuple[int, bool]:
    """(the hindsight tier of the step after ``route``, does the episode end there with
    it): the cheapest tier that does otherwise than the priciest in at most a ``tolerance``
    share of ``draws`` draws of the step (``hindsight_trajectory``)."""
    check_hindsight(draws, tolerance)
    top = len(env.pool) - 1
    reference = [replay_route(env, task_id, budget, seed, route + [top], redraw=r) for r in range(draws)]
    for cheaper in range(top):
        outcomes = [replay_route(env, task_id, budget, seed, route + [cheaper], redraw=r) for r in range(draws)]
        differ = sum(o != ref for (o, _), (ref, _) in zip(outcomes, reference))
        if differ <= tolerance * draws:
            return cheaper, outcomes[0][1]
    return top, reference[0][1]


def relabeled_trajectory(env: RoutingEnv, task_id: str, budget: Budget, seed: int, p: float, draws: int = 1,
                         tolerance: float = 0.5) -> Trajectory:
    """Hindsight labels on the states a random route visits (DAgger-style relabelling).

    The episode is played with random routing (the priciest tier with probability ``p``,
    seeded by ``seed``); at every state it visits, the route turn writes the hindsight tier
    (``hindsight_label``: what the router should do there), not the tier played. Where
    ``hindsight_trajectory`` labels only the states along its own, mostly cheap and
    successful, route, this labels states off it too — the mistakes and detours a router
    meets — so the labels cover the situations in which the priciest tier gains, whatever
    the episode's outcome. Failed episodes are kept: a label is about its state."""
    if not 0 <= p <= 1:
        raise ValueError(f"p must be a probability, got {p!r}")
    check_hindsight(draws, tolerance)
    top = len(env.pool) - 1
    rng = np.random.default_rng([seed, 23])
    played = play_trajectory(env, task_id, budget, seed, lambda view: top if rng.random() < p else 0)
    labels = [hindsight_label(env, task_id, budget, seed, played.actions[:index], draws, tolerance)[0]
              for index in range(len(played.actions))]
    return play_trajectory(env, task_id, budget, seed, lambda view: played.actions[len(view["history"])],
                           written=labels)


def episode_draw(seed: int, index: int, draw: int, budgets: list[Budget]) -> tuple[Budget, int]:
    """(budget, episode seed) of draw ``draw`` of the ``index``-th synthesized task. Draw 0
    keeps the seeding of a single draw, so ``hard_seeds = 1`` is the old dataset."""
    rng = np.random.default_rng([seed, 17, index] if draw == 0 else [seed, 17, index, draw])
    return budgets[int(rng.integers(len(budgets)))], int(rng.integers(2**31 - 1))


def synthesize(env: RoutingEnv, task_ids: list[str], budgets: list[Budget], seed: int = 0, k_boundary: int = 5,
               theta: float = 0.5, n_strata: int = 4, samples: int = 4, hard_repeat: int = 1, hard_seeds: int = 1,
               hard_labels: str = "search", hindsight_draws: int = 1, hindsight_tolerance: float = 0.5,
               relabel_p: float = 0.5, progress: bool = True):
    """Boundary runs, taxonomy and stratified synthesis. Returns (dataset, stats, labels, report).

    Each hard task is searched under ``hard_seeds`` episode seeds (each with its own budget
    draw and its own cheapest success); ``hard_repeat`` then copies every hard row.
    ``hard_labels`` picks how a hard task's route is found: ``search`` (the stratified search
    for the cheapest success, pruned), ``hindsight`` (``hindsight_trajectory`` with
    ``hindsight_draws`` and ``hindsight_tolerance``) or ``relabel`` (the same labels on the
    states of a random route with P(priciest) = ``relabel_p``, ``relabeled_trajectory``)."""
    if hard_labels not in HARD_LABELS:
        raise ValueError(f"hard_labels must be one of {HARD_LABELS}, got {hard_labels!r}")
    from datasets import Dataset

    stats = boundary_runs(env, task_ids, k=k_boundary, seed=seed, progress=progress)
    labels = {t: classify(s.s_small, s.s_large, theta) for t, s in stats.items()}
    top = len(env.pool) - 1
    rows, skipped = [], []
    for index, task_id in enumerate(tqdm(task_ids, desc="synthesis", disable=not progress, leave=False)):
        for draw in range(hard_seeds if labels[task_id] == "hard" else 1):
            budget, episode_seed = episode_draw(seed, index, draw, budgets)
            if labels[task_id] == "hard":
                if hard_labels == "hindsight":
                    traj = hindsight_trajectory(env, task_id, budget, episode_seed, hindsight_draws,
                                                hindsight_tolerance)
                    traj = traj if traj.success else None
                elif hard_labels == "relabel":
                    traj = relabeled_trajectory(env, task_id, budget, episode_seed, relabel_p, hindsight_draws,
                                                hindsight_tolerance)
                else:
                    traj = cheapest_successful(env, task_id, budget, episode_seed, n_strata, samples)
                # Averaged hindsight labels get no always-priciest fallback: "the priciest
                # everywhere" is not what they say (one draw keeps it, as it was measured).
                if traj is None and (hard_labels == "search" or (hard_labels == "hindsight" and hindsight_draws == 1)):
                    fallback = play_trajectory(env, task_id, budget, episode_seed, lambda view: top)
                    traj = fallback if fallback.success else None
            else:
                traj = play_trajectory(env, task_id, budget, episode_seed, lambda view: 0)
            if traj is None:
                skipped.append(task_id)
                continue
            s = stats[task_id]
            rows.append({
                "messages": traj.messages,
                "step_prompts": traj.step_prompts,
                "task_id": task_id,
                "taxonomy": labels[task_id],
                "budget": traj.budget,
                "success": traj.success,
                "cost_usd": traj.cost_usd,
                "large_calls": int(sum(a == top for a in traj.labels)),
                "tier_calls": [int(sum(a == t for a in traj.labels)) for t in range(len(env.pool))],
                "steps": len(traj.actions),
                "played": traj.actions,
                "s_small": s.s_small, "s_large": s.s_large, "c_small": s.c_small, "c_large": s.c_large,
            })
    # Hard tasks are where routing decisions are learned; repeating them balances the strata.
    rows = [r for r in rows for _ in range(hard_repeat if r["taxonomy"] == "hard" else 1)]
    dataset = Dataset.from_list(rows)
    report = {
        "tasks": len(task_ids),
        "examples": len(rows),
        "hard_repeat": hard_repeat,
        "hard_seeds": hard_seeds,
        "hard_labels": hard_labels,
        "hindsight_draws": hindsight_draws,
        "hindsight_tolerance": hindsight_tolerance,
        **({"relabel_p": relabel_p} if hard_labels == "relabel" else {}),
        "skipped_hard_without_success": skipped,
        "taxonomy_counts": taxonomy_counts(labels),
        "mean_large_fraction_hard": float(np.mean([r["large_calls"] / r["steps"] for r in rows
                                                   if r["taxonomy"] == "hard"] or [0.0])),
        "success_rate_of_examples": float(np.mean([r["success"] for r in rows] or [0.0])),
        "tier_shares_hard": tier_shares([r for r in rows if r["taxonomy"] == "hard"], env.pool.names),
    }
    return dataset, stats, labels, report


def tier_shares(rows: list[dict], names: list[str]) -> dict[str, float]:
    """Each tier's share of the calls in ``rows`` (synthesized trajectories)."""
    totals = np.sum([r["tier_calls"] for r in rows], axis=0) if rows else np.zeros(len(names))
    return {name: float(n / totals.sum()) if totals.sum() else 0.0 for name, n in zip(names, totals)}


def step_examples(dataset):
    """One short chat per decision: [system, step prompt, the trajectory's route turn]."""
    from datasets import Dataset

    rows = []
    for messages, prompts in zip(dataset["messages"], dataset["step_prompts"]):
        routes = [m for m in messages if m["role"] == "assistant"]
        for prompt, route in zip(prompts, routes):
            rows.append({"messages": [messages[0], {"role": "user", "content": prompt}, route]})
    return Dataset.from_list(rows)


def save_synthesis(out_dir: str | Path, dataset, stats: dict[str, BoundaryStats], labels: dict[str, str],
                   report: dict) -> Path:
    """``out_dir/dataset`` (datasets.save_to_disk), ``boundary.json`` (per-task stats) and ``report.json``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dataset.save_to_disk(str(out_dir / "dataset"))
    (out_dir / "boundary.json").write_text(json.dumps(
        {t: {**s.to_dict(), "taxonomy": labels[t]} for t, s in stats.items()}, indent=1))
    (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    return out_dir
