"""Greedy routes of the smollm2-135m base, made a router (format tags added, route-only turns)
and saved as a checkpoint, on the in-process vLLM engine and on transformers, for the same
step prompts (synthetic episodes played by a seeded random policy under call caps): for
tests/test_bases.py.

usage: python tests/vllm_base_routes.py CACHE_DIR OUT_DIR OUT.json
Runs as a script: vLLM's engine needs a ``__main__`` guard.
"""

import json
import sys
from pathlib import Path

if __name__ == "__main__":
    from envs import Budget
    from rlrouter.config import recipe_from_dict
    from rlrouter.evaluate.job import eval_recipe
    from rlrouter.router.bases import resolve_base
    from rlrouter.router.checkpoint import load_router, save_checkpoint
    from rlrouter.router.generation import HFEngine, VLLMEngine
    from rlrouter.router.model import as_router
    from rlrouter.router.prompt import RouterFormat, step_user_message
    from conftest import random_policy_views  # this script's folder is on sys.path

    cache, out_dir, out_path = sys.argv[1:4]
    recipe = recipe_from_dict({"name": "base-routes", "world": {"kind": "synthetic", "n_train": 8, "n_test": 8,
                                                                "max_length": 4}})
    fmt = RouterFormat(turn_format="route", max_prompt_tokens=512)
    model, tok = as_router(*load_router(resolve_base("smollm2-135m", cache)))
    checkpoint = save_checkpoint(model, tok, Path(out_dir) / "router", {"pool": recipe.pool.describe(), "router": {
        "format": fmt.to_dict(), "prompt_mode": "step"}})
    tiers = recipe.pool.names
    # step prompts of states reached by a seeded random policy: their histories mix the tiers
    views = random_policy_views(recipe.make_env("test"), [(100 + e, Budget(max_calls={"large": 1 + e % 3}), None)
                                                         for e in range(12)], seed=0)
    system = {"role": "system", "content": fmt.system(recipe.pool.describe())}
    prompts = fmt.prompt_ids(tok, [[system, {"role": "user", "content": step_user_message(v)}] for v in views])
    allowed = [[t for t, m in zip(tiers, v["action_mask"]) if m] for v in views]

    def routes(engine):
        return [fmt.parse(tok.decode(g.ids, skip_special_tokens=True), tiers, row[0])[0].tier
                for g, row in zip(engine.generate(prompts, allowed), allowed)]

    hf = routes(HFEngine(model.eval(), tok, tiers, max_new_tokens=8, format=fmt))
    engine = VLLMEngine(str(checkpoint), tok, tiers, max_new_tokens=8, format=fmt)
    vllm = routes(engine)
    engine.close()  # eval_recipe below starts its own (VLLMEngine.close)

    def evaluated(engine):  # `rlrouter eval` of the checkpoint at two route biases, on one engine
        recipe = recipe_from_dict({
            "name": "base-eval", "world": {"kind": "synthetic", "n_train": 8, "n_test": 8, "max_length": 4},
            "router": {"max_new_tokens": 8}, "eval": {
                "tasks": 8, "budgets": ["none", "large_calls=1"], "policies": ["always-small"], "boundary_k": 1,
                "router_bias": [0.0, 2.0], "engine": engine, "bootstrap": 10}})
        result = eval_recipe(recipe, out_dir=Path(out_dir) / f"eval-{engine}", checkpoint=checkpoint, progress=False)
        episodes = json.loads(Path(result["paths"]["json"]).read_text())["episodes"]
        return sorted([e["policy"], e["budget"], e["task_id"], e["calls"], e["success"], e["cost_usd"]]
                      for e in episodes if e["policy"].startswith("router"))

    Path(out_path).write_text(json.dumps({"tiers": tiers, "allowed": allowed, "hf_routes": hf, "vllm_routes": vllm,
                                          "eval_hf": evaluated("hf"), "eval_vllm": evaluated("vllm")}))
