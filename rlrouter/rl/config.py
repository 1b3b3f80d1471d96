"""The recipe's ``rl:`` section: every knob of the RL stage, named once, with its default.

Grouped as TRL's ``GRPOConfig`` groups its fields: the algorithm, the batch, the reward,
the update, PPO, and where things run. Each field is checked when the recipe loads, and a
bad value names the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from envs.budget import parse_budgets
from rlrouter.boundary.runs import LABELS
from rlrouter.rl.rewards import REWARD_KINDS, RewardSpec

ALGORITHMS = ("grpo", "bopo", "ppo")
CREDITS = ("episode", "tree")


@dataclass
class RLConfig:
    """Recipe ``rl:`` section.

    Algorithm (``advantages.ESTIMATORS``: the only place the three differ):
        algorithm: ``bopo`` (reference-guided advantage), ``grpo`` (group-normalized) or
            ``ppo`` (value head, GAE over router turns).
        credit: GRPO / BoPO: ``episode`` (every turn gets the episode's advantage) or
            ``tree`` (only the turns where a group's rollouts chose differently get credit,
            from the group's prefix tree; ``advantages.tree_advantages``). PPO's credit is
            its value function: it takes ``episode`` only.
        ref_weight_small / ref_weight_large: BoPO's baseline weights of the always-small /
            always-large rewards (0 and 0: no reference, the group mean).

    Batch (what one iteration plays):
        iterations: policy updates.
        tasks_per_iteration / group_size: tasks per batch and rollouts per task (G).
        split / tasks: training tasks (the first N ids; BoPO needs their boundary statistics,
            which the synth stage saved for exactly these).
        task_taxonomy: boundary classes of the training tasks to train on (default all three;
            e.g. ``[hard]``: only tasks where the large model is what makes the difference).
        budgets: budget specs; each group draws one and its prompts show it.
        temperature: sampling temperature of rollouts.

    Reward (``rewards.py``):
        reward: ``bopo`` (boundary-relative, difficulty bonus) or ``cost`` (1[success] − λ·$).
        cost_lambda: λ, the price of cost in the reward: a number, or [low, high] drawn per
            group. The one λ of a recipe: nothing else trains on a cost weight.
        hard_bonus: β, the bopo reward's bonus for solving a hard task.
        cost_clip: C_max, the cap of the normalized cost.
        format_penalty: reward lost per fully malformed episode (scaled by malformed share).

    Update (``loss.py``):
        learning_rate / max_grad_norm: AdamW step size and gradient clipping.
        epochs / minibatches / micro_batch_size: update passes per batch, optimizer steps per
            pass, sequences per forward pass (gradient accumulation inside a minibatch).
        clip_eps: PPO ratio clip ε (every algorithm uses the clipped surrogate).
        kl_coef: weight of KL(π‖π_init) (k3 estimator); 0 skips the reference model.
        entropy_coef: entropy bonus.
        loss_tokens: ``all`` (think text and route) or ``route`` (the route decision only;
            think text is still generated, and conditions the route, but gets no gradient).
        lora / lora_r / lora_alpha: train LoRA adapters (peft) instead of all weights; the
            saved checkpoint is merged.

    PPO:
        gamma / gae_lambda: discount and GAE λ over router turns.
        value_coef / value_learning_rate: value loss weight and the value head's step size.

    Where it runs, and what it writes:
        init: checkpoint to start from (default: the recipe's SFT checkpoint).
        engine: rollout engine, ``hf`` (transformers generate) or ``vllm`` (in-process engine).
        device: where the policy trains and generates: ``auto`` (CUDA when available, else
            CPU), ``cpu``, ``cuda`` or ``cuda:N``.
        rollout_shards: shards an iteration's episodes are cut into, each played as one
            batch with its own seed (``workers.py``); in process they run one after another,
            with ``--ray`` on ``ray.rollout_workers`` actors at once. Same value, same
            episodes, however many actors play them.
        save_every: iterations between checkpoints (the last iteration is always saved).
        out_dir: default ``runs/<name>/rl``.
    """

    # algorithm
    algorithm: str = "bopo"
    credit: str = "episode"
    ref_weight_small: float = 0.25
    ref_weight_large: float = 0.25
    # batch
    iterations: int = 20
    tasks_per_iteration: int = 16
    group_size: int = 8
    split: str = "train"
    tasks: int = 400
    task_taxonomy: list = field(default_factory=lambda: list(LABELS))
    budgets: list = field(default_factory=lambda: ["none"])
    temperature: float = 1.0
    # reward
    reward: str = "bopo"
    cost_lambda: list | float = field(default_factory=lambda: [0.5, 0.5])
    hard_bonus: float = 0.5
    cost_clip: float = 2.0
    format_penalty: float = 0.5
    # update
    learning_rate: float = 1e-4
    max_grad_norm: float = 1.0
    epochs: int = 1
    minibatches: int = 1
    micro_batch_size: int = 128
    clip_eps: float = 0.2
    kl_coef: float = 0.0
    entropy_coef: float = 0.0
    loss_tokens: str = "all"
    lora: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    # PPO
    gamma: float = 1.0
    gae_lambda: float = 0.95
    value_coef: float = 0.5
    value_learning_rate: float = 1e-3
    # where it runs, what it writes
    init: str | None = None
    engine: str = "hf"
    device: str = "auto"
    rollout_shards: int = 1
    save_every: int = 5
    out_dir: str | None = None

    def __post_init__(self):
        choices = {"algorithm": ALGORITHMS, "credit": CREDITS, "reward": REWARD_KINDS, "engine": ("hf", "vllm"),
                   "loss_tokens": ("all", "route")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"rl.{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        if self.algorithm == "ppo" and self.credit != "episode":
            raise ValueError(f"rl.credit {self.credit!r} is GRPO/BoPO credit; PPO credits turns with its value "
                             "function: set rl.credit: episode (or leave it out)")
        if self.device != "auto" and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"rl.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        low, high = self.lambda_range()
        if not 0 <= low <= high:
            raise ValueError(f"rl.cost_lambda must be a number or [low, high] with 0 <= low <= high, "
                             f"got {self.cost_lambda}")
        if not self.task_taxonomy or set(self.task_taxonomy) - set(LABELS):
            raise ValueError(f"rl.task_taxonomy must be a non-empty subset of [easy, hard, intractable], "
                             f"got {self.task_taxonomy!r}")
        if self.group_size < 2:
            raise ValueError(f"rl.group_size must be >= 2 (advantages compare rollouts of a task), "
                             f"got {self.group_size}")
        for name in ("iterations", "tasks_per_iteration", "epochs", "minibatches", "micro_batch_size", "save_every",
                     "rollout_shards"):
            if getattr(self, name) < 1:
                raise ValueError(f"rl.{name} must be >= 1, got {getattr(self, name)}")
        parse_budgets(self.budgets, where="rl.budgets")

    def lambda_range(self) -> tuple[float, float]:
        if isinstance(self.cost_lambda, (int, float)):
            return float(self.cost_lambda), float(self.cost_lambda)
        if isinstance(self.cost_lambda, list) and len(self.cost_lambda) == 2:
            return float(self.cost_lambda[0]), float(self.cost_lambda[1])
        raise ValueError(f"rl.cost_lambda must be a number or [low, high], got {self.cost_lambda!r}")

    def reward_spec(self) -> RewardSpec:
        return RewardSpec(self.reward, self.hard_bonus, self.cost_clip, self.format_penalty)
