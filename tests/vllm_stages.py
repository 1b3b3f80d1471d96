"""The RL stage with rollouts on the in-process vLLM engine, then the eval stage playing the
SFT and the RL checkpoint on vLLM (one engine after another in one process, as
``rlrouter train`` runs them) and again on transformers, for tests/test_rl_training.py.

usage: python tests/vllm_stages.py SYNTH_DIR CHECKPOINT OUT_DIR OUT.json
Runs as a script: vLLM's engine needs a ``__main__`` guard.
"""

import json
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from conftest import TINY
    from rlrouter.config import recipe_from_dict
    from rlrouter.evaluate.job import eval_recipe
    from rlrouter.pipeline import run_rl_stage

    synth_dir, checkpoint, out_dir, out_path = sys.argv[1:5]
    out = Path(out_dir)

    def recipe(engine: str):
        return recipe_from_dict({
            **TINY, "synth": {**TINY["synth"], "out_dir": synth_dir},
            "rl": {"engine": "vllm", "iterations": 1, "tasks": 8, "tasks_per_iteration": 4, "group_size": 2,
                   "budgets": ["none"], "save_every": 1},
            "eval": {"engine": engine, "tasks": 6, "budgets": ["none", "large_calls=1"], "policies": ["always-small"],
                     "boundary_k": 1, "router_bias": [0.0, 4.0], "bootstrap": 10}})

    rl = run_rl_stage(recipe("vllm"), init=checkpoint, out_dir=out / "rl", progress=False)

    def episodes(engine: str):
        result = eval_recipe(recipe(engine), out_dir=out / f"eval-{engine}", progress=False,
                             checkpoint={"sft": checkpoint, "bopo": str(rl)})
        rows = json.loads(Path(result["paths"]["json"]).read_text())["episodes"]
        return sorted([r["policy"], r["budget"], r["task_id"], r["calls"], r["success"], r["cost_usd"]]
                      for r in rows if r["policy"].startswith(("sft", "bopo")))

    vllm = episodes("vllm")  # three vLLM engines in this process: RL's, then one per checkpoint
    Path(out_path).write_text(json.dumps({"vllm": vllm, "hf": episodes("hf")}))
