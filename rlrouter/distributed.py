"""The RL stage on a Ray cluster: rollout actors, and the learner placed by Ray Train.

``rlrouter train <recipe> --ray`` (or ``rlrouter rl ... --ray``) runs the RL stage as:

- a Ray Train ``TorchTrainer`` with ``ray.learner_workers`` workers. Each runs the same
  ``RLTrainer`` as an in-process run (built by the builder the pipeline hands in,
  ``pipeline.build_rl_trainer``); Ray only places it.
  With more than one learner, the first plays the iteration's episodes and broadcasts
  them, every learner takes its share of the micro-batches, and gradients are summed
  across learners before each optimizer step (``RLTrainer.update``), so the update is the
  one a single learner would make. Checkpoints are reported to Ray Train; a crashed
  learner is restarted (``ray.max_learner_failures``) and resumes from the last one.
- ``ray.rollout_workers`` rollout actors (default: one per shard), each holding a replica
  of the policy (built from the model config and tokenizer, weights sent through the
  object store after every update) and its own environments. The iteration's episodes are
  cut into ``rl.rollout_shards`` shards (``rl/workers.py``); a free actor takes the next
  shard and plays it as one batch, so an actor's environment steps never hold up another
  actor's generation, and the number of actors changes where episodes are played, never
  which. A dead actor is restarted by Ray (``ray.max_rollout_restarts``) and its shard is
  played again from the start with the same seed: nothing is counted twice (a shard's
  episodes are only taken from a call that finished) and nothing is lost.

Why replicas rather than one batched generator on the controller: the router is small and
its turns are short, so a replica costs little memory and a weight broadcast per update,
while a central generator would put a round trip per router turn between every
environment step and the next token, and would serialize workers on the slowest one.

Synthesis, SFT and evaluation run in the driver process as in a local run.
"""

from __future__ import annotations

