"""One RL iteration with rollouts on the in-process vLLM engine (and two more from
transformers rollouts), then greedy routes from vLLM (with the updated weights pushed into
it) and from transformers, for tests/test_rl_training.py.

usage: python tests/vllm_rl.py SYNTH_DIR CHECKPOINT OUT_DIR OUT.json
Runs as a script: vLLM's engine needs a ``__main__`` guard.
"""

import copy
import json
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch

    from conftest import TINY
    from envs import Budget
    from rlrouter.config import recipe_from_dict
    from rlrouter.rl.config import RLConfig
    from rlrouter.rl.trainer import RLTrainer, load_boundaries
    from rlrouter.rl.workers import LocalRollouts, RolloutWorker
    from rlrouter.router.checkpoint import load_checkpoint
    from rlrouter.router.episodes import EpisodeSpec, play_episodes
    from rlrouter.router.generation import HFEngine, VLLMEngine

    synth_dir, checkpoint, out_dir, out_path = sys.argv[1:5]
    recipe = recipe_from_dict({**TINY, "synth": {**TINY["synth"], "out_dir": synth_dir}})
    model, tok, meta = load_checkpoint(checkpoint, recipe.pool.names)
    settings = RLConfig(engine="vllm", iterations=1, tasks_per_iteration=8, group_size=4, tasks=40,
                        learning_rate=1e-2, budgets=["none"], cost_lambda=0.0, hard_bonus=1.0)  # large pays
    make_env = lambda: recipe.make_env("train")  # noqa: E731
    specs = [EpisodeSpec(f"train-{i}", Budget(), seed=500 + i) for i in range(12)]

    def rollouts(engine):
        return play_episodes(engine, make_env, specs)

    def tiers(played):
        return [[t.tier for t in r.turns] for r in played]

    def routes(engine):
        return tiers(rollouts(engine))

    def first_split_gap(a, b):
        """Where two episodes' route turns first differ, transformers' logit gap between the
        two engines' tokens there (0 if they never do): a float near-tie when tiny."""
        for ta, tb in zip(a.turns, b.turns):
            ids_a, ids_b = list(ta.prompt_ids) + list(ta.completion_ids), list(tb.prompt_ids) + list(tb.completion_ids)
            if ids_a == ids_b:
                continue
            at = next(i for i, (x, y) in enumerate(zip(ids_a, ids_b)) if x != y)
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids_a[:at]])).logits[0, -1]
            return abs(float(logits[ids_a[at]] - logits[ids_b[at]]))
        return 0.0

    stale = routes(HFEngine(copy.deepcopy(model), tok, recipe.pool.names, 32))
    engine = VLLMEngine(checkpoint, tok, recipe.pool.names, max_new_tokens=32, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = RLTrainer(model, tok, settings, make_env, [f"train-{i}" for i in range(40)],
                        load_boundaries(Path(synth_dir) / "boundary.json"), recipe.pool.names, out_dir,
                        {"pool": recipe.pool.describe()}, seed=0, engine=engine)
    metrics = trainer.iterate()  # rollouts on vLLM, update, weights pushed into vLLM
    # more updates from transformers rollouts (seeded) until the greedy routes differ from the
    # stale ones — a confident SFT router can take a few — then pushed into vLLM the same way
    trainer.rollouts = LocalRollouts(RolloutWorker(HFEngine(model, tok, recipe.pool.names, 32), make_env, "step"))
    for _ in range(8):
        trainer.iterate()
        if routes(HFEngine(model, tok, recipe.pool.names, 32)) != stale:
            break
    engine.load_weights(model)
    changed = any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    hf_rollouts, vllm_rollouts = rollouts(HFEngine(model, tok, recipe.pool.names, 32)), rollouts(engine)
    hf, vllm = tiers(hf_rollouts), tiers(vllm_rollouts)
    Path(out_path).write_text(json.dumps({
        "iteration": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        "weights_changed": changed, "hf_routes": hf, "vllm_routes": vllm, "stale_routes": stale,
        "routes_changed": stale != hf,
        # per episode: 0 where the engines wrote the same tokens, else transformers' logit gap where they split
        "split_gaps": [first_split_gap(a, b) for a, b in zip(hf_rollouts, vllm_rollouts)],
    }))
