"""The RL trainer: GRPO, BoPO and PPO on multi-turn routing episodes.

One iteration (``RLTrainer.iterate``) reads as the algorithm:

1. **sample** ``tasks_per_iteration`` training tasks; each group gets one budget, one λ
   and one episode seed (so its ``group_size`` rollouts differ only by the router's choices);
2. **rollout**: play every group with the current policy (``rlrouter.router.episodes``,
   through ``workers.py``: in process, or on Ray actors);
3. **score** each episode (``rewards.py``);
4. **advantages** from ``advantages.ESTIMATORS[algorithm]`` (the only place the three
   algorithms differ; PPO's values come from one no-grad pass of the value head first);
5. **update**: ``epochs`` passes of ``minibatches`` optimizer steps with the token-level
   clipped loss (``loss.py``) on the packed sequences (``packing.py``);
6. **log** CleanRL's diagnostics (reward, success, cost, large fraction, approx_kl,
   clipfrac, entropy, explained variance for PPO, generated tokens/s) and every
   ``save_every`` iterations write an rlrouter checkpoint with ``trainer_state/``.

All randomness of iteration i comes from generators seeded with (seed, i), so a run
resumed from the checkpoint of iteration i continues exactly as the uninterrupted run.
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from envs.budget import parse_budgets
from rlrouter.rl.advantages import ESTIMATORS, Episodes, explained_variance
from rlrouter.rl.config import RLConfig
from rlrouter.rl.loss import ValueHead, clipped_policy_loss, clipped_value_loss
from rlrouter.rl.packing import Batch, build_batch, learnable, packed_forward, scored_positions, tail
from rlrouter.rl.parallel import distributed_rank, from_lead, sum_gradients, sum_statistics
from rlrouter.rl.rewards import TaskBoundary, episode_reward, reference_rewards
from rlrouter.rl.workers import LocalRollouts, RolloutWorker, shard_seed
from rlrouter.router.checkpoint import save_checkpoint
from rlrouter.router.episodes import EpisodeSpec, Rollout
from rlrouter.router.generation import HFEngine
from rlrouter.router.prompt import RouterFormat
from rlrouter.router.model import default_device


def seed_iteration(seed: int, iteration: int) -> np.random.Generator:
    """The iteration's generator; torch is seeded with shard 0's seed."""
    torch.manual_seed(shard_seed(seed, iteration, 0))
    return np.random.default_rng([seed, iteration])


class RLTrainer:
    """Trains a router LLM with GRPO / BoPO / PPO; see the module docstring.

    ``make_env`` builds a fresh training ``RoutingEnv``; ``boundaries`` are the training
    tasks' boundary statistics (``load_boundaries``); ``meta`` is written into every
    checkpoint. ``engine`` (default: transformers on the policy itself) and ``rollouts``
    (default: shards in this process) say who plays the episodes.
    """

    def __init__(self, model, tokenizer, config: RLConfig, make_env: Callable, task_ids: list[str],
                 boundaries: dict[str, TaskBoundary], tiers: list[str], out_dir: str | Path, meta: dict,
                 seed: int = 0, prompt_mode: str = "step", max_new_tokens: int = 32, engine=None, rollouts=None):
        self.config = cfg = config
        self.tokenizer = tokenizer
        self.task_ids = list(task_ids)
        self.boundaries = boundaries
        self.tiers = list(tiers)
        self.out_dir = Path(out_dir)
        self.meta = meta
        self.seed = seed
        self.prompt_mode = prompt_mode
        self.budgets = parse_budgets(cfg.budgets, where="rl.budgets")
        self.reward_spec = cfg.reward_spec()
        missing = [t for t in self.task_ids if t not in boundaries]
        if (cfg.reward == "bopo" or cfg.algorithm == "bopo") and missing:
            raise ValueError(f"rl: no boundary statistics for {len(missing)} training tasks (e.g. {missing[0]}); "
                             f"rl.tasks must not exceed synth.tasks on the same split")
        if cfg.lora and not hasattr(model, "peft_config"):  # a resumed run arrives wrapped
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                                     target_modules="all-linear", task_type="CAUSAL_LM"))
        self.device = torch.device(default_device() if cfg.device == "auto" else cfg.device)
        self.model = model.to(self.device)
        self.model.train()
        self.ref_model = copy.deepcopy(model).eval() if cfg.kl_coef else None
        params = [{"params": [p for p in self.model.parameters() if p.requires_grad], "lr": cfg.learning_rate}]
        self.value_head = None
        if cfg.algorithm == "ppo":
            self.value_head = ValueHead(self.model.config.hidden_size).to(self.device)
            params.append({"params": list(self.value_head.parameters()), "lr": cfg.value_learning_rate})
        self.optimizer = torch.optim.AdamW(params, weight_decay=0.0)
        self.format = RouterFormat.from_meta(meta)  # the turn format and prompt cut the checkpoint was trained with
        engine = engine or HFEngine(self.model, tokenizer, self.tiers, max_new_tokens, format=self.format)
        self.rollouts = rollouts or LocalRollouts(RolloutWorker(engine, make_env, prompt_mode), cfg.rollout_shards)
        self.rank, self.world_size = distributed_rank()
        self.on_iteration: Callable[[dict, Path | None], None] | None = None  # called after each iteration
        self.iteration = 0
        self.history: list[dict] = []

    # -- one iteration ----------------------------------------------------------------------
    def iterate(self) -> dict:
        """rollout -> score -> advantages -> update, then the iteration's diagnostics."""
        cfg = self.config
        rng = seed_iteration(self.seed, self.iteration)
        groups = self.sample_groups(rng)  # 1. (spec, λ) per group
        start = time.perf_counter()
        rollouts, shard_stats = self.play([spec for spec, _ in groups for _ in range(cfg.group_size)])  # 2.
        rollout_s = time.perf_counter() - start
        start = time.perf_counter()
        episodes = self.score(groups, rollouts)  # 3. episode rewards
        batch = build_batch(rollouts, self.tokenizer, self.prompt_mode, cfg.loss_tokens)
        if self.value_head is not None:
            episodes.values = self.values(rollouts, batch)
        advantages, returns = ESTIMATORS[cfg.algorithm](episodes, cfg)  # 4. the algorithms differ only here
        batch.set_targets(advantages, returns, episodes.values)
        update_stats = self.update(batch, rng)  # 5. clipped loss, optimizer steps
        update_s = time.perf_counter() - start
        sync_s = self.rollouts.sync(self._merged_model()) if self.rank == 0 else 0.0
        self.iteration += 1
        generated = sum(len(t.completion_ids) for ro in rollouts for t in ro.turns)
        metrics = {"iteration": self.iteration, **self.episode_metrics(rollouts, episodes, advantages, returns),
                   **update_stats, "generated_tokens": generated, "tokens_per_s": generated / rollout_s,
                   "rollout_s": rollout_s, "update_s": update_s, "weight_sync_s": sync_s, **shard_stats}
        self.history.append(metrics)
        return metrics

    def sample_groups(self, rng: np.random.Generator) -> list[tuple[EpisodeSpec, float]]:
        """Step 1: the iteration's tasks, each with its budget, episode seed and λ."""
        cfg = self.config
        low, high = cfg.lambda_range()
        picks = rng.choice(len(self.task_ids), size=min(cfg.tasks_per_iteration, len(self.task_ids)), replace=False)
        groups = []
        for index in picks:
            budget = self.budgets[rng.integers(len(self.budgets))]
            cost_lambda = float(rng.uniform(low, high)) if high > low else low
            groups.append((EpisodeSpec(self.task_ids[index], budget, int(rng.integers(2**31 - 1))), cost_lambda))
        return groups

    def play(self, specs: list[EpisodeSpec]) -> tuple[list[Rollout], dict]:
        """Step 2: the first learner plays ``specs`` (seeded by the iteration); every learner gets them."""
        played = None
        if self.rank == 0:
            played = self.rollouts.play(specs, self.seed, self.iteration, self.config.temperature)
        return from_lead(played, self.world_size)

    def score(self, groups: list[tuple[EpisodeSpec, float]], rollouts: list[Rollout]) -> Episodes:
        """Step 3: every episode's reward, its group, its routes and (BoPO) the group's
        reference rewards. ``rollouts`` are the groups' ``group_size`` rollouts, in order."""
        size = self.config.group_size
        rewards, references = [], []
        for g, (spec, cost_lambda) in enumerate(groups):
            boundary = self.boundaries.get(spec.task_id)
            refs = (reference_rewards(self.reward_spec, boundary, cost_lambda) if self.config.algorithm == "bopo"
                    else (np.nan, np.nan))
            for ro in rollouts[g * size:(g + 1) * size]:
                rewards.append(episode_reward(self.reward_spec, ro.success, ro.cost_usd, ro.malformed_fraction,
                                              cost_lambda, boundary))
                references.append(refs)
        return Episodes(np.array(rewards), np.repeat(np.arange(len(groups)), size),
                        [[self.tiers.index(t) for t in ro.routes] for ro in rollouts], np.array(references))

    @torch.no_grad()
    def values(self, rollouts: list[Rollout], batch: Batch) -> list[np.ndarray]:
        """PPO: V at every router turn of every rollout, from the current model and value head."""
        values: dict[tuple[int, int], float] = {}
        step = self.config.micro_batch_size
        for start in range(0, len(batch.input_ids), step):
            chunk = range(start, min(start + step, len(batch.input_ids)))
            _, _, hidden, offsets = packed_forward(self.model, self.tokenizer, [batch.input_ids[j] for j in chunk],
                                                   1, self.config.temperature, self.device, want_hidden=True)
            for row, j in enumerate(chunk):
                for k, pos in batch.value_positions[j]:
                    values[(batch.owner[j], k)] = float(self.value_head(hidden[row, offsets[row] + pos]))
        return [np.array([values[(i, k)] for k in range(len(ro.turns))]) for i, ro in enumerate(rollouts)]

    def episode_metrics(self, rollouts: list[Rollout], episodes: Episodes, advantages, returns) -> dict:
        """What the batch did: reward, success, cost, the priciest tier's share of turns, format."""
        turns = sum(len(ro.turns) for ro in rollouts)
        metrics = {
            "episodes": len(rollouts),
            "reward": float(episodes.rewards.mean()),
            "reward_std": float(episodes.rewards.std()),
            "success": float(np.mean([ro.success for ro in rollouts])),
            "cost_usd": float(np.mean([ro.cost_usd for ro in rollouts])),
            "large_fraction": float(sum(ro.calls.get(self.tiers[-1], 0) for ro in rollouts) / max(turns, 1)),
            "well_formed": float(1 - np.mean([ro.malformed_fraction for ro in rollouts])),
        }
        if episodes.values is None:  # groups where every turn got advantage 0 learn nothing
            metrics["zero_advantage_groups"] = float(np.mean([
                np.allclose(np.concatenate([advantages[i] for i in members]), 0) for members, _ in episodes.groups()]))
        else:
            metrics["explained_variance"] = explained_variance(np.concatenate(episodes.values), np.concatenate(returns))
        return metrics

    # -- 5. the update ------------------------------------------------------------------------
    def update(self, batch: Batch, rng: np.random.Generator) -> dict:
        """``epochs`` × ``minibatches`` optimizer steps over ``batch``; micro-batches
        accumulate the exact minibatch gradient (each loss is divided by the minibatch's
        token count), and learners share them (``parallel.py``)."""
        cfg = self.config
        n = len(batch.input_ids)
        sums = {"approx_kl": 0.0, "clipfrac": 0.0, "entropy": 0.0, "pg_loss": 0.0, "kl_ref": 0.0, "value_loss": 0.0}
        tokens_seen, grad_norms, logprob_gap = 0.0, [], []
        # Only a sequence with a non-zero advantage on a loss token adds to the policy
        # gradient; the value loss, the KL and the entropy bonus read every sequence.
        every = self.value_head is not None or self.ref_model is not None or cfg.entropy_coef != 0
        active = np.ones(n, dtype=bool) if every else learnable(batch)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        for epoch in range(cfg.epochs):
            for minibatch in np.array_split(rng.permutation(n), cfg.minibatches):
                n_tokens = float(sum(batch.loss_mask[j].sum() for j in minibatch)) or 1.0
                n_values = float(sum(len(batch.value_positions[j]) for j in minibatch)) or 1.0
                self.optimizer.zero_grad(set_to_none=True)
                trained = minibatch[active[minibatch]]
                starts = list(range(0, len(trained), cfg.micro_batch_size))
                for start in starts[self.rank::self.world_size]:
                    micro = trained[start:start + cfg.micro_batch_size]
                    first = epoch == 0 and start == 0  # before this update's first step
                    stats, tokens, gap = self._micro_batch(batch, micro, n_tokens, n_values, first)
                    if first:
                        logprob_gap.append(gap)
                    for key, value in stats.items():
                        sums[key] += value
                    tokens_seen += tokens
                for p in params:  # a minibatch with nothing to learn still steps the optimizer
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                sum_gradients(params, self.world_size)
                grad_norms.append(float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)))
                self.optimizer.step()
        sums, tokens_seen = sum_statistics(sums, tokens_seen, self.world_size)
        out = {key: value / max(tokens_seen, 1.0) for key, value in sums.items() if key != "value_loss"}
        if self.value_head is not None:
            out["value_loss"] = sums["value_loss"] / max(sum(len(p) for p in batch.value_positions) * cfg.epochs, 1)
        if self.ref_model is None:
            out.pop("kl_ref")
        out["grad_norm"] = float(np.mean(grad_norms))
        out["trained_fraction"] = float(active.mean()) if n else 0.0  # sequences that went through the update
        out["logprob_gap"] = float(np.mean(logprob_gap)) if logprob_gap else 0.0  # engine vs trainer, before the update
        return out

    def _micro_batch(self, batch: Batch, micro: np.ndarray, n_tokens: float, n_values: float,
                     measure_gap: bool = False) -> tuple[dict, float, float | None]:
        """Forward and backward of one micro-batch: (loss statistics, loss tokens, and with
        ``measure_gap`` the mean |log π − log π_old| over its loss tokens)."""
        cfg = self.config
        ids = [batch.input_ids[j] for j in micro]
        keep = scored_positions([batch.loss_mask[j] for j in micro])
        constraints = [batch.constraints[j] for j in micro]
        logp, entropy, hidden, offsets = packed_forward(self.model, self.tokenizer, ids, keep, cfg.temperature,
                                                        self.device, self.value_head is not None, constraints)
        mask, old, adv = (tail([getattr(batch, name)[j] for j in micro], keep, self.device)
                          for name in ("loss_mask", "old_logprobs", "advantages"))
        ref = None
        if self.ref_model is not None:
            with torch.no_grad():
                ref = packed_forward(self.ref_model, self.tokenizer, ids, keep, cfg.temperature, self.device,
                                     constraints=constraints)[0]
        loss, stats = clipped_policy_loss(logp, old, adv, mask, cfg.clip_eps, n_tokens, ref, cfg.kl_coef, entropy,
                                          cfg.entropy_coef)
        if self.value_head is not None:
            rows = [(r, offsets[r] + pos, batch.returns[j][i], batch.old_values[j][i])
                    for r, j in enumerate(micro) for i, (_, pos) in enumerate(batch.value_positions[j])]
            values = self.value_head(torch.stack([hidden[r, pos] for r, pos, _, _ in rows]))
            returns, old_values = (torch.tensor([row[k] for row in rows], device=self.device) for k in (2, 3))
            v_loss = clipped_value_loss(values, old_values, returns, cfg.clip_eps, n_values)
            loss = loss + cfg.value_coef * v_loss
            stats["value_loss"] = float(v_loss.detach()) * n_values
        loss.backward()
        gap = float(((logp.detach() - old).abs() * mask).sum() / mask.sum().clamp(min=1)) if measure_gap else None
        return stats, float(mask.sum()), gap

    # -- the loop, checkpoints and resume ---------------------------------------------------
    def train(self, progress: bool = True, metrics_path: str | Path | None = None,
              stop_after: int | None = None) -> Path:
        cfg = self.config
        lead = self.rank == 0  # only the first learner writes logs and checkpoints
        metrics_path = Path(metrics_path or self.out_dir.with_name(self.out_dir.name + "-metrics.jsonl"))
        writer = None
        if lead:
            metrics_path.parent.mkdir(parents=True, exist_ok=True)
            _truncate_metrics(metrics_path, self.iteration)
            writer = _tensorboard(metrics_path.with_suffix(""))
        bar = tqdm(total=cfg.iterations, initial=self.iteration, desc=f"rl ({cfg.algorithm})",
                   disable=not (progress and lead))
        while self.iteration < cfg.iterations and (stop_after is None or self.iteration < stop_after):
            metrics = self.iterate()
            saved = None
            if lead:
                with metrics_path.open("a") as handle:
                    handle.write(json.dumps(metrics) + "\n")
                if writer is not None:
                    for key, value in metrics.items():
                        writer.add_scalar(f"rl/{key}", value, self.iteration)
                if self.iteration % cfg.save_every == 0 or self.iteration == cfg.iterations:
                    saved = self.save()
            bar.set_postfix(reward=f"{metrics['reward']:.3f}", success=f"{metrics['success']:.2f}",
                            large=f"{metrics['large_fraction']:.2f}")
            bar.update(1)
            if self.on_iteration is not None:
                self.on_iteration(metrics, saved)
        bar.close()
        return self.out_dir

    def _merged_model(self):
        if not self.config.lora:
            return self.model
        return copy.deepcopy(self.model).merge_and_unload()

    def save(self) -> Path:
        summary = {k: v for k, v in (self.history[-1] if self.history else {}).items() if isinstance(v, (int, float))}
        meta = {**self.meta,
                "rl": {"settings": asdict(self.config), "iteration": self.iteration, "last_metrics": summary}}
        with tempfile.TemporaryDirectory() as tmp:
            state = Path(tmp) / "trainer_state"
            state.mkdir()
            torch.save(self.optimizer.state_dict(), state / "optimizer.pt")
            if self.value_head is not None:
                torch.save(self.value_head.state_dict(), state / "value_head.pt")
            if self.config.lora:
                self.model.save_pretrained(state / "adapter")
            (state / "state.json").write_text(json.dumps({"iteration": self.iteration, "history": self.history}))
            return save_checkpoint(self._merged_model(), self.tokenizer, self.out_dir, meta,
                                   extra_dirs={"trainer_state": state})

    def load_state(self, checkpoint: str | Path) -> None:
        """Restore optimizer, value head, iteration and history from ``checkpoint/trainer_state``."""
        state = Path(checkpoint) / "trainer_state"
        if not (state / "state.json").is_file():
            raise FileNotFoundError(f"{state}/state.json not found: {checkpoint} has no RL trainer state to resume")
        saved = json.loads((state / "state.json").read_text())
        self.iteration, self.history = saved["iteration"], saved["history"]
        self.optimizer.load_state_dict(torch.load(state / "optimizer.pt", weights_only=True, map_location=self.device))
        if self.value_head is not None:
            self.value_head.load_state_dict(torch.load(state / "value_head.pt", weights_only=True,
                                                       map_location=self.device))


def _truncate_metrics(path: Path, iteration: int) -> None:
    """Keep the metric lines of iterations <= ``iteration`` (a resumed run rewrites the rest)."""
    if not path.exists():
        return
    if iteration == 0:
        path.write_text("")
        return
    lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["iteration"] <= iteration]
    path.write_text("".join(line + "\n" for line in lines))


def _tensorboard(log_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(log_dir))
    except ImportError:
        return None


def load_boundaries(path: str | Path) -> dict[str, TaskBoundary]:
    """Per-task boundary statistics from the synth stage's ``boundary.json``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `rlrouter synth` first (BoPO needs the boundary statistics)")
    data = json.loads(path.read_text())
    return {t: TaskBoundary(d["s_small"], d["s_large"], d["c_small"], d["c_large"], d["taxonomy"])
            for t, d in data.items()}
