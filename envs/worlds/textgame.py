"""Shared machinery of the worlds that wrap a real text game (ScienceWorld, TextWorld).

A text game is played by an agent that writes one command per step. The game itself is
real (a JVM for ScienceWorld, a Z-machine for TextWorld); what differs between tiers is the
*executor*, the model that writes the command:

- **Simulated executor** (default, CPU): at every step the game's gold command is known
  (ScienceWorld's gold path, TextWorld's walkthrough recomputed from the current state). A
  tier writes it with probability ``sigmoid(sharpness * (skill - difficulty))``, where the
  step's difficulty comes from the gold command's verb (``look``/``go`` are easy, ``take``
  is moderate, ``focus``/``mix``/``unlock`` are hard) plus ``admissible_slope`` per decade
  of admissible commands (more choices, more ways to go wrong). Otherwise it writes a wrong
  command: with probability ``p_consequential`` a random *admissible* command other than
  the gold one, which the game executes with its real consequences (walking away, picking
  the wrong thing up, focusing on the wrong object ends a ScienceWorld task), else a
  harmless look-around that only wastes the step. Draws use common random numbers keyed
  by ``(episode seed, agent step)``, so a stronger tier writes the gold command whenever a
  weaker one would and a seeded episode replays exactly.
- **OpenAI-compatible executor** (``executor: {kind: openai, endpoint, model,
  api_key_env}``; :mod:`envs.executors`): a real LLM writes the command from a ReAct
  prompt; tokens and cost come from the reply's ``usage``.

What routers see of a step is what an agent framework would: the command was played
(event ``ok``), was no command at all (``invalid``), or lost the game (``fatal``), plus the
game's answer and score (progress in percent). Whether the command was the right one is
the hidden truth: ``info["executor_event"]`` says ``gold``, ``wrong``, ``look`` or
``invalid`` for analysis, and routers, prompts and baselines never read it (the
``escalate`` baseline thus escalates only after invalid or fatal steps here).

Tokens of a simulated step: the agent's prompt (system prompt + task + the last
``history_steps`` commands and observations + the current observation) counted with
:func:`envs.tokens.count_tokens`, and an output drawn log-normal around the tier's
``output_tokens_mean``. Game sessions are expensive (a JVM each), so the world leases one
to an episode at ``reset`` and takes it back at ``release`` (RoutingEnv calls it when the
next episode starts and on ``close``); idle sessions are reused, and ``close`` ends them all.
Episode states hold a live game, so they cannot be copied: the hindsight oracle, which
searches over copies, is not available in these worlds.
"""

from __future__ import annotations

import atexit
import math
import re
import string
import threading
import weakref
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from envs.executors import ExecutorError, build_executor
from envs.pool import Pool, Tier
from envs.tokens import count_tokens
from envs.worlds.base import RouterView, StepResult, World, config_from_dict, draw_key

PRINTABLE = set(string.printable)

# Difficulty of a step by the gold command's first word; others get ``default_difficulty``.
VERB_DIFFICULTY = {
    **dict.fromkeys(("look", "go", "open", "close", "inventory", "examine", "wait", "wait1", "read",
                     "teleport"), 0.10),
    **dict.fromkeys(("take", "pick", "drop", "put", "move", "insert", "eat", "activate", "deactivate",
                     "flush"), 0.35),
    **dict.fromkeys(("focus", "use", "mix", "pour", "connect", "disconnect", "unlock", "lock", "cook",
                     "slice", "chop", "dice", "plug", "dunk"), 0.60),
}

DEFAULT_TEXT_EXECUTORS = {
    "small": {"kind": "simulated", "skill": 0.50, "output_tokens_mean": 60},
    "large": {"kind": "simulated", "skill": 0.85, "output_tokens_mean": 90},
}


def clean_text(text: str, limit: int | None = None) -> str:
    """Printable ASCII with runs of whitespace collapsed (router prompts use that charset)."""
    text = "".join(ch if ch in PRINTABLE else " " for ch in str(text))
    text = re.sub(r"\s+", " ", text).strip()
    return text if limit is None or len(text) <= limit else text[: limit - 3].rstrip() + "..."


