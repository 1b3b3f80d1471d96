"""The RL trainer: GRPO, BoPO and PPO on multi-turn routing episodes.

One iteration, top to bottom (``RLTrainer.iterate``):

1. sample ``tasks_per_iteration`` training tasks; each gets one budget and one cost weight
   λ (budget-conditioned training: both are drawn per group and written in the prompt);
2. play ``group_size`` rollouts per task with the current policy (same episode seed within
   a group, so rollouts differ only by the router's choices);
3. score each episode (``rewards.py``) and turn rewards into per-turn advantages
   (``advantages.py``: the only place the three algorithms differ);
4. ``epochs`` passes of ``minibatches`` optimizer steps over the batch with the token-level
   clipped loss (``loss.py``); micro-batches accumulate gradients exactly;
5. log the diagnostics (reward, success, cost, large fraction, approx_kl, clipfrac, entropy,
   explained variance for PPO, generated tokens/s) and, every ``save_every``
   iterations, write an rlrouter checkpoint with ``trainer_state/`` for exact resume.

All randomness of iteration i comes from generators seeded with (seed, i), so a run
resumed from the checkpoint of iteration i continues exactly as the uninterrupted run.
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from envs.budget import Budget
from rlrouter.boundary.runs import LABELS
from rlrouter.rl.advantages import (bopo_baseline, explained_variance, gae, grpo_baseline, node_members, normalized,
                                    tree_advantages)
from rlrouter.rl.loss import clipped_policy_loss, token_logprobs
from rlrouter.rl.rewards import REWARD_KINDS, RewardSpec, TaskBoundary, episode_reward, reference_rewards
from rlrouter.rl.rollout import (EpisodeSpec, HFEngine, Rollout, constraint_masks, play_episodes,
                                 training_sequences)
from rlrouter.rl.workers import LocalRollouts, RolloutWorker, shard_seed
from rlrouter.router.model import default_device

ALGORITHMS = ("grpo", "bopo", "ppo")


@dataclass
class RLSettings:
    """Recipe ``rl:`` section.

    Attributes:
        algorithm: ``bopo`` (reference-guided advantage), ``grpo`` (group-normalized) or
            ``ppo`` (value head, GAE over router turns).
        credit: ``episode`` (every turn gets the episode's advantage) or ``tree`` (GRPO/BoPO:
            only the turns where a group's rollouts chose differently get credit, from the
            prefix tree of the group; see ``advantages.tree_advantages``) or ``tree_tail``
            (tree, and the turns after a rollout's last split get its reward against the
            last node it shared: late decisions get credit too).
        branches: branch episodes per group (tree credit, step prompts; 0: none). After the
            group is played, this many of its turns where the whole prefix-tree node chose
            alike (mostly late turns, where a rollout is alone) are replayed from the same
            seed and take the other tier there; the rest is played by the policy. The branch
            joins that node of the tree, so the turn's credit compares the two tiers ((R_i −
            R_branch) / 2 for a rollout that was alone; ``advantages.tree_advantages`` with
            ``starts``). Costs one partial episode per branch; not turn 0 (see ``choose_branches``).
        branch_on: which of those turns may be branched: ``any``, or ``failure`` (only turns
            right after a failed step, where retrying with another tier is the decision).
        reward: ``bopo`` (boundary-relative, difficulty bonus) or ``cost`` (1[success] − λ·$).
        init: checkpoint to start from (default: the recipe's SFT checkpoint).
        engine: rollout engine, ``hf`` (transformers generate) or ``vllm`` (in-process engine).
        iterations: policy updates.
        tasks_per_iteration / group_size: tasks per batch and rollouts per task (G).
        split / tasks: training tasks (the first N ids; BoPO needs their boundary statistics,
            which the synth stage saved for exactly these).
        budgets: budget specs; each group draws one (budget-conditioned training).
        cost_lambda: [low, high] range of λ drawn per group (a number fixes it).
        prompt_cost_weight: write λ in the prompt ("Cost weight: 0.50") so one router serves
            any trade-off; evaluation then writes ``eval_cost_weight``.
        eval_cost_weight: λ written in evaluation prompts (default: the middle of the range).
        hard_bonus: β, the bopo reward's bonus for solving a hard task.
        cost_clip: C_max, the cap of the normalized cost.
        format_penalty: reward lost per fully malformed episode (scaled by malformed share).
        ref_weight_small / ref_weight_large: BoPO's baseline weights of the always-small /
            always-large rewards (0 and 0: no reference, the group mean).
        learning_rate / max_grad_norm: AdamW step size and gradient clipping.
        epochs / minibatches / micro_batch_size: update passes per batch, optimizer steps per
            pass, sequences per forward pass (gradient accumulation inside a minibatch).
        clip_eps: PPO ratio clip ε.
        kl_coef: weight of KL(π‖π_init) (k3 estimator); 0 skips the reference model.
        entropy_coef: entropy bonus.
        temperature: sampling temperature of rollouts.
        gamma / gae_lambda / value_coef / value_learning_rate: PPO's discount, GAE λ, value
            loss weight and the value head's step size.
        lora: train LoRA adapters (peft) of rank ``lora_r`` instead of all weights; the
            saved checkpoint is merged.
        save_every: iterations between checkpoints (the last iteration is always saved).
        eval_every / eval_tasks: greedy evaluation on held-out tasks every N iterations
            (0: never) during training.
        out_dir: default ``runs/<name>/rl``.
        loss_tokens: which generated tokens the policy loss covers: ``all`` (think text and
            route) or ``route`` (the route decision only; think text is still generated, and
            conditions the route, but gets no gradient).
        device: where the policy trains and generates: ``auto`` (CUDA when available, else
            CPU), ``cpu``, ``cuda`` or ``cuda:N``.
        task_taxonomy: boundary classes of the training tasks to train on (default all three;
            e.g. ``[hard]``: only tasks where the large model is what makes the difference).
        rollout_shards: shards an iteration's episodes are cut into, each played as one
            batch with its own seed (``workers.py``); in process they run one after another,
            with ``--ray`` on ``ray.rollout_workers`` actors at once. Same value, same
            episodes, however many actors play them.
    """

    algorithm: str = "bopo"
    credit: str = "episode"
    branches: int = 0
    branch_on: str = "any"
    reward: str = "bopo"
    init: str | None = None
    engine: str = "hf"
    iterations: int = 20
    tasks_per_iteration: int = 16
    group_size: int = 8
    split: str = "train"
    tasks: int = 400
    budgets: list = field(default_factory=lambda: ["none"])
    cost_lambda: list | float = field(default_factory=lambda: [0.5, 0.5])
    prompt_cost_weight: bool = False
    eval_cost_weight: float | None = None
    hard_bonus: float = 0.5
    cost_clip: float = 2.0
    format_penalty: float = 0.5
    ref_weight_small: float = 0.25
    ref_weight_large: float = 0.25
    learning_rate: float = 1e-4
    max_grad_norm: float = 1.0
    epochs: int = 1
    minibatches: int = 1
    micro_batch_size: int = 128
    clip_eps: float = 0.2
    kl_coef: float = 0.0
    entropy_coef: float = 0.0
    temperature: float = 1.0
    gamma: float = 1.0
    gae_lambda: float = 0.95
    value_coef: float = 0.5
    value_learning_rate: float = 1e-3
    lora: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    save_every: int = 5
    eval_every: int = 0
    eval_tasks: int = 50
    out_dir: str | None = None
    loss_tokens: str = "all"
    device: str = "auto"
    rollout_shards: int = 1
    task_taxonomy: list = field(default_factory=lambda: list(LABELS))

    def __post_init__(self):
        if self.loss_tokens not in ("all", "route"):
            raise ValueError(f"rl.loss_tokens must be 'all' or 'route', got {self.loss_tokens!r}")
        if self.device != "auto" and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"rl.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"rl.algorithm must be one of {list(ALGORITHMS)}, got {self.algorithm!r}")
        if self.reward not in REWARD_KINDS:
            raise ValueError(f"rl.reward must be one of {list(REWARD_KINDS)}, got {self.reward!r}")
        if self.credit not in ("episode", "tree", "tree_tail"):
            raise ValueError(f"rl.credit must be 'episode', 'tree' or 'tree_tail', got {self.credit!r}")
        if self.branches < 0:
            raise ValueError(f"rl.branches must be >= 0, got {self.branches}")
        if self.branch_on not in ("any", "failure"):
            raise ValueError(f"rl.branch_on must be 'any' or 'failure', got {self.branch_on!r}")
        if self.branches and (self.algorithm == "ppo" or self.credit == "episode"):
            raise ValueError("rl.branches gives tree credit: it needs rl.credit tree or tree_tail with grpo or bopo, "
                             f"got credit {self.credit!r} with {self.algorithm!r}")
        if self.engine not in ("hf", "vllm"):
            raise ValueError(f"rl.engine must be 'hf' or 'vllm', got {self.engine!r}")
        low, high = self.lambda_range()
        if not 0 <= low <= high:
            raise ValueError(f"rl.cost_lambda must be a number or [low, high] with 0 <= low <= high, got {self.cost_lambda}")
        if not self.task_taxonomy or set(self.task_taxonomy) - set(LABELS):
            raise ValueError(f"rl.task_taxonomy must be a non-empty subset of [easy, hard, intractable], "
                             f"got {self.task_taxonomy!r}")
        if self.group_size < 2:
            raise ValueError(f"rl.group_size must be >= 2 (advantages compare rollouts of a task), got {self.group_size}")
        for name in ("iterations", "tasks_per_iteration", "epochs", "minibatches", "micro_batch_size", "save_every",
                     "rollout_shards"):
            if getattr(self, name) < 1:
                raise ValueError(f"rl.{name} must be >= 1, got {getattr(self, name)}")

    def lambda_range(self) -> tuple[float, float]:
        if isinstance(self.cost_lambda, (int, float)):
            return float(self.cost_lambda), float(self.cost_lambda)
        if isinstance(self.cost_lambda, list) and len(self.cost_lambda) == 2:
            return float(self.cost_lambda[0]), float(self.cost_lambda[1])
        raise ValueError(f"rl.cost_lambda must be a number or [low, high], got {self.cost_lambda!r}")

    def default_cost_weight(self) -> float | None:
        if not self.prompt_cost_weight:
            return None
        return self.eval_cost_weight if self.eval_cost_weight is not None else float(np.mean(self.lambda_range()))

    def reward_spec(self) -> RewardSpec:
        return RewardSpec(self.reward, self.hard_bonus, self.cost_clip, self.format_penalty)


@dataclass
class Batch:
    """Training sequences of one iteration, with per-token targets aligned to logits
    position t (which scores token t + 1)."""

    input_ids: list[list[int]] = field(default_factory=list)
    loss_mask: list[np.ndarray] = field(default_factory=list)  # 1 on router tokens
    old_logprobs: list[np.ndarray] = field(default_factory=list)
    owner: list[int] = field(default_factory=list)  # the rollout each sequence comes from
    turn_index: list[np.ndarray] = field(default_factory=list)  # the turn that wrote each token (−1: none)
    advantages: list[np.ndarray] = field(default_factory=list)  # per token, from set_advantages
    constraints: list[list[tuple[int, list[int] | None]]] = field(default_factory=list)  # (position, allowed ids)
    value_positions: list[list[int]] = field(default_factory=list)  # PPO: where each turn's value is read
    returns: list[list[float]] = field(default_factory=list)  # PPO, one per value position
    old_values: list[list[float]] = field(default_factory=list)

    def set_advantages(self, per_rollout: list[np.ndarray]) -> None:
        """Spread each rollout's per-turn advantages over the tokens of its turns."""
        self.advantages = [np.where(t >= 0, per_rollout[i][np.maximum(t, 0)], 0.0)
                           for i, t in zip(self.owner, self.turn_index)]


class ValueHead(torch.nn.Module):
    """V(state) from the last hidden state at the token before a router turn (PPO)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden).squeeze(-1)


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) of this learner: (0, 1) unless torch.distributed is set up (Ray Train)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _seed_everything(seed: int, iteration: int) -> np.random.Generator:
    torch.manual_seed(shard_seed(seed, iteration, 0))  # the iteration's seed is shard 0's
    return np.random.default_rng([seed, iteration])


class RLTrainer:
    """Trains a router LLM with GRPO / BoPO / PPO; see the module docstring."""

    skip_zero_advantage = True  # sequences with nothing to learn skip the update (same gradient; False: all go)

    def __init__(self, model, tokenizer, settings: RLSettings, make_env: Callable, task_ids: list[str],
                 boundaries: dict[str, TaskBoundary], tiers: list[str], out_dir: str | Path, meta: dict,
                 seed: int = 0, prompt_mode: str = "step", max_new_tokens: int = 32,
                 eval_make_env: Callable | None = None, eval_task_ids: list[str] | None = None, engine=None,
                 rollouts=None):
        from rlrouter.config import parse_budgets

        self.settings = s = settings
        self.tokenizer = tokenizer
        self.make_env = make_env
        self.task_ids = list(task_ids)
        self.boundaries = boundaries
        self.tiers = list(tiers)
        self.out_dir = Path(out_dir)
        self.meta = meta
        self.seed = seed
        self.prompt_mode = prompt_mode
        self.max_new_tokens = max_new_tokens
        self.eval_make_env = eval_make_env
        self.eval_task_ids = eval_task_ids or []
        self.budgets = parse_budgets(s.budgets, where="rl.budgets")
        self.reward_spec = s.reward_spec()
        missing = [t for t in self.task_ids if t not in boundaries]
        if (s.reward == "bopo" or s.algorithm == "bopo") and missing:
            raise ValueError(f"rl: no boundary statistics for {len(missing)} training tasks (e.g. {missing[0]}); "
                             f"rl.tasks must not exceed synth.tasks on the same split")
        if s.lora and not hasattr(model, "peft_config"):  # a resumed run arrives wrapped
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=0.0,
                                                     target_modules="all-linear", task_type="CAUSAL_LM"))
        self.device = torch.device(default_device() if s.device == "auto" else s.device)
        self.model = model.to(self.device)
        self.model.train()
        self.ref_model = copy.deepcopy(model).eval() if s.kl_coef else None
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [{"params": params, "lr": s.learning_rate}]
        self.value_head = None
        if s.algorithm == "ppo":
            self.value_head = ValueHead(self.model.config.hidden_size).to(self.device)
            groups.append({"params": list(self.value_head.parameters()), "lr": s.value_learning_rate})
        self.optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
        # who plays the episodes: shards on this process's engine (transformers on the policy
        # itself unless another engine is given), or Ray actors (rlrouter.distributed)
        engine = engine or HFEngine(self.model, tokenizer, self.tiers, max_new_tokens)
        self.rollouts = rollouts or LocalRollouts(RolloutWorker(engine, make_env, prompt_mode), s.rollout_shards)
        self.rank, self.world_size = distributed_rank()
        self.on_iteration: Callable[[dict, Path | None], None] | None = None  # called after each iteration
        self.iteration = 0
        self.history: list[dict] = []
        self.min_shared_prefix = 16  # shorter shared prefixes are not worth a separate forward

    # -- 1. tasks, budgets and λ of an iteration -----------------------------------------
    def sample_groups(self, rng: np.random.Generator) -> list[list[EpisodeSpec]]:
        s = self.settings
        low, high = s.lambda_range()
        picks = rng.choice(len(self.task_ids), size=min(s.tasks_per_iteration, len(self.task_ids)), replace=False)
        groups = []
        for index in picks:
            budget = self.budgets[rng.integers(len(self.budgets))]
            cost_lambda = float(rng.uniform(low, high)) if high > low else low
            episode_seed = int(rng.integers(2**31 - 1))
            spec = EpisodeSpec(self.task_ids[index], budget, episode_seed,
                               round(cost_lambda, 2) if s.prompt_cost_weight else None)
            groups.append([(spec, cost_lambda)] * s.group_size)
        return groups

    # -- 3. rewards and advantages ----------------------------------------------------
    def score(self, groups, rollouts: list[list[Rollout]], branches: list[list[Rollout]] | None = None
              ) -> tuple[list[list[float]], list[list[np.ndarray]]]:
        """Rewards per rollout, and per-turn advantages per rollout, then per branch episode
        (``branches[g]``: group g's, scored in its prefix tree; their rewards are not returned)."""
        s = self.settings
        branches = branches or [[] for _ in groups]
        rewards, advantages = [], []
        for group, played, extra in zip(groups, rollouts, branches):
            spec, cost_lambda = group[0]
            boundary = self.boundaries.get(spec.task_id)
            members = played + extra  # the branch episodes join the group's prefix tree
            r_all = np.array([episode_reward(self.reward_spec, ro.success, ro.cost_usd, ro.malformed_fraction,
                                             cost_lambda, boundary) for ro in members])
            r = r_all[:len(played)]
            rewards.append(r.tolist())
            if s.algorithm == "ppo":
                advantages.append([None] * len(played))  # PPO: GAE after the value pass
                continue
            if s.algorithm == "grpo":
                baseline, scale = grpo_baseline(r)
            else:
                ref_small, ref_large = reference_rewards(self.reward_spec, boundary, cost_lambda)
                baseline, scale = bopo_baseline(r, ref_small, ref_large, s.ref_weight_small, s.ref_weight_large)
            if s.credit in ("tree", "tree_tail"):
                routes = [[self.tiers.index(t) for t in ro.routes] for ro in members]
                starts = [max(len(ro.spec.forced) - 1, 0) for ro in members]
                tree = tree_advantages(routes, r_all, baseline, scale, tail=s.credit == "tree_tail", starts=starts)
                advantages.append([turns[len(ro.spec.forced):] for turns, ro in zip(tree, members)])
            else:
                episode = normalized(r, baseline, scale)  # grpo_advantages / bopo_advantages
                advantages.append([np.full(len(ro.turns), a) for a, ro in zip(episode, played)])
        return rewards, advantages

    def build_batch(self, flat: list[Rollout]) -> Batch:
        """The training sequences of ``flat`` (advantages are set afterwards)."""
        batch = Batch()
        for i, rollout in enumerate(flat):
            for ids, mask, turn_index in training_sequences(rollout, self.prompt_mode):
                mask = np.asarray(mask[1:], dtype=np.float32)
                turn_index = np.asarray(turn_index[1:])
                old = np.zeros(len(ids) - 1, dtype=np.float32)
                positions, constraints = [], []
                for k, turn in enumerate(rollout.turns):
                    where = np.flatnonzero(turn_index == k)
                    if len(where):
                        old[where] = turn.logprobs
                        positions.append((k, int(where[0])))  # logits position before the turn's first token
                        for pos, allowed in zip(where, constraint_masks(self.tokenizer, turn)):
                            if allowed is None and self.settings.loss_tokens == "route":
                                mask[pos] = 0.0  # think text: generated, but no gradient (and not scored)
                            elif allowed != []:
                                constraints.append((int(pos), allowed))
                batch.input_ids.append(ids)
                batch.loss_mask.append(mask)
                batch.old_logprobs.append(old)
                batch.owner.append(i)
                batch.turn_index.append(turn_index)
                batch.value_positions.append(positions)
                batch.constraints.append(constraints)
        return batch

    # -- forward pass over a micro-batch ----------------------------------------------
    def _forward(self, model, ids_list: list[list[int]], keep: int, want_hidden: bool = False,
                 constraints: list[list[tuple[int, list[int] | None]]] | None = None):
        """Log-probs and entropies of the last ``keep`` − 1 tokens of each row.

        Two savings, both exact: (1) the prefix every row shares (the system prompt: most of a
        step-mode prompt) is run once and its key/value cache repeated over the batch — the
        gradient still flows through it; (2) rows are left-padded after that prefix so every
        sequence ends in the last column, and only the last ``keep`` positions go through
        the LM head (``logits_to_keep``), since the router's tokens sit at the end.
        ``constraints[row]`` lists (logits position, allowed token ids or None = think text,
        see ``RouteConstraint``): the route constraint the token was sampled under, applied again here so
        the log-probs are those of the distribution that was sampled.
        Returns (logp, entropy, hidden, offsets): ``hidden`` is the last hidden state of the
        non-shared part (PPO reads values from it) and row position p is at column
        p + ``offsets[row]``.
        """
        shortest = min(len(ids) for ids in ids_list)
        shared = 0
        limit = shortest - keep  # the scored positions must stay outside the shared prefix
        first = ids_list[0]
        while shared < limit and all(ids[shared] == first[shared] for ids in ids_list):
            shared += 1
        if shared < self.min_shared_prefix or len(ids_list) == 1:
            shared = 0
        cache = None
        if shared:
            cache = model(input_ids=torch.tensor([first[:shared]], device=self.device), use_cache=True).past_key_values
            cache.batch_repeat_interleave(len(ids_list))
        width = max(len(ids) for ids in ids_list) - shared
        input_ids = torch.full((len(ids_list), width), self.tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(ids_list), shared + width), dtype=torch.long)
        attention[:, :shared] = 1
        offsets = []
        for row, ids in enumerate(ids_list):
            n = len(ids) - shared
            input_ids[row, width - n:] = torch.tensor(ids[shared:])
            attention[row, shared + width - n:] = 1
            offsets.append(width - len(ids))
        # positions count real tokens only (pads between the prefix and the row do not advance them)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)[:, shared:]
        input_ids, attention, positions = (t.to(self.device) for t in (input_ids, attention, positions))
        out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, past_key_values=cache,
                    logits_to_keep=keep, output_hidden_states=want_hidden, use_cache=False)
        logits = out.logits / self.settings.temperature
        if constraints:
            from rlrouter.router.policy import think_banned_ids

            banned = torch.zeros(logits.shape, dtype=torch.bool)
            think_banned = think_banned_ids(self.tokenizer)
            for row, row_constraints in enumerate(constraints):
                for pos, allowed in row_constraints:
                    col = pos + offsets[row] - (width - keep)
                    if allowed is None:
                        banned[row, col, think_banned] = True
                    else:
                        banned[row, col, :] = True
                        banned[row, col, allowed] = False
            logits = logits.masked_fill(banned.to(self.device), float("-inf"))
        logp, entropy = token_logprobs(logits, input_ids[:, width - keep:])
        return logp, entropy, (out.hidden_states[-1] if want_hidden else None), offsets

    @staticmethod
    def _keep(loss_masks: list[np.ndarray]) -> int:
        """Positions the LM head must score: from the first router token of any row to the end."""
        return max(len(m) - int(np.flatnonzero(m)[0]) for m in loss_masks) + 1

    def _tail(self, arrays: list[np.ndarray], keep: int) -> torch.Tensor:
        """The last ``keep`` − 1 entries of per-position arrays, left-padded with zeros."""
        out = torch.zeros((len(arrays), keep - 1), dtype=torch.float32)
        for row, a in enumerate(arrays):
            a = np.asarray(a[-(keep - 1):], dtype=np.float32)
            out[row, keep - 1 - len(a):] = torch.from_numpy(a)
        return out.to(self.device)

    @torch.no_grad()
    def ppo_values(self, flat: list[Rollout], batch: Batch) -> list[np.ndarray]:
        """V at every router turn of every rollout, from the current model and value head."""
        values: dict[tuple[int, int], float] = {}
        step = self.settings.micro_batch_size
        for start in range(0, len(batch.input_ids), step):
            chunk = range(start, min(start + step, len(batch.input_ids)))
            _, _, hidden, offsets = self._forward(self.model, [batch.input_ids[j] for j in chunk], keep=1,
                                                  want_hidden=True)
            for row, j in enumerate(chunk):
                for k, pos in batch.value_positions[j]:
                    values[(batch.owner[j], k)] = float(self.value_head(hidden[row, offsets[row] + pos]))
        return [np.array([values[(i, k)] for k in range(len(ro.turns))]) for i, ro in enumerate(flat)]

    # -- 4. the update --------------------------------------------------------------------
    def update(self, batch: Batch, rng: np.random.Generator) -> dict:
        s = self.settings
        n = len(batch.input_ids)
        sums = {"approx_kl": 0.0, "clipfrac": 0.0, "entropy": 0.0, "pg_loss": 0.0, "kl_ref": 0.0, "value_loss": 0.0}
        tokens_seen, grad_norms = 0.0, []
        logprob_gap = []
        # A sequence whose loss tokens all have advantage 0 adds exactly nothing to the gradient
        # when no other term (value loss, KL, entropy bonus) reads it — with tree credit most
        # turns of a group share their route and get 0 — so only the others go through the
        # model. The loss is still divided by the whole minibatch's token count: same gradient.
        everything = not self.skip_zero_advantage or self.value_head is not None or self.ref_model is not None \
            or s.entropy_coef != 0
        active = np.array([everything or bool(np.any(batch.advantages[j][batch.loss_mask[j] > 0] != 0))
                           for j in range(n)], dtype=bool)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        for epoch in range(s.epochs):
            order = rng.permutation(n)
            for minibatch in np.array_split(order, s.minibatches):
                n_tokens = float(sum(batch.loss_mask[j].sum() for j in minibatch)) or 1.0
                n_values = float(sum(len(batch.value_positions[j]) for j in minibatch)) or 1.0
                self.optimizer.zero_grad(set_to_none=True)
                trained = minibatch[active[minibatch]]
                starts = list(range(0, len(trained), s.micro_batch_size))
                for start in starts[self.rank::self.world_size]:  # learners share the micro-batches (DDP)
                    micro = trained[start:start + s.micro_batch_size]
                    ids = [batch.input_ids[j] for j in micro]
                    keep = self._keep([batch.loss_mask[j] for j in micro])
                    constraints = [batch.constraints[j] for j in micro]
                    logp, entropy, hidden, offsets = self._forward(self.model, ids, keep,
                                                                   want_hidden=self.value_head is not None,
                                                                   constraints=constraints)
                    mask = self._tail([batch.loss_mask[j] for j in micro], keep)
                    old = self._tail([batch.old_logprobs[j] for j in micro], keep)
                    adv = self._tail([batch.advantages[j] for j in micro], keep)
                    ref = None
                    if self.ref_model is not None:
                        with torch.no_grad():
                            ref = self._forward(self.ref_model, ids, keep, constraints=constraints)[0]
                    loss, stats = clipped_policy_loss(logp, old, adv, mask, s.clip_eps, n_tokens, ref, s.kl_coef,
                                                      entropy, s.entropy_coef)
                    if epoch == 0 and start == 0:
                        logprob_gap.append(float(((logp.detach() - old).abs() * mask).sum() / mask.sum().clamp(min=1)))
                    if self.value_head is not None:  # clipped value loss (PPO2 / CleanRL)
                        rows = [(r, offsets[r] + pos, batch.returns[j][i], batch.old_values[j][i])
                                for r, j in enumerate(micro) for i, (_, pos) in enumerate(batch.value_positions[j])]
                        v = self.value_head(torch.stack([hidden[r, pos] for r, pos, _, _ in rows]))
                        ret = torch.tensor([x[2] for x in rows], device=self.device)
                        v_old = torch.tensor([x[3] for x in rows], device=self.device)
                        v_clip = v_old + (v - v_old).clamp(-s.clip_eps, s.clip_eps)
                        v_loss = 0.5 * torch.max((v - ret) ** 2, (v_clip - ret) ** 2).sum() / n_values
                        loss = loss + s.value_coef * v_loss
                        stats["value_loss"] = float(v_loss.detach()) * n_values
                    loss.backward()
                    for key, value in stats.items():
                        sums[key] += value
                    tokens_seen += float(mask.sum())
                for p in params:  # a minibatch with nothing to learn still steps the optimizer, as before
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                if self.world_size > 1:
                    _all_reduce_gradients(params)
                grad_norms.append(float(torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)))
                self.optimizer.step()
        if self.world_size > 1:  # statistics over every learner's micro-batches
            totals = torch.tensor([*sums.values(), tokens_seen], dtype=torch.float64)
            torch.distributed.all_reduce(totals)
            sums = dict(zip(sums, totals[:-1].tolist()))
            tokens_seen = float(totals[-1])
        out = {key: value / max(tokens_seen, 1.0) for key, value in sums.items() if key != "value_loss"}
        if self.value_head is not None:
            out["value_loss"] = sums["value_loss"] / max(sum(len(p) for p in batch.value_positions) * s.epochs, 1)
        if self.ref_model is None:
            out.pop("kl_ref")
        out["grad_norm"] = float(np.mean(grad_norms))
        out["trained_fraction"] = float(active.mean()) if n else 0.0  # sequences that went through the update
        out["logprob_gap"] = float(np.mean(logprob_gap)) if logprob_gap else 0.0  # engine vs trainer, before the update
        return out

    # -- one iteration --------------------------------------------------------------------
    def play(self, specs: list[EpisodeSpec], stream: int = 0) -> tuple[list[Rollout], dict]:
        """Rank 0 plays ``specs`` (seeded by the iteration and ``stream``); every learner gets them."""
        flat, stats = None, None
        if self.rank == 0:
            flat, stats = self.rollouts.play(specs, self.seed, self.iteration, self.settings.temperature, stream)
        if self.world_size > 1:  # every learner trains on the episodes rank 0 collected
            shared = [flat, stats]
            torch.distributed.broadcast_object_list(shared, src=0)
            flat, stats = shared
        return flat, stats

    def collect(self, rng: np.random.Generator) -> tuple[list, list[list[Rollout]], list[list[Rollout]], dict]:
        """Steps 1–2 of an iteration: draw the groups, play them, then their branch episodes
        (``rl.branches``). Returns groups, rollouts and branch episodes per group, and stats."""
        s = self.settings
        groups = self.sample_groups(rng)
        start = time.perf_counter()
        flat, stats = self.play([spec for group in groups for spec, _ in group])
        stats["rollout_s"] = time.perf_counter() - start
        played = [flat[g * s.group_size:(g + 1) * s.group_size] for g in range(len(groups))]
        branched = [[] for _ in groups]
        if s.branches:
            start = time.perf_counter()
            branch_specs = [choose_branches(group, s.branches, rng, s.branch_on) for group in played]
            branch_flat, _ = self.play([b for group in branch_specs for b in group], stream=1)
            sizes = np.cumsum([0] + [len(b) for b in branch_specs])
            branched = [branch_flat[a:b] for a, b in zip(sizes[:-1], sizes[1:])]
            stats.update(branch_metrics(played, branched, self.tiers[-1]), branch_rollout_s=time.perf_counter() - start)
        return groups, played, branched, stats

    def iterate(self) -> dict:
        s = self.settings
        rng = _seed_everything(self.seed, self.iteration)
        groups, played, branched, worker_stats = self.collect(rng)
        flat = [ro for group in played for ro in group]
        rollout_s = worker_stats.pop("rollout_s")
        metrics = {}
        rewards, advantages = self.score(groups, played, branched)
        flat_adv = [a for group in advantages for a in group]
        trained = [ro for group, extra in zip(played, branched) for ro in group + extra]
        start = time.perf_counter()
        batch = self.build_batch(trained)
        if s.algorithm == "ppo":
            values = self.ppo_values(flat, batch)
            flat_rewards = [r for group in rewards for r in group]
            flat_adv, returns = [], []
            for ro, v, r in zip(flat, values, flat_rewards):
                per_turn = np.zeros(len(ro.turns))
                per_turn[-1] = r  # the reward arrives at the end of the episode
                a, ret = gae(per_turn, v, s.gamma, s.gae_lambda)
                flat_adv.append(a)
                returns.append(ret)
            all_adv = np.concatenate(flat_adv)
            mean, std = all_adv.mean(), all_adv.std() + 1e-8
            flat_adv = [(a - mean) / std for a in flat_adv]  # advantage normalization over the batch
            metrics["explained_variance"] = explained_variance(np.concatenate(values), np.concatenate(returns))
            batch.returns = [[returns[i][k] for k, _ in pos] for i, pos in zip(batch.owner, batch.value_positions)]
            batch.old_values = [[values[i][k] for k, _ in pos] for i, pos in zip(batch.owner, batch.value_positions)]
        batch.set_advantages(flat_adv)
        metrics.update(self.update(batch, rng))
        update_s = time.perf_counter() - start
        sync_s = self.rollouts.sync(self._merged_model()) if self.rank == 0 else 0.0
        self.iteration += 1
        generated = sum(len(t.completion_ids) for ro in flat for t in ro.turns)
        turns = sum(len(ro.turns) for ro in flat)
        large = self.tiers[-1]
        all_rewards = np.array([r for group in rewards for r in group])
        metrics = {
            "iteration": self.iteration,
            "episodes": len(flat),
            "reward": float(all_rewards.mean()),
            "reward_std": float(all_rewards.std()),
            "success": float(np.mean([ro.success for ro in flat])),
            "cost_usd": float(np.mean([ro.cost_usd for ro in flat])),
            "large_fraction": float(sum(ro.calls.get(large, 0) for ro in flat) / max(turns, 1)),
            "well_formed": float(1 - np.mean([ro.malformed_fraction for ro in flat])),
            "zero_advantage_groups": float(np.mean([np.allclose(np.concatenate(g), 0) for g in advantages
                                                    if g[0] is not None])) if s.algorithm != "ppo" else 0.0,
            **metrics,
            "generated_tokens": generated,
            "tokens_per_s": generated / rollout_s,
            "rollout_s": rollout_s,
            "update_s": update_s,
            "weight_sync_s": sync_s,
            **worker_stats,
        }
        if s.eval_every and self.eval_make_env and self.iteration % s.eval_every == 0:
            metrics.update(self.evaluate())
        self.history.append(metrics)
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Greedy routes on held-out tasks with no budget: success, cost, large fraction."""
        from rlrouter.evaluate.runner import episode_seed

        specs = [EpisodeSpec(t, Budget(), episode_seed(self.seed, i), self.settings.default_cost_weight())
                 for i, t in enumerate(self.eval_task_ids[: self.settings.eval_tasks])]
        played = play_episodes(HFEngine(self.model, self.tokenizer, self.tiers, self.max_new_tokens),
                               self.eval_make_env, specs, self.prompt_mode)
        turns = sum(len(ro.turns) for ro in played)
        return {"eval_success": float(np.mean([ro.success for ro in played])),
                "eval_cost_usd": float(np.mean([ro.cost_usd for ro in played])),
                "eval_large_fraction": sum(ro.calls.get(self.tiers[-1], 0) for ro in played) / max(turns, 1)}

    # -- the loop, checkpoints and resume -------------------------------------------------
    def train(self, progress: bool = True, metrics_path: str | Path | None = None,
              stop_after: int | None = None) -> Path:
        s = self.settings
        lead = self.rank == 0  # only the first learner writes logs and checkpoints
        metrics_path = Path(metrics_path or self.out_dir.with_name(self.out_dir.name + "-metrics.jsonl"))
        writer = None
        if lead:
            metrics_path.parent.mkdir(parents=True, exist_ok=True)
            _truncate_metrics(metrics_path, self.iteration)
            writer = _tensorboard(metrics_path.with_suffix(""))
        bar = tqdm(total=s.iterations, initial=self.iteration, desc=f"rl ({s.algorithm})",
                   disable=not (progress and lead))
        while self.iteration < s.iterations and (stop_after is None or self.iteration < stop_after):
            metrics = self.iterate()
            saved = None
            if lead:
                with metrics_path.open("a") as handle:
                    handle.write(json.dumps(metrics) + "\n")
                if writer is not None:
                    for key, value in metrics.items():
                        writer.add_scalar(f"rl/{key}", value, self.iteration)
                if self.iteration % s.save_every == 0 or self.iteration == s.iterations:
                    saved = self.save()
            bar.set_postfix(reward=f"{metrics['reward']:.3f}", success=f"{metrics['success']:.2f}",
                            large=f"{metrics['large_fraction']:.2f}")
            bar.update(1)
            if self.on_iteration is not None:
                self.on_iteration(metrics, saved)
        bar.close()
        return self.out_dir

    def _merged_model(self):
        if not self.settings.lora:
            return self.model
        merged = copy.deepcopy(self.model)
        return merged.merge_and_unload()

    def save(self) -> Path:
        from rlrouter.router.checkpoint import save_checkpoint

        summary = {k: v for k, v in (self.history[-1] if self.history else {}).items() if isinstance(v, (int, float))}
        meta = {**self.meta,
                "rl": {"settings": asdict(self.settings), "iteration": self.iteration, "last_metrics": summary}}
        meta.setdefault("router", {})["cost_weight"] = self.settings.default_cost_weight()
        with tempfile.TemporaryDirectory() as tmp:
            state = Path(tmp) / "trainer_state"
            state.mkdir()
            torch.save(self.optimizer.state_dict(), state / "optimizer.pt")
            if self.value_head is not None:
                torch.save(self.value_head.state_dict(), state / "value_head.pt")
            if self.settings.lora:
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


def choose_branches(played: list[Rollout], k: int, rng: np.random.Generator, on: str = "any") -> list[EpisodeSpec]:
    """Up to ``k`` branch episodes for one group (``rl.branches``): each replays a rollout's
    routes up to a turn where its whole prefix-tree node chose alike (so tree credit gives
    that turn nothing) and takes another tier the budget allowed there. Turns in the same
    state (same prefix, same forced tier) are one candidate. Not turn 0: its credit is
    measured against the group's (BoPO: reference-mixed) baseline, which a branch does not change.
    ``on="failure"``: only turns right after a failed step."""
    routes = [ro.routes for ro in played]
    candidates = {}
    for ro in played:
        for t, turn in enumerate(ro.turns[1:], start=1):  # turn 0's credit is against the root's baseline
            if on == "failure" and not turn.after_failure:
                continue
            if any(routes[j][t] != turn.tier for j in node_members(routes, t, ro.routes)):
                continue  # the group already compares tiers here
            for tier in turn.allowed:
                if tier != turn.tier:
                    candidates.setdefault(tuple(ro.routes[:t]) + (tier,), ro.spec)
    keys = list(candidates)
    picks = rng.choice(len(keys), size=min(k, len(keys)), replace=False)
    return [replace(candidates[keys[c]], forced=keys[c]) for c in sorted(picks)]


def branch_metrics(played: list[list[Rollout]], branched: list[list[Rollout]], large: str) -> dict:
    """How many branch episodes, and the success they measured for the large tier: at each
    branched turn where one side took ``large``, success with it − success with the other
    tier (the node's rollouts' mean on their side)."""
    gains, episodes = [], 0
    for group, extra in zip(played, branched):
        for b in extra:
            episodes += 1
            t = len(b.spec.forced) - 1
            node = [group[j] for j in node_members([ro.routes for ro in group], t, b.spec.forced)]
            gap = b.success - np.mean([ro.success for ro in node])
            if large in (b.spec.forced[-1], node[0].routes[t]):
                gains.append(gap if b.spec.forced[-1] == large else -gap)
    return {"branch_episodes": episodes, "branch_large_success_gain": float(np.mean(gains)) if gains else 0.0}


def _all_reduce_gradients(params: list[torch.nn.Parameter]) -> None:
    """Sum every learner's gradients (each learner's loss is already normalized by the
    whole minibatch's token count, so the sum is the full minibatch's gradient)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        torch.distributed.all_reduce(p.grad)


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
