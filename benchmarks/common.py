"""Shared by the benchmark scripts: the router checkpoint to measure with."""

from __future__ import annotations

import tempfile
from pathlib import Path


def router_checkpoint(recipe, checkpoint: str | None) -> tuple[Path, tempfile.TemporaryDirectory | None]:
    """``checkpoint``, else the recipe's SFT checkpoint if it exists, else an untrained tiny
    router built and saved to a temp dir (returned so the caller can clean it up)."""
    path = Path(checkpoint) if checkpoint else recipe.sft_dir()
    if (path / "rlrouter.json").is_file():
        return path, None
    from rlrouter.router.checkpoint import save_checkpoint
    from rlrouter.router.model import build_tiny_router, train_tokenizer
    from rlrouter.router.prompt import step_user_message, system_message

    env = recipe.make_env("train")
    texts = []
    for task in env.task_ids[:200]:
        env.reset(seed=0, options={"task_id": task})
        texts.append(system_message(env.pool.describe()) + "\n" + step_user_message(env.view()))
    tok = train_tokenizer(texts, 1024)
    tmp = tempfile.TemporaryDirectory()
    path = save_checkpoint(build_tiny_router(tok), tok, Path(tmp.name) / "router",
                           {"pool": recipe.pool.describe(), "router": {"prompt_mode": "step"}})
    print(f"no trained checkpoint found: using an untrained tiny router ({path})")
    return path, tmp