@dataclass(frozen=True)
class TextGameSettings:
    """The ``world:`` fields every text-game world has.

    Attributes:
        max_steps: agent steps per episode.
        max_sessions: live game sessions at most (episodes played at once); one more is a
            clear error instead of a machine out of memory.
        history_steps / system_tokens / observation_chars / max_output_tokens: the agent
            prompt's shape (recent commands kept, system-prompt size, observation characters
            shown to the router) and the executors' completion cap.
        sharpness / default_difficulty / verb_difficulty / admissible_slope /
        p_consequential: the simulated executors (module docstring).
    """

    max_steps: int = 40
    max_sessions: int = 64
    history_steps: int = 8
    system_tokens: int = 300
    observation_chars: int = 240
    max_output_tokens: int = 256
    sharpness: float = 12.0
    default_difficulty: float = 0.35
    verb_difficulty: dict | None = None
    admissible_slope: float = 0.05
    p_consequential: float = 0.3

    @classmethod
    def parse(cls, data: dict, where: str, what: str):
        """The config from a recipe mapping; errors name ``where.<field>``."""
        data = dict(data)
        verbs = data.pop("verb_difficulty", None)
        if verbs is not None and not isinstance(verbs, dict):
            raise ValueError(f"{where}.verb_difficulty must map verbs to difficulties, e.g. {{unlock: 0.6}}")
        config = config_from_dict(cls, data, where, what)
        object.__setattr__(config, "verb_difficulty", {str(k): float(v) for k, v in (verbs or {}).items()})
        if config.max_steps < 1 or config.history_steps < 0 or not 0 <= config.p_consequential <= 1:
            raise ValueError(f"{where}: need max_steps >= 1, history_steps >= 0 and 0 <= p_consequential <= 1")
        return config


@dataclass
class GameObservation:
    """What the game answered to a command (or at the start). ``admissible`` may be given as a
    function of the game's current state, called once on first use (ScienceWorld's list costs
    30 ms and is needed only for a wrong command); it is read only while this is the episode's
    current observation."""

    text: str
    score: float  # progress in [0, 1]
    done: bool
    won: bool
    admissible_source: list[str] | Callable[[], list[str]]
    plan: list[str] | None = None  # gold commands from here, where the game recomputes them

    @property
    def admissible(self) -> list[str]:
        if callable(self.admissible_source):
            self.admissible_source = list(self.admissible_source())
        return self.admissible_source


@dataclass
class TextGameState:
    task_id: str
    seed: int
    max_steps: int
    task_text: str
    session: object  # the leased game session (not copyable)
    plan: list[str]  # gold commands from the current position
    observation: GameObservation
    steps_taken: int = 0
    history: list[tuple[str, str]] = field(default_factory=list)  # (command, observation)
    done: bool = False
    success: bool = False
    redraw: int = 0  # > 0: the next step draws its random numbers afresh (World.redraw)


