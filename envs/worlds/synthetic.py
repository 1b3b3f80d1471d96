"""Synthetic world: procedurally generated multi-step tasks, fast and pure Python.

Each task is a sequence of sub-goals (4-30). Most sub-goals are routine; some are
*critical* and hard. A task's archetype (easy / medium / hard) sets how many critical
steps it has and how hard they are, which is what makes some tasks easy for the small
model, some solvable only by the large one, and some intractable for both.

The text of each step carries a cue phrase that matches its difficulty bucket with
probability ``cue_fidelity`` (else a random bucket's phrase), so a text router can learn
which steps need the large model, but not perfectly. (A medium or hard task that drew no
critical step gets one, and its cue always reads hard, even at a moderate difficulty.)

Executors are simulated per tier: a step is correct with probability
``sigmoid(sharpness * (skill - difficulty_eff))``. A wrong step is *fatal* (episode
fails), *derails* the task (every later step gets ``derail_penalty`` harder), or is simply
*retried*. Every attempt uses one agent step; the episode is truncated at the step limit
``length + max(min_slack, slack_fraction * length)``.

An executor may also name an OpenAI-compatible ``endpoint`` (and ``model``): each step then
makes a real HTTP call there and waits for the reply, whose content is not used — the
outcome stays simulated, the latency is real (``EndpointRoundTrip``; the Ray scaling
benchmark uses it with the local pool server).

Randomness uses common random numbers: the uniform draw that decides a step's correctness
is keyed by ``(episode seed, position, attempt)`` and shared by all tiers, so a stronger
tier succeeds whenever a weaker one would, and replaying a route from the same seed gives
the same episode (the hindsight oracle relies on this).

Agent prompts grow with the history as in a real agent: system prompt + task + every
earlier action and observation. Output tokens are drawn per tier (log-normal around
``output_tokens_mean``) and capped at ``max_output_tokens``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from envs.pool import Pool, Tier
from envs.tokens import count_tokens
from envs.worlds.base import EndpointRoundTrip, RouterView, StepResult, World, config_from_dict, draw_key

THEMES = [
    ("Data pipeline", ["the sensor log", "the ingestion job", "the nightly export", "the event stream"]),
    ("Web service fix", ["the billing service", "the login handler", "the payment webhook", "the cache layer"]),
    ("Spreadsheet report", ["the quarterly sheet", "the budget workbook", "the sales pivot", "the expense table"]),
    ("Research summary", ["the survey notes", "the experiment results", "the citation list", "the lab protocol"]),
    ("Home automation", ["the thermostat rules", "the door sensor", "the lighting scene", "the backup schedule"]),
]

# Cue phrases per difficulty bucket (0 routine, 1 moderate, 2 hard).
CUES = [
    ["list the files of", "open", "print the header of", "copy the template for", "rename a field in",
     "read the settings of", "format the dates in", "check the status of"],
    ["parse the nested records of", "merge the two versions of", "write a unit test for", "refactor the loop in",
     "update the schema of", "filter the outliers in", "validate the inputs of", "add logging to"],
    ["debug the intermittent failure in", "prove the invariant of", "reconcile conflicting entries in",
     "optimize the slow query on", "resolve the race condition in", "derive the closed form for",
     "recover the corrupted state of", "untangle the circular dependency in"],
]

ARCHETYPES = ("easy", "medium", "hard")


def difficulty_bucket(difficulty: float) -> int:
    """The cue bucket a step's difficulty belongs to: 0 routine, 1 moderate, 2 hard."""
    return 0 if difficulty < 0.4 else (1 if difficulty < 0.7 else 2)


_BUCKET_OF_CUE = {cue: bucket for bucket, cues in enumerate(CUES) for cue in cues}


def cue_bucket(step_text: str) -> int:
    """The bucket a step's cue phrase names (what a router can read; it is the step's true
    bucket with probability ``cue_fidelity``)."""
    for cue, bucket in _BUCKET_OF_CUE.items():
        if step_text.startswith(cue + " "):
            return bucket
    raise ValueError(f"step text {step_text!r} starts with no cue phrase of the synthetic world")


# Skill profiles of the simulated executors, by tier name.
DEFAULT_EXECUTORS = {
    "small": {"kind": "simulated", "skill": 0.55, "output_tokens_mean": 120},
    "large": {"kind": "simulated", "skill": 0.88, "output_tokens_mean": 180},
}


