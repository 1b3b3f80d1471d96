"""Task worlds. ``build_world(spec, pool)`` builds one from a recipe's ``world:`` mapping."""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any, Mapping

from envs.pool import Pool
from envs.worlds.base import RouterView, StepResult, World
from envs.worlds.replay import RecordTable, ReplayConfig, ReplayWorld, load_routellm, load_table
from envs.worlds.synthetic import SyntheticConfig, SyntheticWorld

WORLD_KINDS = ("synthetic", "replay", "scienceworld", "textworld")


@lru_cache(maxsize=4)
def _cached_table(config: ReplayConfig, file_version: tuple | None) -> RecordTable:
    # Loading MMLU's 57 CSVs takes a second; vector envs and evaluations share one table.
    # file_version (mtime, size) of a generic table makes an edited file load afresh.
    return config.load()


def _file_version(config: ReplayConfig) -> tuple | None:
    if config.source != "table" or not config.table or not os.path.isfile(config.table):
        return None
    stat = os.stat(config.table)
    return (stat.st_mtime_ns, stat.st_size)


def build_world(spec: Mapping[str, Any] | None, pool: Pool, where: str = "world") -> World:
    """``spec = {"kind": "synthetic" | "replay" | "scienceworld" | "textworld", ...that world's
    config fields}``. The text-game worlds import their game packages only when built."""
    spec = dict(spec or {"kind": "synthetic"})
    kind = spec.pop("kind", None)
    if kind == "synthetic":
        return SyntheticWorld(pool, SyntheticConfig.from_dict(spec, where))
    if kind == "replay":
        config = ReplayConfig.from_dict(spec, where)
        return ReplayWorld(pool, config, table=_cached_table(config, _file_version(config)))
    if kind == "scienceworld":
        from envs.worlds.scienceworld import ScienceWorldConfig, ScienceWorldWorld

        return ScienceWorldWorld(pool, ScienceWorldConfig.from_dict(spec, where))
    if kind == "textworld":
        from envs.worlds.textworld import TextWorldConfig, TextWorldWorld

        return TextWorldWorld(pool, TextWorldConfig.from_dict(spec, where))
    raise ValueError(f"{where}.kind must be one of {list(WORLD_KINDS)}, got {kind!r}")


__all__ = [
    "World", "RouterView", "StepResult", "SyntheticWorld", "SyntheticConfig", "ReplayWorld", "ReplayConfig",
    "RecordTable", "load_routellm", "load_table", "build_world", "WORLD_KINDS",
]
