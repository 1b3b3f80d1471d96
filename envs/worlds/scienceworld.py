"""ScienceWorld: the interactive science-experiment benchmark (one of BoPO's three), played
for real in its JVM simulator (``pip install scienceworld``; needs Java 11+).

Tasks are ``<task name>:<variation>``, with the variations of the package's own train / dev
/ test split (``split: train`` → the package's train variations, ``test`` → its ``test``
or ``dev`` ones, per ``test_split``). ``tasks`` names the task families (default: the ones
whose gold path fits the paper's 40-step limit with room for errors), ``variations`` caps
the variations per family and split. The agent sees the task description and the
observations; progress is the game's score / 100, success is a finished task with score
100 (a task ended below that — e.g. by focusing on the wrong object — is a fatal step).
Executors follow the gold path the package generates for the variation (see
:mod:`envs.worlds.textgame`); after a consequential wrong command the gold path may no
longer apply (you walked away), as for a real agent that errs.

One JVM per leased session: ``ScienceWorldEnv`` starts one (≈ 2 s), ``load`` switches it
to another task in ≈ 0.3 s, and the world closes every JVM it started on ``close``.

Reproducibility: the simulator draws parts of a variation at random on every load (which
non-living thing the gold path picks, the order objects are listed in) from JVM state that
depends on everything loaded before in the same JVM. The world makes an episode a function
of (task, variation, episode seed) alone: JVMs start with identity hash codes made
constant (``-XX:hashCode=2``, so hash-set order follows insertion) and Scala's global
random generator is seeded with the episode seed before each load.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

from envs.pool import Pool
from envs.worlds.textgame import GameObservation, TextGameSettings, TextGameWorld

SHORT_TASKS = (
    "find-living-thing", "find-non-living-thing", "find-plant", "find-animal",
    "lifespan-longest-lived", "lifespan-shortest-lived", "lifespan-longest-lived-then-shortest-lived",
    "chemistry-mix-paint-secondary-color", "chemistry-mix-paint-tertiary-color", "power-component",
    "identify-life-stages-2", "chemistry-mix", "use-thermometer", "measure-melting-point-known-substance",
)


@dataclass(frozen=True)
class ScienceWorldConfig(TextGameSettings):
    """Recipe ``world:`` fields of ``kind: scienceworld`` (and those of ``TextGameSettings``).

    Attributes:
        tasks: task families (ScienceWorld task names).
        variations: at most this many variations per family and split (the package's order).
        test_split: which package split ``split: test`` uses ("test" or "dev").
        simplification: the package's simplification string ("easy": doors open, no
            teleport needed, ...; "" for the full game).
        max_steps: 40, the BoPO paper's step limit.
        max_sessions: 8 JVMs at most (each ≈ 350 MB resident with the default heap).
        jvm_heap_mb: each JVM's maximum heap (-Xmx); the default tasks run in 256.
        admissible_slope: 0 here: ScienceWorld lists 100-1,000 action-object combinations,
            most of them nonsense, so their number says little about a step (and fetching
            them costs 30 ms a step).
    """

    tasks: tuple[str, ...] = SHORT_TASKS
    variations: int = 5
    test_split: str = "test"
    simplification: str = "easy"
    admissible_slope: float = 0.0
    max_sessions: int = 8
    jvm_heap_mb: int = 384

    @classmethod
    def from_dict(cls, data: dict, where: str = "world") -> "ScienceWorldConfig":
        config = cls.parse(data, where, "scienceworld-world")
        if config.test_split not in ("test", "dev"):
            raise ValueError(f"{where}.test_split must be 'test' or 'dev', got {config.test_split!r}")
        if config.variations < 1:
            raise ValueError(f"{where}.variations must be >= 1, got {config.variations}")
        if config.jvm_heap_mb < 128:
            raise ValueError(f"{where}.jvm_heap_mb must be >= 128, got {config.jvm_heap_mb}")
        return config


# Identity hash codes all equal: hash-set iteration order then follows insertion, not the
# JVM's allocation history (what makes repeated loads in one JVM differ otherwise).
DETERMINISTIC_JVM_OPTIONS = "-XX:+UnlockExperimentalVMOptions -XX:hashCode=2"
_LAUNCH_LOCK = threading.Lock()


class ScienceWorldSession:
    """One JVM with one loaded task at a time, made reproducible: started with
    ``DETERMINISTIC_JVM_OPTIONS`` and the simulator's random generator (Scala's global
    ``Random``) seeded with the episode seed before every load."""

    def __init__(self, step_limit: int, heap_mb: int = 384):
        try:
            from scienceworld import ScienceWorldEnv
        except ImportError as err:
            raise RuntimeError("the scienceworld world needs the package: pip install scienceworld "
                               "(and Java 11+ on PATH)") from err
        with _LAUNCH_LOCK:  # the JVM reads its options from the environment at launch
            before = os.environ.get("JAVA_TOOL_OPTIONS")
            options = f"{DETERMINISTIC_JVM_OPTIONS} -Xmx{int(heap_mb)}m -XX:+UseSerialGC"
            os.environ["JAVA_TOOL_OPTIONS"] = f"{before} {options}" if before else options
            try:
                self.env = ScienceWorldEnv("", envStepLimit=step_limit)
            except Exception as err:
                raise RuntimeError(f"could not start the ScienceWorld JVM ({err}); is Java 11+ installed "
                                   "(java -version)?") from err
            finally:
                if before is None:
                    os.environ.pop("JAVA_TOOL_OPTIONS", None)
                else:
                    os.environ["JAVA_TOOL_OPTIONS"] = before

    def load(self, task: str, variation: int, simplification: str, seed: int) -> None:
        # Scala's global generator, seeded so that the load is a function of the seed alone
        getattr(getattr(self.env._gateway.jvm.scala.util, "Random$"), "MODULE$").setSeed(int(seed))
        self.env.load(task, int(variation), simplification, generateGoldPath=True)

    def step(self, command: str) -> tuple[str, int, bool]:
        """(observation, score 0-100, done): the package's ``step`` without the look,
        inventory and valid-action lists it also fetches (15x faster)."""
        server = self.env.server
        text = server.step(command)
        score = int(round(100 * server.getScore()))
        return text, score, bool(server.getCompleted()) or score < 0

    def admissible(self) -> list[str]:
        return list(self.env.server.getValidActionObjectCombinations())

    def close(self) -> None:
        gateway = self.env._gateway
        try:
            self.env.close()
        except Exception:  # the JVM is already gone: close the Python side of the bridge below
            pass
        finally:
            try:
                gateway.close(keep_callback_server=False, close_callback_server_connections=True)
            except Exception:
                pass
            # Wait for the JVM to exit: the package's __del__ closes again later and writes to
            # the process's stdin while it still runs (a BrokenPipe traceback at exit otherwise).
            try:
                gateway.java_process.wait(timeout=10)
            except Exception:
                gateway.java_process.kill()


class ScienceWorldWorld(TextGameWorld):
    """ScienceWorld tasks played in the real simulator (``rlrouter/ScienceWorld-v0``).

    ## Description
    Science experiments in the JVM simulator (module docstring); an agent step is one
    command, written by the routed tier's executor (``envs.worlds.textgame``).

    ## Action Space
    Through ``RoutingEnv``: ``Discrete(n_tiers)``, the executor that writes the next command.

    ## Observation Space
    ``router_view``: the task description, the simulator's last answer (cut to
    ``observation_chars``), the score as progress and the step limit; ``RoutingEnv`` adds
    budget, cost and history.

    ## Rewards
    ``StepResult.success`` when the task completes with score 100.

    ## Starting State
    ``reset(task_id, seed)``: ``<task>:<variation>`` loaded in a leased JVM with its random
    generator seeded by the episode seed, so an episode replays exactly.

    ## Episode End
    Termination: the task completes, or ends below 100 (a fatal step). Truncation:
    ``max_steps`` agent steps (default 40, the paper's limit), or the budget (``RoutingEnv``).

    ## Arguments
    ``ScienceWorldConfig``: ``tasks``, ``variations``, ``test_split`` and the
    ``TextGameSettings`` fields.

    ## Example
    >>> import gymnasium as gym, envs
    >>> env = gym.make("rlrouter/ScienceWorld-v0")  # starts a JVM  # doctest: +SKIP
    >>> obs, info = env.reset(seed=0)  # doctest: +SKIP
    """

    name = "scienceworld"
    harmless = "look around"

    def __init__(self, pool: Pool, config: ScienceWorldConfig | None = None):
        super().__init__(pool, config or ScienceWorldConfig())
        self._ids: dict[str, list[str]] | None = None

    def task_ids(self, split: str) -> list[str]:
        if split not in ("train", "test"):
            raise ValueError(f"unknown split {split!r}; the scienceworld world has 'train' and 'test'")
        if self._ids is None:
            self._ids = self._enumerate()
        return list(self._ids[split])

    def _enumerate(self) -> dict[str, list[str]]:
        session = self._lease()
        try:
            env = session.env
            known = set(env.get_task_names())
            unknown = [t for t in self.config.tasks if t not in known]
            if unknown:
                raise ValueError(f"world.tasks: unknown ScienceWorld task(s) {unknown}; known: {sorted(known)}")
            ids = {"train": [], "test": []}
            for task in self.config.tasks:
                env.load(task, 0, self.config.simplification)
                train = env.get_variations_train()
                test = env.get_variations_test() if self.config.test_split == "test" else env.get_variations_dev()
                ids["train"] += [f"{task}:{v}" for v in train[: self.config.variations]]
                ids["test"] += [f"{task}:{v}" for v in test[: self.config.variations]]
            return ids
        finally:
            self._give_back(session)

    def _new_session(self) -> ScienceWorldSession:
        return ScienceWorldSession(self.config.max_steps + 10, self.config.jvm_heap_mb)

    def _start(self, session: ScienceWorldSession, task_id: str, seed: int):
        task, _, variation = task_id.rpartition(":")
        env = session.env
        session.load(task, int(variation), self.config.simplification, seed)
        plan = list(env.get_gold_action_sequence())
        env.server.reset()
        return env.get_task_description(), self._observe(session, *session.step("look around")), plan

    def _play(self, session: ScienceWorldSession, command: str) -> GameObservation:
        return self._observe(session, *session.step(command))

    @staticmethod
    def _observe(session: ScienceWorldSession, text: str, score: int, done: bool) -> GameObservation:
        return GameObservation(text, max(0, score) / 100.0, done, done and score >= 100, session.admissible)