@dataclass(frozen=True)
class SyntheticConfig:
    """Knobs of the synthetic world (recipe ``world:`` section).

    Attributes:
        seed: world seed; with the task id it fixes every task's content.
        n_train / n_test: number of tasks per split.
        min_length / max_length: sub-goals per task.
        archetype_probs: probability of easy / medium / hard tasks.
        critical_rate: per archetype, probability that a sub-goal is critical.
        critical_difficulty: per archetype, (low, high) of a critical step's difficulty.
        routine_difficulty: (low, high) of a routine step's difficulty.
        cue_fidelity: probability that a step's cue phrase matches its difficulty.
        sharpness: slope of the executors' success curve.
        p_fatal / p_derail: fate of a wrong step (else it is retried).
        derail_penalty: difficulty added to every later step per derailment.
        min_slack / slack_fraction: step limit = length + max(min_slack, slack_fraction*length).
        system_tokens: agent system-prompt size in tokens.
        max_output_tokens: executors' completion cap (bounds a step's cost).
    """

    seed: int = 0
    n_train: int = 400
    n_test: int = 200
    min_length: int = 4
    max_length: int = 30
    archetype_probs: tuple[float, float, float] = (0.42, 0.36, 0.22)
    critical_rate: tuple[float, float, float] = (0.0, 0.25, 0.45)
    critical_difficulty: tuple[tuple[float, float], ...] = ((0.5, 0.6), (0.6, 0.8), (0.85, 1.0))
    routine_difficulty: tuple[float, float] = (0.05, 0.35)
    cue_fidelity: float = 0.8
    sharpness: float = 12.0
    p_fatal: float = 0.15
    p_derail: float = 0.25
    derail_penalty: float = 0.08
    min_slack: int = 2
    slack_fraction: float = 0.25
    system_tokens: int = 350
    max_output_tokens: int = 512

    @classmethod
    def from_dict(cls, data: dict, where: str = "world") -> "SyntheticConfig":
        config = config_from_dict(cls, data, where, "synthetic-world")
        if not 1 <= config.min_length <= config.max_length:
            raise ValueError(f"{where}: need 1 <= min_length <= max_length, got {config.min_length}, {config.max_length}")
        if abs(sum(config.archetype_probs) - 1.0) > 1e-6:
            raise ValueError(f"{where}.archetype_probs must sum to 1, got {config.archetype_probs}")
        return config


@dataclass(frozen=True)
class SyntheticTask:
    task_id: str
    archetype: str
    title: str
    obj: str
    difficulties: tuple[float, ...]
    step_texts: tuple[str, ...]

    @property
    def length(self) -> int:
        return len(self.difficulties)

    @property
    def text(self) -> str:
        return f"{self.title}: complete {self.length} steps on {self.obj}."


@dataclass
class SyntheticState:
    task: SyntheticTask
    seed: int
    max_steps: int
    task_tokens: int
    position: int = 0
    attempt: int = 0
    derail: int = 0
    steps_taken: int = 0
    history_tokens: int = 0
    done: bool = False
    success: bool = False
    events: list[str] = field(default_factory=list)
    redraw: int = 0  # > 0: the next step draws its random numbers afresh (World.redraw)