import os
import shutil
from collections import deque
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from rlrouter.rl.workers import RolloutWorker, ShardResult, collect, shard_seed, shard_specs
from rlrouter.router.episodes import EpisodeSpec, Rollout
from rlrouter.router.generation import HFEngine


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster at ``address`` (or ``$RAY_ADDRESS``, as inside ``ray job submit``),
    or start a local one when there is none."""
    import ray

    if ray.is_initialized():
        return
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address or os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:  # a local cluster: its workers import rlrouter from this checkout, installed or not
        root = str(Path(__file__).resolve().parents[1])
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        ray.init(num_cpus=num_cpus, runtime_env={"env_vars": {"PYTHONPATH": path}})


class RolloutActorImpl:
    """The body of a rollout actor (``RolloutActor`` is this class as a Ray actor)."""

    def __init__(self, recipe, config, tokenizer, prompt_mode: str, split: str, threads: int = 1, fmt=None):
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(max(1, threads))
        model = AutoModelForCausalLM.from_config(config).eval()
        world = recipe.build_world()
        engine = HFEngine(model, tokenizer, recipe.pool.names, recipe.router.max_new_tokens, format=fmt)
        self.worker = RolloutWorker(engine, lambda: recipe.make_env(split, world=world), prompt_mode)
        self.version = -1

    def play(self, shard: int, specs: list[EpisodeSpec], torch_seed: int, temperature: float, weights: list,
             version: int) -> ShardResult:
        if version != self.version:  # new policy weights (or a restarted actor): load them once
            import ray

            self.worker.engine.model.load_state_dict(ray.get(weights[0]))
            self.version = version
        return self.worker.play(shard, specs, torch_seed, temperature)

    def pid(self) -> int:
        return os.getpid()


class RayRollouts:
    """Ray actors playing an iteration's shards; see the module docstring.

    ``shards`` (``rl.rollout_shards``) fixes the episodes; ``workers`` (``ray.rollout_workers``,
    default: one per shard) is how many actors play them. A free actor takes the next shard.
    """

    def __init__(self, recipe, model, tokenizer, prompt_mode: str, split: str, shards: int,
                 workers: int | None = None, cpus_per_worker: float = 1.0, max_restarts: int = 3, fmt=None):
        import ray

        actor = ray.remote(RolloutActorImpl)
        threads = max(1, int(cpus_per_worker))
        self.shards = shards
        self.actors = [actor.options(num_cpus=cpus_per_worker, max_restarts=max_restarts, max_task_retries=0)
                       .remote(recipe, model.config, tokenizer, prompt_mode, split, threads, fmt)
                       for a in range(workers or shards)]
        self.max_restarts = max_restarts
        self.restart_timeout_s = 300.0
        self.version = -1
        self.weights = None
        self.sync(model)

    def sync(self, model) -> float:
        """Put the policy's current weights in the object store; actors load them on their next shard."""
        import ray

        start = time.perf_counter()
        state = {name: t.detach().to("cpu", copy=True) for name, t in model.state_dict().items()}
        self.weights = [ray.put(state)]  # in a list so actors fetch it only when the version changed
        self.version += 1
        return time.perf_counter() - start

    def play(self, specs: list[EpisodeSpec], seed: int, iteration: int,
             temperature: float) -> tuple[list[Rollout], dict]:
        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        parts = shard_specs(specs, self.shards)
        todo = deque(range(len(parts)))
        queued, pending, results = time.time(), {}, []
        replays = [0] * len(parts)  # times shard k had to be played again
        restarting = [0.0] * len(self.actors)  # since when actor a is known to be restarting (0: it is not)

        def submit(k: int, a: int) -> None:
            ref = self.actors[a].play.remote(k, parts[k], shard_seed(seed, iteration, k), temperature,
                                             self.weights, self.version)
            pending[ref] = (k, a)

        for a in range(min(len(self.actors), len(todo))):
            submit(todo.popleft(), a)
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            k, a = pending.pop(ref)
            try:
                result = ray.get(ref)
            except (ActorDiedError, ActorUnavailableError, RayActorError) as err:
                if isinstance(err, ActorUnavailableError) and restarting[a]:  # still coming back: wait
                    if time.time() - restarting[a] > self.restart_timeout_s:
                        raise RuntimeError(f"rollout worker {a} did not come back within "
                                           f"{self.restart_timeout_s:.0f} s") from err
                    time.sleep(0.2)
                    submit(k, a)
                    continue
                replays[k] += 1
                restarting[a] = time.time()
                if replays[k] > self.max_restarts:
                    raise RuntimeError(f"shard {k} of iteration {iteration + 1} lost its worker {replays[k]} times; "
                                       "raise ray.max_rollout_restarts or look at the workers' logs") from err
                print(f"rollout worker {a} died ({type(err).__name__}); its shard of {len(parts[k])} episodes is "
                      "played again on the restarted worker", flush=True)
                submit(k, a)
                continue
            restarting[a] = 0.0
            result.stats.update(queue_wait_s=result.stats["started"] - queued, restarts=replays[k], actor=a)
            results.append(result)
            if todo:
                submit(todo.popleft(), a)
        return collect(results)

    def pids(self) -> list[int]:
        import ray

        return ray.get([a.pid.remote() for a in self.actors])

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)


