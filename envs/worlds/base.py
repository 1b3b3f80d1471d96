"""What every world provides to :class:`envs.routing.RoutingEnv`.

A world is a task family. It is stateless between episodes: ``reset`` returns a small
episode-state object that ``step`` mutates, so an environment can snapshot an episode by
copying that object (the hindsight oracle searches routes this way).

Separation of knowledge: ``router_view`` returns only what a router may see (task text,
the current step's text); hidden quantities (step difficulty, recorded correctness) stay
inside the state and are used only by the executors and the world's rules.
"""

from __future__ import annotations

import copy
import string
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from envs.openai_client import ChatCallError, ChatEndpoint
from envs.pool import Pool, Tier

# Characters any prompt may contain (the router prompt template itself uses these).
BASE_CHARSET = string.printable


@dataclass
class StepResult:
    """What one agent step, taken by one tier's model, did."""

    observation: str  # feedback the agent (and router) sees after the step
    input_tokens: int  # prompt tokens the executor consumed (exact)
    output_tokens: int  # completion tokens it produced (exact)
    step_ok: bool  # the executor's step was correct
    event: str  # "ok", "retry", "derail", "fatal", "wrong"
    progress: float  # fraction of the task done, in [0, 1]
    done: bool  # the task is over (success or unrecoverable failure)
    success: bool  # the task was solved (only meaningful when done)
    step_limit_reached: bool = False  # episode ran out of agent steps (truncation)
    cost_usd: float | None = None  # recorded dollar cost, where the data has one
    executor_event: str | None = None  # hidden truth of what the executor did, where it differs from `event`


@dataclass
class RouterView:
    """The router-visible part of the state before a step."""

    task: str  # task statement (possibly shortened)
    step_text: str  # what the agent is about to do / answer
    step_index: int  # agent steps taken so far
    position: int  # how far the task has progressed (sub-goals done)
    length: int  # number of sub-goals / queries in the task
    max_steps: int  # step limit


def config_from_dict(cls, data: dict, where: str, what: str):
    """Build a world-config dataclass; unknown fields are named with the allowed ones.
    YAML lists become tuples (the configs are frozen and hashable)."""
    known = set(cls.__dataclass_fields__)
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{where}: unknown {what} field(s) {sorted(unknown)}; allowed: {sorted(known)}")
    return cls(**{key: _tuplify(value) for key, value in data.items()})


def _tuplify(value):
    return tuple(_tuplify(v) for v in value) if isinstance(value, list) else value


def draw_key(*key: int, redraw: int = 0) -> list[int]:
    """The seed of a step's common random numbers: the step's key, and the salt of a
    ``World.redraw`` last where there is one (salt 0: the episode's own draws, key as is)."""
    return [*key, redraw] if redraw else list(key)


class World(ABC):
    """A task family the router routes agent steps in."""

    name: str = "world"

    def __init__(self, pool: Pool):
        self.pool = pool

    @abstractmethod
    def task_ids(self, split: str) -> list[str]:
        """Task ids of a split (``"train"`` or ``"test"``), deterministic."""

    @abstractmethod
    def reset(self, task_id: str, seed: int) -> Any:
        """Start an episode of ``task_id``; ``seed`` drives all the episode's randomness."""

    @abstractmethod
    def router_view(self, state: Any) -> RouterView:
        """What the router may see before the next step."""

    @abstractmethod
    def worst_case_tokens(self, state: Any, tier: Tier) -> tuple[int, int]:
        """Upper bounds (input, output) on the next call's tokens with ``tier``."""

    models_prompt_prefix: bool = False  # prompt_prefix_tokens is defined (RoutingEnv's prompt_cache)

    def prompt_prefix_tokens(self, state: Any) -> int:
        """Tokens at the head of the next call's prompt that the call after it starts with
        too (system prompt, task, history so far): what a tier's prompt cache would serve
        to that later call if it stays on the tier. Worlds whose calls share a prefix set
        ``models_prompt_prefix`` and define it."""
        raise NotImplementedError(f"the {self.name!r} world does not model a prompt prefix")

    def worst_case_cost_usd(self, state: Any, tier: Tier) -> float:
        """Upper bound on the next call's dollar cost (used by the budget mask)."""
        return tier.cost_usd(*self.worst_case_tokens(state, tier))

    @abstractmethod
    def step(self, state: Any, tier: Tier) -> StepResult:
        """Let ``tier``'s model take the next agent step."""

    def release(self, state: Any) -> None:
        """The episode of ``state`` is over: give back what it holds (a game session).
        RoutingEnv calls it before the next ``reset`` and on ``close``; default: nothing."""

    def close(self) -> None:
        """Free the world's resources (game processes); default: nothing."""

    def copy_state(self, state: Any) -> Any:
        """An independent copy of an episode state (for snapshots)."""
        return copy.deepcopy(state)

    def redraw(self, state: Any, salt: int) -> bool:
        """Make the next step of ``state`` draw its random numbers afresh, as its ``salt``-th
        redraw (0: the episode's own draws); the steps after it draw as before. Hindsight
        labels average a step over such redraws. False (and nothing changes) where a step
        has no randomness of the world's to redraw, as with recorded outcomes."""
        return False

    def cost_to_go_lower_bound(self, state: Any) -> float:
        """Lower bound on the cost of finishing the task successfully (0 if unknown)."""
        return 0.0

    def search_key(self, state: Any) -> Any:
        """Hashable summary of the state for route search; ``None`` disables merging."""
        return None

    def charset(self) -> str:
        """Every character the world's texts may contain (for gymnasium's Text space)."""
        return BASE_CHARSET

    def executor_config(self, tier: Tier, defaults: dict[str, dict]) -> dict:
        """The tier's executor settings, falling back to per-name defaults of the same kind."""
        config = dict(defaults.get(tier.name, {}))
        own = dict(tier.executor or {})
        if own.get("kind", config.get("kind")) != config.get("kind"):
            config = {}  # another kind of executor: the defaults' fields do not apply
        config.update(own)
        return config


class EndpointRoundTrip:
    """One real HTTP call per executor step to an OpenAI-compatible ``/chat/completions``
    endpoint, made by a *simulated* executor whose outcome stays simulated: it gives the
    episode the latency (and the endpoint the load) of a real executor. Set per tier with
    ``executor: {kind: simulated, ..., endpoint: http://127.0.0.1:8001/v1, model: m}``;
    the benchmarks use it with ``rlrouter.serve.local_pool`` and a fixed delay."""

    def __init__(self, tier: str, endpoint: str, model: str | None = None, api_key_env: str | None = None,
                 timeout_s: float = 30.0):
        try:
            self.endpoint = ChatEndpoint(endpoint, model or tier, api_key_env, timeout_s, max_retries=0)
        except ValueError:
            raise ValueError(f"pool tier {tier!r}: executor.endpoint must be an http(s) URL, "
                             f"got {endpoint!r}") from None
        self.tier = tier
        self.url = self.endpoint.url

    def __call__(self, prompt: str, max_tokens: int) -> None:
        try:
            self.endpoint.complete([{"role": "user", "content": prompt}], max_tokens)
        except ChatCallError as err:
            raise RuntimeError(f"pool tier {self.tier!r}: executor endpoint {self.url} failed "
                               f"({err.attempts[-1].error}); is the server running?") from None