class SyntheticWorld(World):
    """Procedural multi-step tasks with simulated tier executors (``rlrouter/Synthetic-v0``).

    ## Description
    A task is 4–30 sub-goals, most routine, some critical and hard; its archetype (easy /
    medium / hard) sets how many are critical and how hard. Each step's text carries a cue
    phrase naming its difficulty bucket with probability ``cue_fidelity`` (module docstring).

    ## Action Space
    Through ``RoutingEnv``: ``Discrete(n_tiers)``, the tier that takes the next sub-goal.

    ## Observation Space
    ``router_view``: the task text, the next sub-goal's text (with its cue), position and
    step limit; ``RoutingEnv`` adds budget, cost and history.

    ## Rewards
    ``StepResult.success`` when the last sub-goal is done; ``RoutingEnv`` turns it into reward.

    ## Starting State
    ``reset(task_id, seed)``: the task is a pure function of ``(world seed, task_id)``; the
    episode seed keys every correctness draw (common random numbers across tiers).

    ## Episode End
    Termination: all sub-goals done, or a fatal wrong step. Truncation: the step limit
    ``length + max(min_slack, slack_fraction · length)``.

    ## Arguments
    ``SyntheticConfig`` (recipe ``world:`` with ``kind: synthetic``): ``n_train`` / ``n_test``,
    length range, archetype mix, ``cue_fidelity``, ``sharpness``, error kinds, token sizes.
    Tiers need ``executor: {kind: simulated, skill, output_tokens_mean}`` (optionally
    ``endpoint`` / ``model`` for a real round trip per step).

    ## Example
    >>> import gymnasium as gym, envs
    >>> env = gym.make("rlrouter/Synthetic-v0", world={"n_train": 10, "n_test": 5})
    >>> _ = env.reset(seed=0, options={"task_id": "train-3"})
    >>> env.unwrapped.world.name
    'synthetic'
    """

    name = "synthetic"

    def __init__(self, pool: Pool, config: SyntheticConfig | None = None):
        super().__init__(pool)
        self.config = config or SyntheticConfig()
        self.executors = {}
        self.round_trips: dict[str, EndpointRoundTrip] = {}
        for tier in pool.tiers:
            spec = self.executor_config(tier, DEFAULT_EXECUTORS)
            if spec.get("kind", "simulated") != "simulated" or "skill" not in spec:
                raise ValueError(
                    f"pool tier {tier.name!r}: the synthetic world needs a simulated executor, e.g. "
                    "executor: {kind: simulated, skill: 0.7, output_tokens_mean: 150}"
                )
            self.executors[tier.name] = (float(spec["skill"]), float(spec.get("output_tokens_mean", 150)))
            if spec.get("endpoint"):  # simulated outcome, real network round trip per step
                self.round_trips[tier.name] = EndpointRoundTrip(tier.name, spec["endpoint"], spec.get("model"),
                                                                spec.get("api_key_env"))
        self._tasks: dict[str, SyntheticTask] = {}

    # -- tasks -----------------------------------------------------------------------
    def task_ids(self, split: str) -> list[str]:
        n = {"train": self.config.n_train, "test": self.config.n_test}.get(split)
        if n is None:
            raise ValueError(f"unknown split {split!r}; the synthetic world has 'train' and 'test'")
        return [f"{split}-{i}" for i in range(n)]

    def task(self, task_id: str) -> SyntheticTask:
        if task_id not in self._tasks:
            self._tasks[task_id] = self._generate(task_id)
        return self._tasks[task_id]

    def _generate(self, task_id: str) -> SyntheticTask:
        split, _, index = task_id.partition("-")
        if split not in ("train", "test") or not index.isdigit():
            raise ValueError(f"task id {task_id!r} is not of the form train-N or test-N")
        c = self.config
        rng = np.random.default_rng([c.seed, 0 if split == "train" else 1, int(index)])
        arch = int(rng.choice(3, p=c.archetype_probs))
        length = int(rng.integers(c.min_length, c.max_length + 1))
        title, objects = THEMES[int(rng.integers(len(THEMES)))]
        obj = objects[int(rng.integers(len(objects)))]
        difficulties, texts = [], []
        for _ in range(length):
            if rng.random() < c.critical_rate[arch]:
                d = float(rng.uniform(*c.critical_difficulty[arch]))
            else:
                d = float(rng.uniform(*c.routine_difficulty))
            bucket = difficulty_bucket(d)
            if rng.random() >= c.cue_fidelity:
                bucket = int(rng.integers(3))
            cue = CUES[bucket][int(rng.integers(len(CUES[bucket])))]
            difficulties.append(round(d, 4))
            texts.append(f"{cue} {obj}")
        # Every medium/hard task has at least one critical step.
        if arch > 0 and max(difficulties) < c.critical_difficulty[arch][0]:
            k = int(rng.integers(length))
            difficulties[k] = round(float(rng.uniform(*c.critical_difficulty[arch])), 4)
            texts[k] = f"{CUES[2][int(rng.integers(len(CUES[2])))]} {obj}"
        return SyntheticTask(task_id, ARCHETYPES[arch], title, obj, tuple(difficulties), tuple(texts))

    # -- episodes --------------------------------------------------------------------
    def reset(self, task_id: str, seed: int) -> SyntheticState:
        task = self.task(task_id)
        c = self.config
        max_steps = task.length + max(c.min_slack, int(math.ceil(c.slack_fraction * task.length)))
        return SyntheticState(task=task, seed=int(seed), max_steps=max_steps, task_tokens=count_tokens(task.text))

    def router_view(self, state: SyntheticState) -> RouterView:
        task = state.task
        step_text = task.step_texts[min(state.position, task.length - 1)]
        return RouterView(task.text, step_text, state.steps_taken, state.position, task.length, state.max_steps)

    def _prompt_tokens(self, state: SyntheticState) -> int:
        step_tokens = count_tokens(state.task.step_texts[min(state.position, state.task.length - 1)])
        return self.config.system_tokens + state.task_tokens + state.history_tokens + step_tokens

    def worst_case_tokens(self, state: SyntheticState, tier: Tier) -> tuple[int, int]:
        return self._prompt_tokens(state), self.config.max_output_tokens

    models_prompt_prefix = True

    def prompt_prefix_tokens(self, state: SyntheticState) -> int:
        # the prompt is system + task + history + the current step's text; the next prompt
        # appends this step's output and observation to the history, so all but the step
        # text is its prefix
        return self.config.system_tokens + state.task_tokens + state.history_tokens

    def _rng(self, state: SyntheticState, *stream: int) -> np.random.Generator:
        return np.random.default_rng(draw_key(state.seed, state.position, state.attempt, *stream,
                                              redraw=state.redraw))

    def redraw(self, state: SyntheticState, salt: int) -> bool:
        state.redraw = int(salt)
        return True

    def success_probability(self, state: SyntheticState, tier_name: str) -> float:
        """P(correct step) for ``tier_name`` at the current sub-goal (hidden from routers)."""
        skill, _ = self.executors[tier_name]
        d_eff = state.task.difficulties[state.position] + self.config.derail_penalty * state.derail
        return 1.0 / (1.0 + math.exp(-self.config.sharpness * (skill - d_eff)))

    def step(self, state: SyntheticState, tier: Tier) -> StepResult:
        if state.done:
            raise RuntimeError("step() called on a finished episode; reset first")
        c = self.config
        task = state.task
        input_tokens = self._prompt_tokens(state)
        _, out_mean = self.executors[tier.name]
        token_rng = self._rng(state, 2, self.pool.index(tier.name))
        output_tokens = int(np.clip(round(out_mean * token_rng.lognormal(0.0, 0.35)), 16, c.max_output_tokens))
        if tier.name in self.round_trips:
            self.round_trips[tier.name](task.step_texts[state.position], output_tokens)

        # Common random numbers: one uniform per (position, attempt), shared by all tiers.
        u_correct, u_fate = self._rng(state, 1).random(2)
        ok = bool(u_correct < self.success_probability(state, tier.name))
        step_text = task.step_texts[state.position]
        state.steps_taken += 1
        state.redraw = 0
        if ok:
            state.position += 1
            state.attempt = 0
            event = "ok"
            observation = f"done: {step_text}."
        else:
            state.attempt += 1
            if u_fate < c.p_fatal:
                event = "fatal"
                observation = f"fatal error: {task.obj} is now unusable; the task cannot be completed."
            elif u_fate < c.p_fatal + c.p_derail:
                event = "derail"
                state.derail += 1
                observation = f"error: the attempt to {step_text} left {task.obj} in a worse state."
            else:
                event = "retry"
                observation = f"failed: could not {step_text}; try again."
        state.events.append(event)
        state.history_tokens += output_tokens + count_tokens(observation)

        solved = state.position == task.length
        state.done = solved or event == "fatal"
        state.success = solved
        limit = not state.done and state.steps_taken >= state.max_steps
        return StepResult(
            observation=observation,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            step_ok=ok,
            event=event,
            progress=state.position / task.length,
            done=state.done,
            success=state.success,
            step_limit_reached=limit,
        )

    def cost_to_go_lower_bound(self, state: SyntheticState) -> float:
        # Each sub-goal left needs >= 1 call, whose prompt holds at least the system prompt,
        # the task and the history so far (history only grows), and outputs are >= 16 tokens.
        left = state.task.length - state.position
        context = self.config.system_tokens + state.task_tokens + state.history_tokens
        return left * self.pool.cheapest.cost_usd(context, 16)

    def copy_state(self, state: SyntheticState) -> SyntheticState:
        return replace(state, events=list(state.events))  # the task itself is immutable and shared

    def search_key(self, state: SyntheticState):
        return (state.position, state.attempt, state.derail, state.steps_taken)
