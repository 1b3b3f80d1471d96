"""Shared fixtures. The RouteLLM recordings are read in place from shared/data/routellm."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from envs.worlds.replay import default_routellm_dir  # noqa: E402

ROUTELLM_DIR = default_routellm_dir()


@pytest.fixture(scope="session")
def routellm_dir() -> Path:
    if not (ROUTELLM_DIR / "mmlu").is_dir():
        pytest.skip(f"RouteLLM recordings not found at {ROUTELLM_DIR} (set RLROUTER_ROUTELLM_DIR)")
    return ROUTELLM_DIR


@pytest.fixture(scope="session")
def mmlu_table(routellm_dir):
    from envs.worlds.replay import load_routellm

    return load_routellm(routellm_dir, "mmlu")
