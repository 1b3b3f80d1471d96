"""The stages of a recipe, each callable alone (``rlrouter synth|sft|eval``) or in order
(``rlrouter train``): synth -> sft -> rl -> eval."""

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
        hard_seeds=cfg.hard_seeds, hard_labels=cfg.hard_labels, hindsight_draws=cfg.hindsight_draws,
        hindsight_tolerance=cfg.hindsight_tolerance, relabel_p=cfg.relabel_p, progress=progress)
    out = save_synthesis(Path(out_dir) if out_dir else recipe.synth_dir(), dataset, stats, labels, report)
    write_boundary_report(out, stats, labels, title=f"{recipe.name}: boundary runs ({cfg.split})")
    return {"dir": out, "report": report, "dataset": dataset}


def build_router(recipe: Recipe, dataset):
    """(model, tokenizer): the tiny router with a tokenizer trained on the dataset, or
    ``router.base`` with the format tags added as tokens and the router's chat template."""
    from rlrouter.router.checkpoint import load_router
    from rlrouter.router.model import as_router, build_tiny_router, keep_first_layers, train_tokenizer

    if recipe.router.base != "tiny":
        model, tokenizer = as_router(*load_router(recipe.router.base))
        return keep_first_layers(model, recipe.router.base_layers), tokenizer
    texts = ("\n".join(m["content"] for m in messages) for messages in dataset["messages"])
    tokenizer = train_tokenizer(texts, recipe.router.tiny_config().vocab_size)
    return build_tiny_router(tokenizer, recipe.router.tiny_config(), seed=recipe.seed), tokenizer


def run_sft_stage(recipe: Recipe, synth_dir: str | Path | None = None, out_dir: str | Path | None = None,
                  resume: bool = False, progress: bool = True) -> Path:
    from datasets import load_from_disk

    from rlrouter.router.model import freeze_below
    from rlrouter.router.prompt import RouterFormat
    from rlrouter.sft.train import run_sft

    synth_dir = Path(synth_dir) if synth_dir else recipe.synth_dir()
    if not (synth_dir / "dataset").is_dir():
        raise FileNotFoundError(f"no synthesized dataset at {synth_dir / 'dataset'}; run `rlrouter synth` first")
    dataset = load_from_disk(str(synth_dir / "dataset"))
    if recipe.router.prompt_mode == "step":
        from rlrouter.boundary.synthesis import step_examples

        dataset = step_examples(dataset)
    fmt = recipe.router.format()
    out_dir = Path(out_dir) if out_dir else recipe.sft_dir()
    resume_from = None
    if resume:
        from rlrouter.router.checkpoint import load_checkpoint

        model, tokenizer, _ = load_checkpoint(out_dir, recipe.pool.names)
        model.train()
        resume_from = out_dir / "trainer_state"
    else:
        model, tokenizer = build_router(recipe, dataset)
    if fmt != RouterFormat():  # the synthesized turns are think/route with whole prompts: rewrite and cut them
        dataset = dataset.map(lambda row: {"messages": fmt.as_training_example(tokenizer, row["messages"])},
                              desc="turn format")
    cut = fmt.cut_report(tokenizer, dataset["messages"]) if fmt.max_prompt_tokens else None
    if cut and cut["cut"]:
        print(f"router.max_prompt_tokens = {cut['max_prompt_tokens']} cut {cut['cut']} of {cut['prompts']} training "
              f"prompts in the middle (median {cut['median_tokens_cut']:g} tokens cut, "
              f"{cut['median_user_tokens_kept']:g} of the step text kept; the system message counts against the "
              "limit): raise router.max_prompt_tokens to keep more", flush=True)
    freeze_below(model, recipe.router.train_layers)
    meta = {
        "pool": recipe.pool.describe(),
        "budgets": [b.to_dict() for b in recipe.synth_budgets()],
        "router": {"base": recipe.router.base, "prompt_mode": recipe.router.prompt_mode,
                   "history_window": recipe.env.history_window,
                   "max_new_tokens": recipe.router.max_new_tokens, "format": fmt.to_dict(),
                   "train_layers": recipe.router.train_layers, "base_layers": recipe.router.base_layers},
        "training": {"recipe": recipe.name, "seed": recipe.seed, "synth_dir": str(synth_dir), "prompt_cut": cut},
    }
    return run_sft(model, tokenizer, dataset, recipe.sft, out_dir, meta, seed=recipe.seed,
                   resume_from=resume_from, progress=progress)


