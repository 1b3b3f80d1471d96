"""Rollout overhead: multi-turn episodes vs pure generation of the same tokens.

Plays N routing episodes with an engine (sampling, log-probs, constrained routes, in
lockstep), recording every ``generate`` call. Then replays exactly those calls — same
prompts, same allowed tiers, same seeds — back to back, with no environment, prompt
building or parsing in between. The ratio rollout time / generation time is what the
episode machinery costs on top of the engine (goal ≤ 1.15×). Two ratios are printed:
against the replay (two timed passes, so it carries the machine's drift between them) and
against the generate time inside the rollout itself (one pass: what the episode code adds).

usage: python benchmarks/rollout.py [--engine hf|vllm|both] [--episodes 64] [--checkpoint DIR]
With no checkpoint, a tiny router is built and saved to a temp dir (untrained: it writes
long turns, which makes the overhead ratio a conservative, generation-light estimate only
if the router is trained; pass a trained checkpoint for the realistic number).
"""

from __future__ import annotations

import argparse
import json
import time

from common import router_checkpoint


class RecordingEngine:
    """Wraps an engine and records each generate call's arguments and torch seed."""

    def __init__(self, engine):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.tiers = engine.tiers
        self.format = engine.format
        self.calls = []
        self.seconds = 0.0

    def generate(self, prompts, allowed, **kwargs):
        import torch

        seed = int(torch.randint(0, 2**31 - 1, (1,)))
        torch.manual_seed(seed)
        self.calls.append((prompts, allowed, kwargs, seed))
        start = time.perf_counter()
        out = self.engine.generate(prompts, allowed, **kwargs)
        self.seconds += time.perf_counter() - start
        return out


def _reset_cache(engine) -> None:
    if hasattr(engine, "llm"):
        engine.llm.reset_prefix_cache()


def measure(engine, recipe, episodes: int) -> dict:
    import torch

    from envs import Budget
    from rlrouter.router.episodes import EpisodeSpec, play_episodes

    env = recipe.make_env("train")
    world = env.world
    specs = [EpisodeSpec(t, Budget(), seed=i) for i, t in enumerate(env.task_ids[:episodes])]
    recorder = RecordingEngine(engine)
    torch.manual_seed(0)
    play_episodes(recorder, lambda: recipe.make_env("train", world=world), specs, "step", sample=True,
                  logprobs=True)  # warm-up (first-call compilation, caches)
    recorder.calls.clear()
    recorder.seconds = 0.0
    _reset_cache(engine)
    torch.manual_seed(0)
    start = time.perf_counter()
    played = play_episodes(recorder, lambda: recipe.make_env("train", world=world), specs, "step", sample=True,
                           logprobs=True)
    rollout_s = time.perf_counter() - start
    _reset_cache(engine)  # the replay must not hit vLLM's prefix cache of the same prompts
    start = time.perf_counter()
    tokens = 0
    for prompts, allowed, kwargs, seed in recorder.calls:
        torch.manual_seed(seed)
        tokens += sum(len(g.ids) for g in engine.generate(prompts, allowed, **kwargs))
    generation_s = time.perf_counter() - start
    generated = sum(len(t.completion_ids) for r in played for t in r.turns)
    return {"engine": engine.name, "episodes": episodes, "turns": sum(len(r.turns) for r in played),
            "generate_calls": len(recorder.calls), "generated_tokens": generated, "replayed_tokens": tokens,
            "rollout_s": round(rollout_s, 3), "generate_s_inside_rollout": round(recorder.seconds, 3),
            "pure_generation_s": round(generation_s, 3),
            "ratio": round(rollout_s / generation_s, 3),
            "ratio_same_pass": round(rollout_s / recorder.seconds, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=["hf", "vllm", "both"], default="both")
    parser.add_argument("--episodes", type=int, default=64)
    parser.add_argument("--recipe", default="recipes/quickstart.yaml")
    parser.add_argument("--checkpoint", help="router checkpoint (default: runs/<recipe>/sft if present, else a "
                                             "freshly built tiny router)")
    args = parser.parse_args()

    from rlrouter.config import load_recipe
    from rlrouter.router.generation import HFEngine, VLLMEngine
    from rlrouter.router.checkpoint import load_checkpoint
    from rlrouter.router.prompt import RouterFormat

    recipe = load_recipe(args.recipe)
    checkpoint, tmp = router_checkpoint(recipe, args.checkpoint)
    model, tok, meta = load_checkpoint(checkpoint, recipe.pool.names)
    fmt = RouterFormat.from_meta(meta)  # the checkpoint's turn format and prompt cut
    rows = []
    if args.engine in ("hf", "both"):
        rows.append(measure(HFEngine(model, tok, recipe.pool.names, recipe.router.max_new_tokens, format=fmt), recipe,
                            args.episodes))
    if args.engine in ("vllm", "both"):
        engine = VLLMEngine(str(checkpoint), tok, recipe.pool.names, recipe.router.max_new_tokens, format=fmt)
        rows.append(measure(engine, recipe, args.episodes))
    print("| engine | episodes | turns | generate calls | tokens | rollout (s) | of which generate (s) | "
          "pure generation (s) | ratio vs replay | ratio vs its own generate |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['engine']} | {r['episodes']} | {r['turns']} | {r['generate_calls']} | {r['generated_tokens']} | "
              f"{r['rollout_s']} | {r['generate_s_inside_rollout']} | {r['pure_generation_s']} | {r['ratio']} | "
              f"{r['ratio_same_pass']} |")
    if len(rows) == 2:
        hf, vllm = (r["generated_tokens"] / r["rollout_s"] for r in rows)
        print(f"rollout tokens/s: hf {hf:.1f}, vllm {vllm:.1f}, vllm / hf {vllm / hf:.2f}x")
    print(json.dumps(rows))
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