class TextGameWorld(World):
    """A world over a real text game; subclasses provide sessions, tasks and the gold plan.

    Subclass hooks: ``task_ids``, ``_new_session()``, ``_start(session, task_id, seed) ->
    (task_text, GameObservation, plan)``, ``_play(session, command) -> GameObservation``
    (its ``plan`` set where the game recomputes the gold commands, else the fixed gold path
    advances when the gold command is played), and the class attributes ``harmless`` (the
    look-around command) and ``name``.
    """

    harmless = "look"

    def __init__(self, pool: Pool, config):
        super().__init__(pool)
        self.config = config

        self.executors = {tier.name: build_executor(tier, self.executor_config(tier, DEFAULT_TEXT_EXECUTORS),
                                                    self.name) for tier in pool.tiers}
        self._idle: list = []
        self._leased: set[int] = set()
        self._all: list = []
        self._tasks: set[str] | None = None
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _close_sessions, self._all)
        atexit.register(self._finalizer)

    # -- sessions ----------------------------------------------------------------------
    def _new_session(self):
        raise NotImplementedError

    def _start(self, session, task_id: str, seed: int) -> tuple[str, GameObservation, list[str]]:
        raise NotImplementedError

    def _play(self, session, command: str) -> GameObservation:
        raise NotImplementedError

    def _lease(self):
        with self._lock:
            session = self._idle.pop() if self._idle else None
        if session is None:
            if len(self._all) >= self.config.max_sessions:
                raise RuntimeError(
                    f"{self.name}: {len(self._all)} game sessions are live (world.max_sessions); play fewer "
                    "episodes at once (more rl.rollout_shards, a smaller router.batch_size) or raise "
                    "world.max_sessions if the machine has the memory")
            session = self._new_session()
            with self._lock:
                self._all.append(session)
        with self._lock:
            self._leased.add(id(session))
        return session

    def release(self, state) -> None:
        session, state.session = getattr(state, "session", None), None
        if session is not None:
            self._give_back(session)

    def _give_back(self, session) -> None:
        with self._lock:
            if id(session) in self._leased:
                self._leased.discard(id(session))
                self._idle.append(session)

    def _discard(self, session) -> None:
        """Close a session instead of reusing it (its game failed)."""
        with self._lock:
            self._leased.discard(id(session))
            if session in self._all:
                self._all.remove(session)
        _close_one(session)

    def close(self) -> None:
        """End every game session this world started (idle or leased)."""
        self._finalizer()
        self._idle.clear()
        self._leased.clear()

    @property
    def open_sessions(self) -> int:
        return len(self._all)

    # -- episodes ----------------------------------------------------------------------
    def reset(self, task_id: str, seed: int) -> TextGameState:
        if task_id not in self._task_set():
            raise ValueError(f"unknown {self.name} task {task_id!r}; see world.task_ids('train'|'test')")
        session = self._lease()
        try:
            task_text, observation, plan = self._start(session, task_id, int(seed))
        except Exception as err:  # a session that failed to start a task is not reused
            self._discard(session)
            raise RuntimeError(f"{self.name}: could not start task {task_id} ({type(err).__name__}: {err}); "
                               "its session was closed") from err
        return TextGameState(task_id=task_id, seed=int(seed), max_steps=self.step_limit(len(plan)),
                             task_text=clean_text(task_text), session=session, plan=list(plan),
                             observation=observation)

    def step_limit(self, plan_length: int) -> int:
        """Agent steps an episode may take (default: the fixed ``max_steps``)."""
        return self.config.max_steps

    def _task_set(self) -> set[str]:
        if self._tasks is None:
            self._tasks = set(self.task_ids("train")) | set(self.task_ids("test"))
        return self._tasks

    def router_view(self, state: TextGameState) -> RouterView:
        # Progress as the game scores it (percent), not the gold commands taken: whether a
        # command was the gold one is hidden from routers.
        text = "observation: " + clean_text(state.observation.text, self.config.observation_chars)
        return RouterView(state.task_text, text, state.steps_taken, round(100 * state.observation.score), 100,
                          state.max_steps)

    def agent_prompt_tokens(self, state: TextGameState) -> int:
        history = state.history[-self.config.history_steps:] if self.config.history_steps else []
        text = " ".join(f"> {c} {o}" for c, o in history)
        return (self.config.system_tokens + count_tokens(state.task_text) + count_tokens(text)
                + count_tokens(state.observation.text))

    models_prompt_prefix = True

    def prompt_prefix_tokens(self, state: TextGameState) -> int:
        # system + task + the history window + the current observation; the next prompt
        # keeps this window as its head only while the window is not full (then it slides
        # and only system + task stay)
        head = self.config.system_tokens + count_tokens(state.task_text)
        if self.config.history_steps and len(state.history) < self.config.history_steps:
            head += count_tokens(" ".join(f"> {c} {o}" for c, o in state.history))
        return head

    def worst_case_tokens(self, state: TextGameState, tier: Tier) -> tuple[int, int]:
        return self.executors[tier.name].worst_case_tokens(self, state)

    def gold_command(self, state: TextGameState) -> str | None:
        return state.plan[0] if state.plan else None

    def difficulty(self, command: str | None, observation: GameObservation) -> float:
        c = self.config
        verb = (command or "").split(" ", 1)[0].lower()
        base = (c.verb_difficulty or {}).get(verb, VERB_DIFFICULTY.get(verb, c.default_difficulty))
        if not c.admissible_slope:
            return base
        return base + c.admissible_slope * math.log10(max(1, len(observation.admissible)))

    def success_probability(self, state: TextGameState, tier_name: str) -> float:
        """P(the tier's simulated executor writes the gold command now) (hidden from routers)."""
        command = self.gold_command(state)
        d = self.difficulty(command, state.observation)
        return 1.0 / (1.0 + math.exp(-self.config.sharpness * (self.executors[tier_name].skill - d)))

    def rng(self, state: TextGameState, stream: int) -> np.random.Generator:
        # Common random numbers: stream 1 (the command) is shared by all tiers at a step.
        return np.random.default_rng(draw_key(state.seed, state.steps_taken, stream, redraw=state.redraw))

    def redraw(self, state: TextGameState, salt: int) -> bool:
        # A simulated executor's command and token counts come from ``rng``; a served
        # model's reply is its own draw, which no salt changes.
        state.redraw = int(salt)
        return True

    def simulated_command(self, state: TextGameState, tier: Tier) -> tuple[str, str]:
        """(command, what it is) a simulated executor writes now: the ``gold`` one, a
        ``wrong`` admissible one, or the harmless ``look``-around."""
        gold = self.gold_command(state)
        u_correct, u_fate, u_pick = self.rng(state, 1).random(3)
        if gold is not None and u_correct < self.success_probability(state, tier.name):
            return gold, "gold"
        wrong = [a for a in state.observation.admissible if a != gold]
        if wrong and u_fate < self.config.p_consequential:
            return sorted(wrong)[int(u_pick * len(wrong))], "wrong"
        return self.harmless, "look"

    def step(self, state: TextGameState, tier: Tier) -> StepResult:
        if state.done:
            raise RuntimeError("step() called on a finished episode; reset first")
        if state.session is None:
            raise RuntimeError("this episode's game session was released; reset first")

        gold = self.gold_command(state)
        move = None
        try:
            move = self.executors[tier.name].act(self, state, tier)  # may read the game's admissible commands
            observation = None if move.command is None else self._play(state.session, move.command)
        except ExecutorError:
            raise
        except Exception as err:
            session, state.session = state.session, None
            self._discard(session)
            doing = f"playing {move.command!r}" if move is not None else "reading its state"
            raise RuntimeError(f"{self.name}: the game failed while {doing} in task {state.task_id} "
                               f"({type(err).__name__}: {err}); its session was closed, reset to start a new "
                               "episode") from err
        if move.command is None:  # the executor's reply had no usable command: a no-op step
            observation, hidden = state.observation, "invalid"
            feedback = f"invalid action: {move.note}"
        else:
            hidden = "gold" if move.command == gold else (move.event or "wrong")
            feedback = observation.text
            if observation.plan is not None:
                state.plan = list(observation.plan)
            elif hidden == "gold":
                state.plan = state.plan[1:]
            state.observation = observation
        state.steps_taken += 1
        state.redraw = 0
        state.history.append((move.command or "(none)", clean_text(feedback, 300)))
        # What an agent framework sees: the command was played ("ok"), was not a command
        # ("invalid"), or lost the game ("fatal"). Whether it was the right command is hidden.
        event = "invalid" if move.command is None else ("fatal" if observation.done and not observation.won else "ok")
        state.done = observation.done
        state.success = observation.won
        limit = not state.done and state.steps_taken >= state.max_steps
        return StepResult(
            observation=clean_text(feedback, self.config.observation_chars),
            input_tokens=move.input_tokens,
            output_tokens=move.output_tokens,
            step_ok=event == "ok",
            event=event,
            executor_event=hidden,
            progress=float(observation.score),
            done=state.done,
            success=state.success,
            step_limit_reached=limit,
        )

    def copy_state(self, state):
        raise NotImplementedError(
            f"{self.name} episodes hold a live game that cannot be copied, so route search (the "
            "hindsight oracle) is not available; leave 'oracle' out of eval.policies")


def _close_one(session) -> None:
    try:
        session.close()
    except Exception:  # a session whose process is already gone
        pass


def _close_sessions(sessions: list) -> None:
    while sessions:
        _close_one(sessions.pop())
