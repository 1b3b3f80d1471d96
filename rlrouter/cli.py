"""The ``rlrouter`` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from envs.budget import parse_budget_arg


def _eval(args) -> int:
    from rlrouter.config import load_recipe
    from rlrouter.evaluate.job import eval_recipe

    recipe = load_recipe(args.recipe)
    budgets = [b for spec in args.budget for b in parse_budget_arg(spec)] if args.budget else None
    policies = args.policies.split(",") if args.policies else None
    result = eval_recipe(recipe, budgets=budgets, tasks=args.tasks, seed=args.seed, out_dir=args.out,
                         policies=policies, checkpoint=args.checkpoint, progress=not args.quiet)
    _print_eval(result)
    return 0


def _print_eval(result) -> None:
    from rlrouter.evaluate.report import curves_table, markdown_table

    print(markdown_table(result["rows"]))
    if result.get("curves"):
        print("\n" + curves_table(result["curves"]))
    print(f"\ntaxonomy of the {result['meta']['tasks']} tasks: {result['meta']['taxonomy_counts']}")
    for kind, path in result["paths"].items():
        print(f"{kind}: {path}")


def _synth(args) -> int:
    import json

    from rlrouter.config import load_recipe
    from rlrouter.pipeline import run_synth

    result = run_synth(load_recipe(args.recipe), out_dir=args.out, progress=not args.quiet)
    print(json.dumps(result["report"], indent=1))
    print(f"written: {result['dir']}")
    return 0


def _sft(args) -> int:
    from rlrouter.config import load_recipe
    from rlrouter.pipeline import run_sft_stage

    path = run_sft_stage(load_recipe(args.recipe), synth_dir=args.synth_dir, out_dir=args.out, resume=args.resume,
                         progress=not args.quiet)
    print(f"checkpoint: {path}")
    return 0


def _rl(args) -> int:
    from rlrouter.config import load_recipe
    from rlrouter.pipeline import run_rl_stage

    recipe = load_recipe(args.recipe)
    path = run_rl_stage(recipe, init=args.init, out_dir=args.out, resume=args.resume, progress=not args.quiet,
                        use_ray=args.ray or bool(args.address), address=args.address)
    _print_rl_summary(path)
    return 0


def _print_rl_summary(path) -> None:
    import json
    from pathlib import Path

    last = json.loads((Path(path) / "rlrouter.json").read_text())["rl"]["last_metrics"]
    keys = ("iteration", "reward", "success", "cost_usd", "large_fraction", "well_formed", "approx_kl", "clipfrac",
            "entropy", "tokens_per_s")
    print("last iteration: " + ", ".join(f"{k} {last[k]:.4g}" for k in keys if k in last))
    print(f"checkpoint: {path}", flush=True)


def _train(args) -> int:
    from pathlib import Path

    from rlrouter.config import load_recipe
    from rlrouter.evaluate.job import eval_recipe
    from rlrouter.pipeline import run_rl_stage, run_sft_stage, run_synth

    recipe = load_recipe(args.recipe)
    checkpoint, trained = None, {}  # the last checkpoint, and every router to evaluate by name
    for stage in recipe.stages:
        print(f"== stage: {stage}", flush=True)
        if stage == "synth":
            if args.resume and (recipe.synth_dir() / "dataset").is_dir():
                print(f"resume: keeping {recipe.synth_dir()}", flush=True)
                continue
            report = run_synth(recipe, progress=not args.quiet)["report"]
            print(f"synthesized {report['examples']} conversations from {report['tasks']} tasks "
                  f"(taxonomy {report['taxonomy_counts']})", flush=True)
        elif stage == "sft":
            if args.resume and (recipe.sft_dir() / "rlrouter.json").is_file() and "rl" in recipe.stages:
                print(f"resume: keeping {recipe.sft_dir()}", flush=True)
                checkpoint = trained["sft"] = recipe.sft_dir()
                continue
            checkpoint = trained["sft"] = run_sft_stage(recipe, progress=not args.quiet)
            print(f"checkpoint: {checkpoint}", flush=True)
        elif stage == "rl":
            resume = args.resume and (recipe.rl_dir() / "trainer_state" / "state.json").is_file()
            checkpoint = run_rl_stage(recipe, init=checkpoint, resume=resume, progress=not args.quiet,
                                      use_ray=args.ray or bool(args.address), address=args.address)
            trained[recipe.rl.algorithm] = checkpoint
            _print_rl_summary(Path(checkpoint))
        elif stage == "eval":
            _print_eval(eval_recipe(recipe, checkpoint=trained or None, progress=not args.quiet))
    return 0


def _report(args) -> int:
    from rlrouter.config import load_recipe
    from rlrouter.evaluate.ablation import VARIANTS, ablation_table, run_report

    recipe = load_recipe(args.recipe)
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = args.variants.split(",") if args.variants else list(VARIANTS)
    if args.iterations:
        recipe.rl.iterations = args.iterations
    from rlrouter.pipeline import run_rl_stage

    result = run_report(recipe, run_rl_stage, seeds, variants, out_dir=args.out, tasks=args.tasks,
                        progress=not args.quiet)
    print(ablation_table(result["rows"]))
    for kind, path in result["paths"].items():
        print(f"{kind}: {path}")
    return 0


def _boundary(args) -> int:
    import json
    from pathlib import Path

    import numpy as np

    from rlrouter.boundary import boundary_runs, classify, taxonomy_counts
    from rlrouter.config import load_recipe

    recipe = load_recipe(args.recipe)
    env = recipe.make_env(args.split)
    ids = env.task_ids[: args.tasks] if args.tasks else env.task_ids
    stats = boundary_runs(env, ids, k=args.k or recipe.eval.boundary_k, seed=recipe.seed, progress=not args.quiet)
    theta = recipe.eval.taxonomy_threshold
    labels = {t: classify(s.s_small, s.s_large, theta) for t, s in stats.items()}
    counts = taxonomy_counts(labels)
    summary = {
        "recipe": recipe.name,
        "split": args.split,
        "tasks": len(ids),
        "k": args.k or recipe.eval.boundary_k,
        "always_small_success": float(np.mean([s.s_small for s in stats.values()])),
        "always_large_success": float(np.mean([s.s_large for s in stats.values()])),
        "always_small_mean_cost_usd": float(np.mean([s.c_small for s in stats.values()])),
        "always_large_mean_cost_usd": float(np.mean([s.c_large for s in stats.values()])),
        "taxonomy_counts": counts,
        "taxonomy_fractions": {k: v / len(ids) for k, v in counts.items()},
    }
    print(json.dumps(summary, indent=1))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"summary": summary, "tasks": {t: {**s.to_dict(), "taxonomy": labels[t]}
                                                                 for t, s in stats.items()}}, indent=1))
        print(f"written: {out}")
    return 0


def _check(args) -> int:
    from rlrouter.config import load_recipe

    recipe = load_recipe(args.recipe)
    print(f"{args.recipe}: ok (world {recipe.world.get('kind')}, tiers {recipe.pool.names}, "
          f"stages {recipe.stages}, budgets {[b.label for b in recipe.budgets()]})")
    return 0


def _traffic(args) -> int:
    from rlrouter.config import load_recipe
    from rlrouter.serve.traffic import print_report, traffic_data

    recipe = load_recipe(args.recipe)
    report = traffic_data(args.log, recipe, args.out)
    print_report(report, Path(args.out))
    return 0


def _serve(args) -> int:
    from rlrouter.serve import serve

    serve(args.checkpoint, args.pool, host=args.host, port=args.port, max_model_len=args.max_model_len,
          gpu_memory_utilization=args.gpu_memory_utilization, dtype=args.dtype, log_level=args.log_level,
          enforce_eager=args.enforce_eager)
    return 0


def _ray_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ray", action="store_true",
                   help="RL stage on Ray: rollout actors + Ray Train learner (starts a local cluster if none)")
    p.add_argument("--address", help="join this Ray cluster (e.g. 127.0.0.1:6379); implies --ray")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlrouter", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("eval", help="evaluate baselines on held-out tasks under per-task budgets")
    p.add_argument("recipe", help="recipe YAML (e.g. recipes/quickstart.yaml)")
    p.add_argument("--budget", action="append",
                   help="budget spec, repeatable: none | usd=0.05 | large_calls=5,10,15 | usd=0.05+large_calls=5")
    p.add_argument("--tasks", type=int, help="number of held-out tasks (default: recipe eval.tasks)")
    p.add_argument("--seed", type=int, help="seed (default: recipe seed)")
    p.add_argument("--policies", help="comma-separated baselines and embedding routers (knn, mlp, mf) "
                   "(default: recipe eval.policies)")
    p.add_argument("--out", help="output folder (default: recipe eval.out_dir or runs/<name>/eval)")
    p.add_argument("--checkpoint", help="a router checkpoint to evaluate beside the baselines")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_eval)

    p = sub.add_parser("synth", help="boundary runs, taxonomy and stratified SFT data synthesis")
    p.add_argument("recipe")
    p.add_argument("--out", help="output folder (default: recipe synth.out_dir or runs/<name>/synth)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_synth)

    p = sub.add_parser("sft", help="fine-tune the router LLM on the synthesized data (TRL SFTTrainer)")
    p.add_argument("recipe")
    p.add_argument("--synth-dir", help="synthesized data (default: the recipe's synth folder)")
    p.add_argument("--out", help="checkpoint folder (default: recipe sft.out_dir or runs/<name>/sft)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint's trainer_state")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_sft)

    p = sub.add_parser("rl", help="reinforcement learning from the SFT router (GRPO, BoPO or PPO)")
    p.add_argument("recipe")
    p.add_argument("--init", help="checkpoint to start from (default: rl.init or the SFT checkpoint)")
    p.add_argument("--out", help="checkpoint folder (default: rl.out_dir or runs/<name>/rl)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint's trainer_state")
    _ray_arguments(p)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_rl)

    p = sub.add_parser("train", help="run the recipe's stages in order")
    p.add_argument("recipe")
    p.add_argument("--resume", action="store_true",
                   help="keep finished stages' outputs and continue RL from its last checkpoint")
    _ray_arguments(p)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_train)

    p = sub.add_parser("report", help="RL ablation: baselines, SFT and RL variants over seeds (mean ± std)")
    p.add_argument("recipe")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated RL seeds (default 0,1,2)")
    p.add_argument("--variants", help="comma-separated: grpo+cost,bopo-no-ref,bopo-no-bonus,bopo,ppo (default all)")
    p.add_argument("--iterations", type=int, help="RL iterations per run (default: the recipe's rl.iterations)")
    p.add_argument("--tasks", type=int, help="held-out tasks (default: recipe eval.tasks)")
    p.add_argument("--out", help="output folder (default runs/<name>/report)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_report)

    p = sub.add_parser("boundary", help="boundary runs (always-small / always-large) and the task taxonomy")
    p.add_argument("recipe")
    p.add_argument("--split", default="train")
    p.add_argument("--tasks", type=int, help="first N tasks of the split (default: all)")
    p.add_argument("--k", type=int, help="runs per task and tier (default: recipe eval.boundary_k)")
    p.add_argument("--out", help="write per-task statistics as JSON here")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_boundary)

    p = sub.add_parser("serve", help="serve a router checkpoint with vLLM behind an OpenAI-compatible API")
    p.add_argument("--checkpoint", required=True, help="router checkpoint folder (e.g. runs/quickstart/rl)")
    p.add_argument("--pool", required=True, help="pool config YAML: endpoints, prices, limits (recipes/serve/pool.yaml)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-model-len", type=int, default=2048, help="router context length")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.5,
                   help="vLLM memory fraction (on CPU: of the KV cache space)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--enforce-eager", action="store_true",
                   help="skip vLLM's graph compilation (starts faster; for small routers on CPU and for tests)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=_serve)

    p = sub.add_parser("traffic", help="the gateway's traffic log (tasks with outcomes) as a replay table and SFT data")
    p.add_argument("log", nargs="+", help="the JSONL file(s) of server.traffic_log (one per replica)")
    p.add_argument("--recipe", required=True, help="the recipe the next router trains with (its pool and tiers)")
    p.add_argument("--out", required=True, help="output folder: replay.jsonl, dataset/ (for rlrouter sft "
                                                "--synth-dir), report.json")
    p.set_defaults(func=_traffic)

    p = sub.add_parser("check", help="validate a recipe")
    p.add_argument("recipe")
    p.set_defaults(func=_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"rlrouter {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