def _learner_loop(config: dict) -> None:
    """One Ray Train worker: build the in-process trainer (``config["build_trainer"]``,
    the pipeline's builder), swap in Ray rollouts, train."""
    import ray.train
    from ray.train import Checkpoint

    recipe, out_dir = config["recipe"], Path(config["out_dir"])
    rank = ray.train.get_context().get_world_rank()
    resume, state_dir, scratch = config["resume"], out_dir, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # a restarted learner: continue from the last checkpoint it reported
        state_dir = out_dir if rank == 0 else Path(tempfile.mkdtemp(prefix="rlrouter-learner-"))
        scratch = None if rank == 0 else state_dir
        checkpoint.to_directory(str(state_dir))
        resume = True
    trainer = config["build_trainer"](recipe, Path(config["init"]), out_dir, resume=resume, state_dir=state_dir,
                               synth_dir=Path(config["synth_dir"]))
    if checkpoint is not None:
        print(f"learner {rank}: resuming from the checkpoint of iteration {trainer.iteration}", flush=True)
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)
    if rank == 0:
        workers = recipe.ray.rollout_workers or recipe.rl.rollout_shards
        trainer.rollouts = RayRollouts(recipe, trainer.model, trainer.tokenizer, trainer.prompt_mode, recipe.rl.split,
                                       recipe.rl.rollout_shards, workers, recipe.ray.rollout_cpus,
                                       recipe.ray.max_rollout_restarts, trainer.format)
        trainer.meta["training"]["ray"] = {"learner_workers": trainer.world_size, "rollout_workers": workers,
                                           "rollout_shards": recipe.rl.rollout_shards}
        sys.stdout.write(f"rl on ray: {recipe.rl.algorithm}, {trainer.world_size} learner(s) on {trainer.device}, "
                         f"{workers} rollout worker(s) for {recipe.rl.rollout_shards} shard(s)\n")
        sys.stdout.flush()

    def report(metrics: dict, saved: Path | None) -> None:
        if rank == 0:  # written, not printed: Ray Train's print patch would log each line twice
            sys.stdout.write(f"rl iteration {metrics['iteration']}/{recipe.rl.iterations}: reward "
                             f"{metrics['reward']:.3f} success {metrics['success']:.2f} "
                             f"cost ${metrics['cost_usd']:.4f} large {metrics['large_fraction']:.2f} "
                             f"({metrics['episodes'] / metrics['rollout_s']:.1f} episodes/s)\n")
            sys.stdout.flush()
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if saved is not None:
            ray.train.report(numbers, checkpoint=Checkpoint.from_directory(str(saved)))
        else:
            ray.train.report(numbers)

    trainer.on_iteration = report
    trainer.train(progress=False)


def run_rl_on_ray(recipe, build_trainer: Callable, init: Path, out_dir: Path, resume: bool = False,
                  progress: bool = True, address: str | None = None) -> Path:
    """The RL stage under Ray Train; returns the final checkpoint's directory (``out_dir``).
    ``build_trainer(recipe, init, out_dir, resume=, state_dir=, synth_dir=)`` builds each
    learner's ``RLTrainer`` (``pipeline.build_rl_trainer``): Ray places it, nothing more."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = recipe.ray
    connect(address, cfg.num_cpus)
    out_dir = Path(out_dir).resolve()
    storage = cfg.storage_path or str(out_dir.parent / "ray")
    if "://" not in storage:
        storage = str(Path(storage).resolve())
    resources = {"CPU": cfg.learner_cpus, **({"GPU": cfg.learner_gpus} if cfg.learner_gpus else {})}
    if cfg.learner_gpus == 0 and recipe.rl.device == "auto":
        recipe.rl.device = "cpu"  # a CPU learner even if the node it lands on has a GPU it did not reserve
    trainer = TorchTrainer(
        _learner_loop,
        train_loop_config={"recipe": recipe, "build_trainer": build_trainer, "init": str(Path(init).resolve()),
                           "out_dir": str(out_dir),
                           "resume": resume, "synth_dir": str(recipe.synth_dir().resolve())},
        scaling_config=ScalingConfig(num_workers=cfg.learner_workers, use_gpu=cfg.learner_gpus > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=f"{recipe.name}-rl-{int(time.time())}", storage_path=storage,
                             failure_config=FailureConfig(max_failures=cfg.max_learner_failures)),
    )
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"the RL stage failed on Ray: {result.error}") from result.error
    if result.checkpoint is None:
        raise RuntimeError("the RL stage on Ray reported no checkpoint")
    result.checkpoint.to_directory(str(out_dir))  # the learner may have run on another node
    if progress:
        print(f"rl on ray: checkpoint {out_dir} (Ray Train storage {result.checkpoint.path})", flush=True)
    return out_dir
