"""Greedy routes of the smollm2-135m base, made a router (format tags added, route-only turns)
and saved as a checkpoint, on the in-process vLLM engine and on transformers, over the same
synthetic episodes: for tests/test_bases.py.

usage: python tests/vllm_base_routes.py CACHE_DIR OUT_DIR OUT.json
Runs as a script: vLLM's engine needs a ``__main__`` guard.
"""

import json
import sys
from pathlib import Path

if __name__ == "__main__":
    from envs import Budget
    from rlrouter.config import recipe_from_dict
    from rlrouter.router.bases import resolve_base
    from rlrouter.router.checkpoint import load_router, save_checkpoint
    from rlrouter.router.episodes import EpisodeSpec, play_episodes
    from rlrouter.router.generation import HFEngine, VLLMEngine
    from rlrouter.router.model import as_router
    from rlrouter.router.prompt import RouterFormat

    cache, out_dir, out_path = sys.argv[1:4]
    recipe = recipe_from_dict({"name": "base-routes", "world": {"kind": "synthetic", "n_train": 8, "n_test": 8,
                                                                "max_length": 4}})
    fmt = RouterFormat(turn_format="route", max_prompt_tokens=512)
    model, tok = as_router(*load_router(resolve_base("smollm2-135m", cache)))
    checkpoint = save_checkpoint(model, tok, Path(out_dir) / "router",
                                 {"pool": recipe.pool.describe(), "router": {"format": fmt.to_dict()}})
    tiers = recipe.pool.names
    make_env = lambda: recipe.make_env("test")  # noqa: E731
    specs = [EpisodeSpec(f"test-{i}", Budget(), seed=100 + i) for i in range(8)]

    def routes(engine):
        played = play_episodes(engine, make_env, specs, logprobs=True)
        return ([[t.tier for t in r.turns] for r in played],
                [[sum(t.logprobs) for t in r.turns] for r in played])

    hf_routes, hf_logprobs = routes(HFEngine(model.eval(), tok, tiers, max_new_tokens=8, format=fmt))
    vllm_routes, vllm_logprobs = routes(VLLMEngine(str(checkpoint), tok, tiers, max_new_tokens=8, format=fmt))
    Path(out_path).write_text(json.dumps({"tiers": tiers, "hf_routes": hf_routes, "vllm_routes": vllm_routes,
                                          "hf_logprobs": hf_logprobs, "vllm_logprobs": vllm_logprobs}))
