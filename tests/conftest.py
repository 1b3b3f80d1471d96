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


TINY = {
    "name": "tiny-test",
    "seed": 0,
    "world": {"kind": "synthetic", "n_train": 40, "n_test": 10, "max_length": 8},
    "synth": {"tasks": 40, "samples": 2, "n_strata": 2, "boundary_k": 2},
    "sft": {"epochs": 12, "batch_size": 4, "learning_rate": 5e-3, "logging_steps": 10},
    "router": {"max_new_tokens": 32, "batch_size": 16},
    "env": {"cost_lambda": 2.0},
}


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A tiny router fine-tuned on 40 short synthesized tasks (one per session, ~1 min)."""
    from rlrouter.config import recipe_from_dict
    from rlrouter.pipeline import run_sft_stage, run_synth

    root = tmp_path_factory.mktemp("router")
    recipe = recipe_from_dict({**TINY, "synth": {**TINY["synth"], "out_dir": str(root / "synth")},
                               "sft": {**TINY["sft"], "out_dir": str(root / "sft")}})
    run_synth(recipe, progress=False)
    checkpoint = run_sft_stage(recipe, progress=False)
    return recipe, checkpoint
