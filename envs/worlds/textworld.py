"""TextWorld: text adventures generated offline with ``tw-make`` (the engine under ALFWorld).

Task ``train-i`` / ``test-i`` is a ``tw-make custom`` game whose generator seed is drawn
from ``(seed, split, i)``; its difficulty is the quest length (``quest_lengths``, cycled
over the tasks: a longer quest needs more commands, and more of them are hard ones like
``unlock``) in a world of ``world_size`` rooms with ``nb_objects`` objects. Games are
generated on first use and cached under ``games_dir`` (default
``~/.cache/rlrouter/textworld``), in a folder named by the generation settings, so a
changed setting never reuses a stale game; each takes ≈ 4 s to build.

The agent sees the objective and the game's answers; progress is score / max score and
success is a won game (a lost game is a fatal step). The executors' gold command is the
first of TextWorld's ``policy_commands``, which the game recomputes from the current
state after every command, so a wrong command can be recovered from, at the price of
more steps (see :mod:`envs.worlds.textgame`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from envs.pool import Pool
from envs.worlds.textgame import GameObservation, TextGameSettings, TextGameWorld


@dataclass(frozen=True)
class TextWorldConfig(TextGameSettings):
    """Recipe ``world:`` fields of ``kind: textworld`` (and those of ``TextGameSettings``).

    Attributes:
        seed: with the split and index, fixes every game.
        n_train / n_test: games per split.
        world_size / nb_objects: rooms and objects of each game.
        quest_lengths: quest lengths cycled over the tasks (the difficulty knob).
        games_dir: where generated games are cached (default ~/.cache/rlrouter/textworld).
        max_steps / min_slack / slack_fraction: agent steps per episode: the walkthrough's
            length plus max(min_slack, slack_fraction * length), at most max_steps.
    """

    seed: int = 0
    n_train: int = 24
    n_test: int = 12
    world_size: int = 6
    nb_objects: int = 12
    quest_lengths: tuple[int, ...] = (3, 6, 12)
    games_dir: str | None = None
    max_steps: int = 30
    min_slack: int = 2
    slack_fraction: float = 0.3

    @classmethod
    def from_dict(cls, data: dict, where: str = "world") -> "TextWorldConfig":
        config = cls.parse(data, where, "textworld-world")
        if not config.quest_lengths or min(config.quest_lengths) < 1:
            raise ValueError(f"{where}.quest_lengths must list quest lengths >= 1, got {config.quest_lengths}")
        if config.world_size < 1 or config.nb_objects < 1:
            raise ValueError(f"{where}: world_size and nb_objects must be >= 1")
        return config

    @property
    def cache_dir(self) -> Path:
        root = Path(self.games_dir or os.environ.get("RLROUTER_TEXTWORLD_DIR")
                    or Path.home() / ".cache" / "rlrouter" / "textworld")
        key = json.dumps([self.seed, self.world_size, self.nb_objects, list(self.quest_lengths)])
        return root / f"ws{self.world_size}-no{self.nb_objects}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def tw_make() -> str:
    path = shutil.which("tw-make")
    if path is None:
        raise RuntimeError("the textworld world generates games with tw-make: pip install textworld")
    return path


class TextWorldSession:
    """One running game (a Z-machine); restarted when a different game is needed."""

    def __init__(self):
        self.path: str | None = None
        self.env = None

    def open(self, path: str):
        import textworld

        if self.path != path:
            self.close()
            infos = textworld.EnvInfos(admissible_commands=True, policy_commands=True, objective=True,
                                       description=True, won=True, lost=True, score=True, max_score=True)
            self.env = textworld.start(path, request_infos=infos)
            self.path = path
        return self.env

    def close(self) -> None:
        if self.env is not None:
            self.env.close()
        self.env, self.path = None, None


class TextWorldWorld(TextGameWorld):
    """Generated TextWorld games played in the real engine (``rlrouter/TextWorld-v0``).

    ## Description
    Text adventures built with ``tw-make`` (module docstring); an agent step is one command,
    written by the routed tier's executor (``envs.worlds.textgame``).

    ## Action Space
    Through ``RoutingEnv``: ``Discrete(n_tiers)``, the executor that writes the next command.

    ## Observation Space
    ``router_view``: the objective, the game's last answer (cut to ``observation_chars``),
    the score as progress and the step limit; ``RoutingEnv`` adds budget, cost and history.

    ## Rewards
    ``StepResult.success`` when the game is won.

    ## Starting State
    ``reset(task_id, seed)``: the game of ``task_id`` (generated once, cached), started fresh;
    the episode seed keys the simulated executors' draws.

    ## Episode End
    Termination: the game is won or lost. Truncation: ``max_steps`` agent steps, or the
    budget (``RoutingEnv``).

    ## Arguments
    ``TextWorldConfig``: ``n_train`` / ``n_test``, ``quest_lengths``, ``world_size``,
    ``nb_objects``, ``games_dir`` and the ``TextGameSettings`` fields.

    ## Example
    >>> import gymnasium as gym, envs
    >>> env = gym.make("rlrouter/TextWorld-v0", world={"n_train": 2, "n_test": 1})  # doctest: +SKIP
    >>> obs, info = env.reset(seed=0, options={"task_id": "test-0"})  # builds the game (≈ 4 s)  # doctest: +SKIP
    """

    name = "textworld"
    harmless = "look"

    def __init__(self, pool: Pool, config: TextWorldConfig | None = None):
        super().__init__(pool, config or TextWorldConfig())

    def step_limit(self, plan_length: int) -> int:
        c = self.config
        return min(c.max_steps, plan_length + max(c.min_slack, math.ceil(c.slack_fraction * plan_length)))

    def task_ids(self, split: str) -> list[str]:
        n = {"train": self.config.n_train, "test": self.config.n_test}.get(split)
        if n is None:
            raise ValueError(f"unknown split {split!r}; the textworld world has 'train' and 'test'")
        return [f"{split}-{i}" for i in range(n)]

    def game_settings(self, task_id: str) -> dict:
        split, _, index = task_id.partition("-")
        i = int(index)
        c = self.config
        seed = int(np.random.default_rng([c.seed, 0 if split == "train" else 1, i]).integers(1, 2**31 - 1))
        return {"seed": seed, "world_size": c.world_size, "nb_objects": c.nb_objects,
                "quest_length": c.quest_lengths[i % len(c.quest_lengths)]}

    def game_path(self, task_id: str) -> Path:
        """The task's game file, generated with tw-make on first use."""
        path = self.config.cache_dir / f"{task_id}.z8"
        if path.exists():
            return path
        s = self.game_settings(task_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            out = Path(tmp) / f"{task_id}.z8"
            command = [tw_make(), "custom", "--world-size", str(s["world_size"]), "--nb-objects",
                       str(s["nb_objects"]), "--quest-length", str(s["quest_length"]), "--seed", str(s["seed"]),
                       "--output", str(out), "-f", "--silent"]
            done = subprocess.run(command, capture_output=True, text=True, timeout=300)
            if done.returncode != 0 or not out.exists():
                raise RuntimeError(f"tw-make failed for {task_id} ({' '.join(command[1:])}): "
                                   f"{(done.stderr or done.stdout).strip()[-400:]}")
            for suffix in (".json", ".ni"):
                if out.with_suffix(suffix).exists():
                    os.replace(out.with_suffix(suffix), path.with_suffix(suffix))
            os.replace(out, path)  # last: the .z8's presence means the game is complete
        return path

    def generate(self, split: str, progress: bool = False) -> list[Path]:
        """Generate (or find cached) every game of a split."""
        from tqdm import tqdm

        return [self.game_path(t) for t in tqdm(self.task_ids(split), desc=f"tw-make {split}", disable=not progress)]

    def _new_session(self) -> TextWorldSession:
        return TextWorldSession()

    def _start(self, session: TextWorldSession, task_id: str, seed: int):  # the games are deterministic
        env = session.open(str(self.game_path(task_id)))
        state = env.reset()
        return state.objective, self._observe(state, state.description), list(state.policy_commands)

    def _play(self, session: TextWorldSession, command: str) -> GameObservation:
        state, _, _ = session.env.step(command)
        return self._observe(state, state.feedback)

    @staticmethod
    def _observe(state, text: str) -> GameObservation:
        max_score = max(1, int(state.max_score or 1))
        return GameObservation(text, float(state.score or 0) / max_score, bool(state.done), bool(state.won),
                               list(state.admissible_commands or []), list(state.policy_commands or []))
