"""The router LLM as an evaluation policy: plays RoutingEnv episodes in lockstep batches,
with budgets enforced at decode time (``rlrouter.router.generation``), and reports them as
the same ``EpisodeRecord`` rows as the baselines."""

from __future__ import annotations

from tqdm.auto import tqdm

from envs.budget import Budget
from rlrouter.evaluate.runner import EpisodeRecord, budget_violated, episode_seed
from rlrouter.router.episodes import EpisodeSpec, play_episodes
from rlrouter.router.generation import HFEngine, with_route_bias
from rlrouter.router.prompt import RouterFormat


class RouterPolicy:
    """Greedy (default) or sampled router LLM over RoutingEnv episodes.

    Episodes are played by ``rlrouter.router.episodes.play_episodes`` — the same
    token-in/token-out code the RL stage trains on — with the transformers engine unless
    ``engine`` is given.
    """

    name = "router"

    def __init__(self, model, tokenizer, pool_names: list[str], max_new_tokens: int = 48, batch_size: int = 32,
                 do_sample: bool = False, temperature: float = 1.0, constrain: bool = True, route_bias: float = 0.0,
                 prompt_mode: str = "step", name: str = "router", engine=None, fmt: RouterFormat | None = None):
        if prompt_mode not in ("step", "episode"):
            raise ValueError(f"prompt_mode must be 'step' or 'episode', got {prompt_mode!r}")
        self.engine = engine or HFEngine(model, tokenizer, pool_names, max_new_tokens, route_bias, format=fmt)
        self.tokenizer = tokenizer
        self.pool_names = list(pool_names)
        self.batch_size = batch_size
        self.do_sample = do_sample
        self.temperature = temperature
        self.constrain = constrain
        self.prompt_mode = prompt_mode
        self.name = name

    @classmethod
    def from_checkpoint(cls, model, tokenizer, meta: dict, recipe, name: str = "router",
                        route_bias: float = 0.0, engine=None) -> "RouterPolicy":
        """A greedy router over a loaded checkpoint (``load_checkpoint``'s model, tokenizer and
        metadata): the recipe's generation settings and the prompt format the checkpoint was
        trained with (checkpoints older than step prompts used episode prompts). ``engine``
        (e.g. a ``VLLMEngine`` on the checkpoint) plays it at ``route_bias`` instead of
        transformers."""
        trained = meta.get("router", {})
        return cls(model, tokenizer, recipe.pool.names, max_new_tokens=recipe.router.max_new_tokens,
                   batch_size=recipe.router.batch_size, route_bias=route_bias, name=name,
                   prompt_mode=trained.get("prompt_mode", "episode"), fmt=RouterFormat.from_meta(meta),
                   engine=with_route_bias(engine, route_bias) if engine is not None else None)

    def play(self, env_factory, episodes: list[tuple[str, Budget, int]], progress: bool = True) -> list[EpisodeRecord]:
        """Play ``(task_id, budget, seed)`` episodes in lockstep batches."""
        records = []
        bar = tqdm(total=len(episodes), desc=f"{self.name} episodes", disable=not progress, leave=False)
        for start in range(0, len(episodes), self.batch_size):
            specs = [EpisodeSpec(t, b, s) for t, b, s in episodes[start:start + self.batch_size]]
            for rollout in play_episodes(self.engine, env_factory, specs, self.prompt_mode, sample=self.do_sample,
                                         temperature=self.temperature, constrain=self.constrain):
                info, spec = rollout.info, rollout.spec
                calls = dict(info["calls"])
                records.append(EpisodeRecord(
                    policy=self.name, budget=spec.budget.label, task_id=spec.task_id, success=bool(info["success"]),
                    cost_usd=float(info["cost_usd"]), calls=calls, steps=len(rollout.turns),
                    budget_exhausted=bool(info["budget_exhausted"]),
                    violation=budget_violated(spec.budget, float(info["cost_usd"]), calls),
                    switches=sum(a != b for a, b in zip(rollout.played, rollout.played[1:])),
                    input_tokens=sum(rollout.ledger["input_tokens"].values()),
                    cached_tokens=sum(rollout.ledger["cached_tokens"].values()),
                    extra={"well_formed": 1.0 - rollout.malformed_fraction, "turns": len(rollout.turns)},
                ))
            bar.update(len(specs))
        bar.close()
        return records

    def evaluate(self, env_factory, task_ids: list[str], budgets: list[Budget], seed: int,
                 progress: bool = True) -> list[EpisodeRecord]:
        """Same tasks and seeds as the baselines' ``evaluate`` (paired comparison)."""
        episodes = [(t, b, episode_seed(seed, i)) for b in budgets for i, t in enumerate(task_ids)]
        return self.play(env_factory, episodes, progress=progress)
