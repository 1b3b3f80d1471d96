"""The stages of a recipe, each callable alone (``rlrouter synth|sft|eval``) or in order
(``rlrouter train``): synth -> sft -> eval."""

from __future__ import annotations

from pathlib import Path

from rlrouter.config import Recipe


def run_synth(recipe: Recipe, out_dir: str | Path | None = None, progress: bool = True) -> dict:
    """Boundary runs, taxonomy and stratified synthesis -> ``<synth dir>/dataset`` etc."""
    from rlrouter.boundary.report import write_boundary_report
    from rlrouter.boundary.synthesis import save_synthesis, synthesize

    cfg = recipe.synth
    env = recipe.make_env(cfg.split)
    if cfg.tasks > len(env.task_ids):
        raise ValueError(f"synth.tasks = {cfg.tasks}, but split {cfg.split!r} has only {len(env.task_ids)} tasks")
    dataset, stats, labels, report = synthesize(
        env, env.task_ids[: cfg.tasks], recipe.synth_budgets(), seed=recipe.seed, k_boundary=cfg.boundary_k,
        theta=cfg.taxonomy_threshold, n_strata=cfg.n_strata, samples=cfg.samples, hard_repeat=cfg.hard_repeat,
        progress=progress)
    out = save_synthesis(Path(out_dir) if out_dir else recipe.synth_dir(), dataset, stats, labels, report)
    write_boundary_report(out, stats, labels, title=f"{recipe.name}: boundary runs ({cfg.split})")
    return {"dir": out, "report": report, "dataset": dataset}


def build_router(recipe: Recipe, dataset):
    """(model, tokenizer): the tiny router with a tokenizer trained on the dataset, or ``router.base``."""
    from rlrouter.router.checkpoint import load_router
    from rlrouter.router.model import build_tiny_router, train_tokenizer

    if recipe.router.base != "tiny":
        return load_router(recipe.router.base)
    texts = ("\n".join(m["content"] for m in messages) for messages in dataset["messages"])
    tokenizer = train_tokenizer(texts, recipe.router.tiny_config().vocab_size)
    return build_tiny_router(tokenizer, recipe.router.tiny_config(), seed=recipe.seed), tokenizer


def run_sft_stage(recipe: Recipe, synth_dir: str | Path | None = None, out_dir: str | Path | None = None,
                  resume: bool = False, progress: bool = True) -> Path:
    from datasets import load_from_disk

    from rlrouter.sft.train import run_sft

    synth_dir = Path(synth_dir) if synth_dir else recipe.synth_dir()
    if not (synth_dir / "dataset").is_dir():
        raise FileNotFoundError(f"no synthesized dataset at {synth_dir / 'dataset'}; run `rlrouter synth` first")
    dataset = load_from_disk(str(synth_dir / "dataset"))
    if recipe.router.prompt_mode == "step":
        from rlrouter.boundary.synthesis import step_examples

        dataset = step_examples(dataset)
    out_dir = Path(out_dir) if out_dir else recipe.sft_dir()
    resume_from = None
    if resume:
        from rlrouter.router.checkpoint import load_checkpoint

        model, tokenizer, _ = load_checkpoint(out_dir, recipe.pool.names)
        model.train()
        resume_from = out_dir / "trainer_state"
    else:
        model, tokenizer = build_router(recipe, dataset)
    meta = {
        "pool": recipe.pool.describe(),
        "budgets": [b.to_dict() for b in recipe.synth_budgets()],
        "cost_lambda": recipe.env.cost_lambda,
        "router": {"base": recipe.router.base, "prompt_mode": recipe.router.prompt_mode,
                   "max_new_tokens": recipe.router.max_new_tokens},
        "training": {"recipe": recipe.name, "seed": recipe.seed, "synth_dir": str(synth_dir)},
    }
    return run_sft(model, tokenizer, dataset, recipe.sft, out_dir, meta, seed=recipe.seed,
                   resume_from=resume_from, progress=progress)
