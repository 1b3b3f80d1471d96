"""RoutingEnv: a world + a pool + a budget + a reward, as a ``gymnasium.Env``."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from envs.budget import Budget, route_mask, usd_left
from envs.pool import CostLedger, Pool
from envs.worlds.base import World

HISTORY_OUTCOMES = 4  # recent step outcomes in the numeric features
PROMPT_MAX_CHARS = 8192
FEATURE_MAX = 1e6  # finite bound for the features Box (counts and dollars stay far below)


class RoutingEnv(gym.Env):
    """Route each step of a multi-step agent episode to one tier of a model pool.

    ## Description
    An agent solves a task in many steps. Before each step the router (the policy of this
    environment) picks which model of the pool takes it: a cheap ``small``, an expensive
    ``large``, or any other tier. The chosen model's call is charged from its real token
    counts at the tier's list prices. The episode ends when the task is solved, fails
    irrecoverably, hits the world's step limit, or the budget cannot pay for another step.

    ## Action Space
    ``Discrete(n_tiers)``: index into the pool's tiers, cheapest first
    (``env.unwrapped.pool.names``). Tiers the budget cannot pay for are masked
    (``info["action_mask"]``); taking one raises ``ValueError``, or, with
    ``masked_action="remap"``, is replaced by the nearest allowed tier (cheaper first).

    ## Observation Space
    ``Dict``:
    - ``"prompt"``: ``Text`` — the router-visible state as plain text: pool and prices,
      budget left, task, the last ``history_window`` steps (tier, outcome), current step.
    - ``"features"``: ``Box(float32)`` — [steps taken / step limit, progress, cost so far
      (USD), USD left (-1 if uncapped), per tier: calls so far and calls left (-1 if
      uncapped), last 4 step outcomes (+1 ok, -1 failed, 0 none)].

    ## Rewards
    Every step pays ``-cost_lambda * step_cost_usd``; the step that solves the task adds
    ``success_reward`` (default 1). The episode return is ``1[success] - λ·cost_usd``.

    ## Starting State
    ``reset(seed=..., options={"task_id": ..., "budget": Budget | dict})``: the task is drawn
    from the split with ``self.np_random`` unless ``task_id`` is given; the episode's seed
    for the world (executors' randomness) is drawn from ``self.np_random``.

    ## Episode End
    - Termination: the task is solved, or failed irrecoverably (a fatal error), or (replay)
      all its queries were answered.
    - Truncation: the world's agent-step limit, or the budget cannot pay for the cheapest
      tier's next step (``info["budget_exhausted"] = True``). A budget is never exceeded.

    ## Arguments
    - ``world``: a :class:`envs.worlds.base.World`.
    - ``pool``: the :class:`envs.pool.Pool` (default small/large at list prices).
    - ``budget``: a :class:`envs.budget.Budget` (default unbounded).
    - ``cost_lambda``: λ, reward per dollar spent (default 0).
    - ``success_reward``: reward for solving the task (default 1).
    - ``split``: ``"train"`` or ``"test"`` — which task ids ``reset`` draws from.
    - ``masked_action``: ``"error"`` (default) or ``"remap"``.
    - ``history_window``: steps of history shown in the prompt (default 4).
    - ``taxonomy``: optional ``{task_id: "easy" | "hard" | "intractable"}`` for ``info``.
    - ``prompt_cache``: model each tier's prompt cache (default off). While consecutive
      steps stay on one tier, the part of the agent's prompt the previous call shared with
      this one (system prompt, task and the history before it:
      ``World.prompt_prefix_tokens``) is billed at the tier's ``usd_per_1m_cached_input``;
      a switch loses the cache (the new tier has not seen the prefix), so the next call
      pays full input price. The budget mask still assumes no cache (a worst case).

    ## Example
    >>> import gymnasium as gym, envs
    >>> env = gym.make("rlrouter/Synthetic-v0", budget={"large_calls": 3}, cost_lambda=2.0)
    >>> obs, info = env.reset(seed=0)
    >>> info["action_mask"].tolist()
    [1, 1]
    >>> obs, reward, terminated, truncated, info = env.step(1)
    >>> info["calls"]["large"]
    1
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4}
    owns_world = False  # set by make_routing_env: close() then closes the world too

    def __init__(
        self,
        world: World,
        pool: Pool | None = None,
        budget: Budget | dict | None = None,
        cost_lambda: float = 0.0,
        success_reward: float = 1.0,
        split: str = "train",
        masked_action: str = "error",
        history_window: int = 4,
        taxonomy: dict[str, str] | None = None,
        render_mode: str | None = None,
        prompt_cache: bool = False,
    ):
        self.world = world
        self.pool = pool or world.pool
        if [t.name for t in self.pool.tiers] != [t.name for t in world.pool.tiers]:
            raise ValueError(f"env pool {self.pool.names} differs from the world's pool {world.pool.names}")
        self.budget = budget if isinstance(budget, Budget) else Budget.from_dict(budget)
        self.budget.check_tiers(self.pool)
        if masked_action not in ("error", "remap"):
            raise ValueError(f"masked_action must be 'error' or 'remap', got {masked_action!r}")
        if render_mode not in (None, "ansi"):
            raise ValueError(f"render_mode must be None or 'ansi', got {render_mode!r}")
        self.cost_lambda = float(cost_lambda)
        self.success_reward = float(success_reward)
        self.split = split
        self.masked_action = masked_action
        self.history_window = int(history_window)
        self.taxonomy = dict(taxonomy or {})
        self.render_mode = render_mode
        self.prompt_cache = bool(prompt_cache)
        if self.prompt_cache and not world.models_prompt_prefix:
            raise ValueError(f"prompt_cache: the {world.name!r} world's calls share no prompt prefix (each query "
                             "is its own prompt), so there is nothing to cache; leave env.prompt_cache off")
        self._cache: tuple[str, int] | None = None  # (tier holding the prefix, its tokens)
        self.task_ids = world.task_ids(split)

        n = len(self.pool)
        self.n_features = 4 + 2 * n + HISTORY_OUTCOMES
        self.action_space = spaces.Discrete(n)
        self.observation_space = spaces.Dict(
            {
                "prompt": spaces.Text(max_length=PROMPT_MAX_CHARS, min_length=0, charset=world.charset()),
                "features": spaces.Box(low=-1.0, high=FEATURE_MAX, shape=(self.n_features,), dtype=np.float32),
            }
        )
        self._state = None

    # -- gymnasium API ---------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        options = dict(options or {})
        unknown = set(options) - {"task_id", "budget"}
        if unknown:
            raise ValueError(f"reset options {sorted(unknown)} are unknown; use task_id and/or budget")
        if "budget" in options:
            budget = options["budget"]
            self.budget = budget if isinstance(budget, Budget) else Budget.from_dict(budget, where="options.budget")
            self.budget.check_tiers(self.pool)
        task_id = options.get("task_id")
        if task_id is None:
            task_id = self.task_ids[int(self.np_random.integers(len(self.task_ids)))]
        episode_seed = int(self.np_random.integers(2**31 - 1))
        self.task_id = task_id
        if self._state is not None:
            self.world.release(self._state)
        self._state = None
        self._state = self.world.reset(task_id, episode_seed)
        self.ledger = CostLedger(self.pool)
        self._cache = None
        self.history: list[tuple[str, str, str]] = []  # (tier, event, observation)
        self.success = False
        self.finished = False
        self.budget_exhausted = False
        self._mask = self._compute_mask()
        return self._observation(), self._info(step=None)

    def step(self, action):
        if self._state is None:
            raise RuntimeError("call reset() before step()")
        if self.finished:
            raise RuntimeError("the episode is over; call reset()")
        action = int(action)
        if not 0 <= action < len(self.pool):
            raise ValueError(f"action {action} is not a tier index; the pool has {self.pool.names}")
        if not self._mask.any():
            # The budget cannot pay even for the first step: no call is made.
            self.finished = self.budget_exhausted = True
            return self._observation(), 0.0, False, True, self._info(step=None)
        if not self._mask[action]:
            if self.masked_action == "error":
                allowed = [self.pool.tiers[i].name for i in np.flatnonzero(self._mask)]
                raise ValueError(
                    f"tier {self.pool.tiers[action].name!r} is masked by budget {self.budget.label} "
                    f"(allowed now: {allowed}); respect info['action_mask'] or pass masked_action='remap'"
                )
            action = nearest_allowed(action, self._mask)
        tier = self.pool.tiers[action]
        prefix = self.world.prompt_prefix_tokens(self._state) if self.prompt_cache else 0
        result = self.world.step(self._state, tier)
        if result.cost_usd is None:
            cached = self._cached_tokens(tier.name, result.input_tokens, prefix)
            step_cost = self.ledger.charge(tier, result.input_tokens, result.output_tokens, cached)
        else:
            cached = 0
            step_cost = self.ledger.charge_recorded(tier, result.input_tokens, result.output_tokens, result.cost_usd)
        self.history.append((tier.name, result.event, result.observation))
        self.success = result.success
        self._last_cached = cached

        reward = -self.cost_lambda * step_cost
        terminated = result.done
        truncated = result.step_limit_reached
        if terminated and result.success:
            reward += self.success_reward
        self._mask = self._compute_mask()
        if not terminated and not truncated and not self._mask.any():
            truncated = self.budget_exhausted = True
        self.finished = terminated or truncated
        info = self._info(step=(tier.name, step_cost, result))
        return self._observation(), float(reward), terminated, truncated, info

    def _cached_tokens(self, tier: str, input_tokens: int, prefix: int) -> int:
        """Prompt tokens of this call served from ``tier``'s cache: the prefix the previous
        call left there when it was on the same tier; then this call's prefix is cached."""
        if not self.prompt_cache:
            return 0
        cached = min(self._cache[1], input_tokens) if self._cache is not None and self._cache[0] == tier else 0
        self._cache = (tier, prefix)
        return cached

    def close(self):
        """Give the episode's game session back to the world (text-game worlds), and close
        the world when this env built it (``gymnasium.make``)."""
        if self._state is not None:
            self.world.release(self._state)
        if self.owns_world:
            self.world.close()
        super().close()

    def render(self):
        if self.render_mode == "ansi":
            return self._prompt()
        return None

    # -- what the router sees ----------------------------------------------------------
    def _compute_mask(self) -> np.ndarray:
        if self.world_done:
            return np.zeros(len(self.pool), dtype=np.int8)
        worst = [self.world.worst_case_cost_usd(self._state, tier) for tier in self.pool.tiers]
        return route_mask(self.budget, self.ledger, worst)

    @property
    def world_done(self) -> bool:
        return bool(getattr(self._state, "done", False))

    def view(self) -> dict:
        """Structured router-visible state (the router prompt format is built from this)."""
        v = self.world.router_view(self._state)
        return {
            "task_id": self.task_id,
            "task": v.task,
            "step_text": v.step_text,
            "step_index": v.step_index,
            "position": v.position,
            "length": v.length,
            "max_steps": v.max_steps,
            "cost_usd": self.ledger.cost_usd,
            "budget": self.budget.to_dict(),
            "usd_left": None if self.budget.usd is None else usd_left(self.budget, self.ledger),
            "calls": {name: self.ledger.calls.get(name, 0) for name in self.pool.names},
            "calls_left": {
                name: cap - self.ledger.calls.get(name, 0) for name, cap in self.budget.max_calls.items()
            },
            "history": [{"tier": t, "event": e, "observation": o} for t, e, o in self.history],
            "history_window": self.history_window,
            "action_mask": self._mask.tolist(),
        }

    def _prompt(self) -> str:
        v = self.world.router_view(self._state)
        lines = ["Pool (USD per 1M input/output tokens):"]
        for tier in self.pool.tiers:
            cached = "" if tier.usd_per_1m_cached_input is None else f" (cached input ${tier.usd_per_1m_cached_input:.2f})"
            lines.append(f"- {tier.name}: ${tier.usd_per_1m_input:.2f}/${tier.usd_per_1m_output:.2f}{cached}. "
                         f"{tier.descriptor}")
        budget = [f"spent ${self.ledger.cost_usd:.4f}"]
        if self.budget.usd is not None:
            budget.append(f"${usd_left(self.budget, self.ledger):.4f} left of ${self.budget.usd:.4f}")
        for name, cap in sorted(self.budget.max_calls.items()):
            budget.append(f"{name} calls left {cap - self.ledger.calls.get(name, 0)} of {cap}")
        lines.append("Budget: " + "; ".join(budget) + ".")
        lines.append(f"Task: {v.task}")
        shown = self.history[-self.history_window:] if self.history_window > 0 else []
        if shown:
            lines.append(f"History (last {len(shown)} of {len(self.history)} steps):")
            first = len(self.history) - len(shown) + 1
            for i, (tier, event, observation) in enumerate(shown, start=first):
                lines.append(f"{i}. [{tier}] {event}: {observation}")
        if self.world_done:
            lines.append("Episode over: " + ("solved." if self.success else "failed."))
        else:
            lines.append(f"Step {v.step_index + 1} (limit {v.max_steps}), {v.position}/{v.length} done. Next: {v.step_text}")
        return "\n".join(lines)[:PROMPT_MAX_CHARS]

    def _features(self) -> np.ndarray:
        v = self.world.router_view(self._state)
        f = [
            v.step_index / max(1, v.max_steps),
            v.position / max(1, v.length),
            self.ledger.cost_usd,
            -1.0 if self.budget.usd is None else usd_left(self.budget, self.ledger),
        ]
        for name in self.pool.names:
            calls = self.ledger.calls.get(name, 0)
            cap = self.budget.max_calls.get(name)
            f += [calls, -1.0 if cap is None else cap - calls]
        recent = [1.0 if e == "ok" else -1.0 for _, e, _ in self.history[-HISTORY_OUTCOMES:]]
        f += [0.0] * (HISTORY_OUTCOMES - len(recent)) + recent
        return np.asarray(f, dtype=np.float32)

    def _observation(self) -> dict:
        return {"prompt": self._prompt(), "features": self._features()}

    def _info(self, step) -> dict:
        info = {
            "task_id": self.task_id,
            "action_mask": self._mask.copy(),
            "cost_usd": self.ledger.cost_usd,
            "calls": {name: self.ledger.calls.get(name, 0) for name in self.pool.names},
            "success": self.success,
            "budget_exhausted": self.budget_exhausted,
        }
        if self.task_id in self.taxonomy:
            info["taxonomy"] = self.taxonomy[self.task_id]
        if step is not None:
            tier, step_cost, result = step
            info.update(
                tier=tier,
                step_cost_usd=step_cost,
                input_tokens=result.input_tokens,
                output_tokens=result.output_tokens,
                cached_tokens=self._last_cached,
                event=result.event,
                step_ok=bool(result.step_ok),
                progress=result.progress,
            )
            if result.executor_event is not None:  # for analysis; routers never see it
                info["executor_event"] = result.executor_event
        return info

    # -- search support (hindsight oracle, hindsight labels) -----------------------
    def redraw(self, salt: int) -> bool:
        """Let the next step draw its random numbers as its ``salt``-th redraw (0: the
        episode's own); False where the world has none to redraw (``World.redraw``)."""
        if self._state is None:
            raise RuntimeError("call reset() before redraw()")
        return self.world.redraw(self._state, salt)

    def snapshot(self) -> Any:
        """Copy of the episode's mutable state; ``restore`` puts it back."""
        return (self.world.copy_state(self._state), self.ledger.copy(), list(self.history), self.success,
                self.finished, self.budget_exhausted, self._mask.copy(), self._cache)

    def restore(self, snapshot: Any) -> None:
        state, ledger, history, self.success, self.finished, self.budget_exhausted, mask, self._cache = snapshot
        self._state = self.world.copy_state(state)
        self.ledger = ledger.copy()
        self.history = list(history)
        self._mask = mask.copy()

    def cost_to_go_lower_bound(self) -> float:
        """Admissible lower bound on the dollars any route still has to pay to succeed. With
        the prompt cache, every input token may be a cached one: the world's bound (at full
        prices) scaled by the smallest cached/full input price ratio stays below any route's
        cost, since each call's cost is at least that ratio times its full-price cost."""
        bound = self.world.cost_to_go_lower_bound(self._state)
        if not self.prompt_cache:
            return bound
        ratio = min((t.cached_input_price / t.usd_per_1m_input if t.usd_per_1m_input else 1.0)
                    for t in self.pool.tiers)
        return bound * min(ratio, 1.0)

    def search_key(self) -> Any:
        key = self.world.search_key(self._state)
        if key is None:
            return None
        cache = self._cache if self.prompt_cache else None  # what the next call costs depends on it
        return key, tuple(sorted(self.ledger.calls.items())), cache

    @property
    def action_mask(self) -> np.ndarray:
        return self._mask.copy()


def nearest_allowed(action: int, mask: np.ndarray) -> int:
    """The allowed tier closest to ``action``, preferring cheaper ones."""
    for i in range(action - 1, -1, -1):
        if mask[i]:
            return i
    for i in range(action + 1, len(mask)):
        if mask[i]:
            return i
    raise ValueError("no tier is allowed by the mask")