def run_rl_stage(recipe: Recipe, init: str | Path | None = None, out_dir: str | Path | None = None,
                 resume: bool = False, progress: bool = True, stop_after: int | None = None,
                 use_ray: bool = False, address: str | None = None) -> Path:
    """RL from the SFT checkpoint (or ``rl.init`` / ``init``) -> ``<rl dir>`` checkpoint.

    ``resume`` continues from ``out_dir``'s ``trainer_state/`` (same metrics as an
    uninterrupted run); ``stop_after`` ends after that many iterations (tests, debugging).
    ``use_ray`` runs the rollouts on Ray actors and the learner under Ray Train
    (``rlrouter.distributed``), joining the cluster at ``address`` or starting a local one.
    """
    out_dir = Path(out_dir) if out_dir else recipe.rl_dir()
    init = Path(init or recipe.rl.init or recipe.sft_dir())
    if resume and not (out_dir / "trainer_state" / "state.json").is_file():
        raise FileNotFoundError(f"cannot resume: {out_dir}/trainer_state/state.json not found")
    if use_ray:
        from rlrouter.distributed import run_rl_on_ray

        return run_rl_on_ray(recipe, build_rl_trainer, init, out_dir, resume=resume, progress=progress,
                             address=address)
    trainer = build_rl_trainer(recipe, init, out_dir, resume=resume)
    if progress:
        print(f"rl: {recipe.rl.algorithm} on {trainer.device}, {recipe.rl.engine} rollouts", flush=True)
    try:
        return trainer.train(progress=progress, stop_after=stop_after)
    finally:
        trainer.rollouts.close()  # a vLLM engine shuts down before the eval stage starts its own (VLLMEngine.close)


def build_rl_trainer(recipe: Recipe, init: Path, out_dir: Path, resume: bool = False,
                     state_dir: Path | None = None, synth_dir: Path | None = None):
    """The ``RLTrainer`` of a recipe, on the in-process engine. ``resume`` restores model,
    optimizer and history from ``state_dir`` (default ``out_dir``): a checkpoint with
    ``trainer_state/``. The Ray learner builds its trainer here too."""
    from rlrouter.boundary.runs import LABELS
    from rlrouter.rl.trainer import RLTrainer, load_boundaries
    from rlrouter.router.checkpoint import load_checkpoint
    from rlrouter.router.model import freeze_below

    cfg = recipe.rl
    state_dir = Path(state_dir or out_dir)
    start_from = state_dir if resume else init
    model, tokenizer, ckpt_meta = load_checkpoint(init if (resume and cfg.lora) else start_from, recipe.pool.names)
    freeze_below(model, ckpt_meta.get("router", {}).get("train_layers"))
    if resume and cfg.lora:  # the checkpoint is merged; training continues on the adapter over the init weights
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(state_dir / "trainer_state" / "adapter"), is_trainable=True)
    env = recipe.make_env(cfg.split)
    if cfg.tasks > len(env.task_ids):
        raise ValueError(f"rl.tasks = {cfg.tasks}, but split {cfg.split!r} has only {len(env.task_ids)} tasks")
    world = env.world
    boundaries = load_boundaries(Path(synth_dir or recipe.synth_dir()) / "boundary.json")
    prompt_mode = ckpt_meta.get("router", {}).get("prompt_mode", recipe.router.prompt_mode)
    meta = {key: ckpt_meta[key] for key in ("pool", "budgets", "router", "training") if key in ckpt_meta}
    meta["training"] = {**meta.get("training", {}), "rl_init": str(init)}
    engine = None
    if cfg.engine == "vllm":
        engine = recipe.vllm_engine(start_from, tokenizer, ckpt_meta)
    task_ids = env.task_ids[: cfg.tasks]
    if set(cfg.task_taxonomy) != set(LABELS):
        task_ids = [t for t in task_ids if t in boundaries and boundaries[t].taxonomy in cfg.task_taxonomy]
        if not task_ids:
            raise ValueError(f"rl.task_taxonomy {cfg.task_taxonomy}: none of the {cfg.tasks} training tasks is of "
                             "these classes (see the synth stage's boundary report)")
    trainer = RLTrainer(model, tokenizer, cfg, lambda: recipe.make_env(cfg.split, world=world),
                        task_ids, boundaries, recipe.pool.names, out_dir, meta, seed=recipe.seed,
                        prompt_mode=prompt_mode, max_new_tokens=recipe.router.max_new_tokens, engine=engine)
    meta["training"]["rl_device"] = str(trainer.device)  # the trainer keeps this dict and saves it
    if resume:
        trainer.load_state(state_dir)
    return trainer
