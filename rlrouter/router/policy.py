"""The router LLM as a policy: plays RoutingEnv episodes in batches, with budgets
enforced at decode time.

Constrained decoding: once the model writes ``<route>``, the only tokens it may produce are
those that continue the token sequence of a tier the budget allows (``info["action_mask"]``)
followed by ``</route>``, and after ``</route>`` only the end-of-turn token. A forbidden
tier therefore cannot be generated — the budget is respected by the generation itself,
not by overriding the output afterwards.

Episodes run in lockstep batches (one generate call per step for all live episodes, see
``rlrouter.rl.rollout``); each environment step uses the tolerant parser, and the strict
parser's verdict is recorded as the well-formedness of the route.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers import LogitsProcessor
from tqdm.auto import tqdm

from envs.budget import Budget
from rlrouter.evaluate.runner import EpisodeRecord, budget_violated, episode_seed
from rlrouter.router.prompt import (ROUTE_CLOSE, ROUTE_OPEN, THINK_CLOSE, THINK_OPEN, RouteFormatError,
                                    batch_prompt_token_ids, parse_strict, parse_tolerant)


class RouteConstraint(LogitsProcessor):
    """Keeps every router turn in the strict format ``<think>TEXT</think><route>TIER</route>``
    with TIER one of the row's allowed tiers (the tiers its budget can still pay for):

    - the turn opens with ``<think>``; the think text may not contain ``<`` (as the strict
      parser requires) and the turn cannot end inside it;
    - ``</think>`` is followed by ``<route>``, then the tokens of an allowed tier, then
      ``</route>``, then the end-of-turn token.

    A forbidden tier therefore cannot be generated, and only running out of
    ``max_new_tokens`` inside the think text can leave a turn malformed. vLLM applies the
    same rule as a structured-output regex (``rlrouter.rl.rollout``).

    ``route_bias`` (log-odds) is added to the first token of the priciest allowed tier right
    after ``<route>``: with two single-token tiers, greedy decoding then routes large iff
    P(large) / (P(large) + P(small)) >= sigmoid(-route_bias), the threshold knob of
    classic routers (0 = plain greedy).
    """

    def __init__(self, tokenizer, allowed: list[list[str]], prompt_length: int, route_bias: float = 0.0):
        self.open_id = tokenizer.convert_tokens_to_ids(ROUTE_OPEN)
        self.close_id = tokenizer.convert_tokens_to_ids(ROUTE_CLOSE)
        self.think_open_id = tokenizer.convert_tokens_to_ids(THINK_OPEN)
        self.think_close_id = tokenizer.convert_tokens_to_ids(THINK_CLOSE)
        self.eos_id = tokenizer.eos_token_id
        self.prompt_length = prompt_length
        self.sequences = [[tokenizer.encode(t, add_special_tokens=False) + [self.close_id] for t in row]
                          for row in allowed]
        self.route_bias = float(route_bias)
        self.think_banned = think_banned_ids(tokenizer)
        self._banned_tensor: torch.Tensor | None = None  # think_banned on the scores' device, made on first use

    def allowed_next(self, row: int, generated: list[int]) -> list[int] | None:
        """Token ids allowed next for ``row``; None = think text (anything but
        ``think_banned``: the end of turn and tokens containing ``<`` other than ``</think>``)."""
        if not generated:
            return [self.think_open_id]
        if self.open_id not in generated:
            return [self.open_id] if generated[-1] == self.think_close_id else None
        start = len(generated) - 1 - generated[::-1].index(self.open_id)
        suffix = generated[start + 1:]
        if self.close_id in suffix:
            return [self.eos_id]
        return sorted({seq[len(suffix)] for seq in self.sequences[row]
                       if len(seq) > len(suffix) and seq[: len(suffix)] == suffix}) or [self.eos_id]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """One decoding step for the whole batch: the rows' allowed sets are worked out in
        Python from one copy of the generated ids, then applied with a few batched tensor
        operations (per-row indexing cost a CUDA launch per row and step: 40% of an RL
        iteration on a GPU)."""
        scores = scores.clone()  # generate(output_logits=True) keeps the raw tensor: never edit it in place
        think_rows, forced_rows, keep_rows, keep_cols, bias_rows, bias_cols = [], [], [], [], [], []
        for row, generated in enumerate(input_ids[:, self.prompt_length:].tolist()):
            allowed = self.allowed_next(row, generated)
            if allowed is None:
                think_rows.append(row)  # inside the think text
                continue
            forced_rows.append(row)
            keep_rows += [row] * len(allowed)
            keep_cols += allowed
            if self.route_bias and generated and generated[-1] == self.open_id and len(self.sequences[row]) > 1:
                bias_rows.append(row)
                bias_cols.append(self.sequences[row][-1][0])
        device = scores.device
        if think_rows:
            rows = torch.tensor(think_rows, device=device)
            scores[rows[:, None], self._banned_on(device)[None, :]] = -float("inf")
        if forced_rows:
            rows, cols = torch.tensor(keep_rows, device=device), torch.tensor(keep_cols, device=device)
            keep = scores[rows, cols]
            scores[torch.tensor(forced_rows, device=device)] = -float("inf")
            scores[rows, cols] = keep
            if bias_rows:
                bias_at = (torch.tensor(bias_rows, device=device), torch.tensor(bias_cols, device=device))
                scores[bias_at] += self.route_bias
        return scores

    def _banned_on(self, device) -> torch.Tensor:
        if self._banned_tensor is None or self._banned_tensor.device != torch.device(device):
            self._banned_tensor = torch.tensor(self.think_banned, device=device)
        return self._banned_tensor


_THINK_BANNED: dict[int, list[int]] = {}


def think_banned_ids(tokenizer) -> list[int]:
    """Token ids that may not appear in think text: the end of turn, and every token whose
    text contains ``<`` except ``</think>`` (cached per tokenizer)."""
    key = id(tokenizer)
    if key not in _THINK_BANNED:
        close = tokenizer.convert_tokens_to_ids(THINK_CLOSE)
        banned = [i for i in range(len(tokenizer)) if i != close and "<" in tokenizer.decode([i])]
        _THINK_BANNED[key] = sorted(set(banned) | {tokenizer.eos_token_id})
    return _THINK_BANNED[key]


@dataclass
class Turn:
    text: str
    tier: str
    well_formed: bool


class RouterPolicy:
    """Greedy (default) or sampled router LLM over RoutingEnv episodes.

    Episodes are played by ``rlrouter.rl.rollout.play_episodes`` — the same token-in/token-out
    code the RL stage trains on — with the transformers engine unless ``engine`` is given.
    """

    name = "router"

    def __init__(self, model, tokenizer, pool_names: list[str], max_new_tokens: int = 48, batch_size: int = 32,
                 do_sample: bool = False, temperature: float = 1.0, constrain: bool = True, route_bias: float = 0.0,
                 prompt_mode: str = "step", name: str = "router", cost_weight: float | None = None, engine=None):
        from rlrouter.rl.rollout import HFEngine

        if prompt_mode not in ("step", "episode"):
            raise ValueError(f"prompt_mode must be 'step' or 'episode', got {prompt_mode!r}")
        self.engine = engine or HFEngine(model, tokenizer, pool_names, max_new_tokens, route_bias)
        self.tokenizer = tokenizer
        self.pool_names = list(pool_names)
        self.batch_size = batch_size
        self.do_sample = do_sample
        self.temperature = temperature
        self.constrain = constrain
        self.prompt_mode = prompt_mode
        self.name = name
        self.cost_weight = cost_weight

    @classmethod
    def from_checkpoint(cls, model, tokenizer, meta: dict, recipe, name: str = "router",
                        route_bias: float = 0.0) -> "RouterPolicy":
        """A greedy router over a loaded checkpoint (``load_checkpoint``'s model, tokenizer and
        metadata): the recipe's generation settings, the prompt format and cost weight the
        checkpoint was trained with (checkpoints older than step prompts used episode prompts)."""
        trained = meta.get("router", {})
        return cls(model, tokenizer, recipe.pool.names, max_new_tokens=recipe.router.max_new_tokens,
                   batch_size=recipe.router.batch_size, route_bias=route_bias, name=name,
                   prompt_mode=trained.get("prompt_mode", "episode"), cost_weight=trained.get("cost_weight"))

    def generate_turns(self, conversations: list[list[dict]], masks: list[np.ndarray]) -> list[Turn]:
        """One assistant turn per conversation, routes constrained to each row's mask."""

        allowed = [[self.pool_names[i] for i in np.flatnonzero(m)] or self.pool_names[:1] for m in masks]
        generations = self.engine.generate(batch_prompt_token_ids(self.tokenizer, conversations), allowed,
                                           sample=self.do_sample, temperature=self.temperature,
                                           constrain=self.constrain)
        turns = []
        for row, gen in enumerate(generations):
            text = self.tokenizer.decode(gen.ids, skip_special_tokens=True)
            try:
                turns.append(Turn(text, parse_strict(text, self.pool_names).tier, True))
            except RouteFormatError:
                turns.append(Turn(text, parse_tolerant(text, self.pool_names, fallback=allowed[row][0]).tier, False))
        return turns

    def play(self, env_factory, episodes: list[tuple[str, Budget, int]], progress: bool = True) -> list[EpisodeRecord]:
        """Play ``(task_id, budget, seed)`` episodes in lockstep batches."""
        from rlrouter.rl.rollout import EpisodeSpec, play_episodes

        records = []
        bar = tqdm(total=len(episodes), desc=f"{self.name} episodes", disable=not progress, leave=False)
        for start in range(0, len(episodes), self.batch_size):
            specs = [EpisodeSpec(t, b, s, self.cost_weight) for t, b, s in episodes[start:start + self.batch_size]]
            for rollout in play_episodes(self.engine, env_factory, specs, self.prompt_mode, sample=self.do_sample,
                                         temperature=self.temperature, constrain=self.constrain):
                info, spec = rollout.info, rollout.spec
                calls = dict(info["calls"])
                records.append(EpisodeRecord(
                    policy=self.name, budget=spec.budget.label, task_id=spec.task_id, success=bool(info["success"]),
                    cost_usd=float(info["cost_usd"]), calls=calls, steps=len(rollout.turns),
                    budget_exhausted=bool(info["budget_exhausted"]),
                    violation=budget_violated(spec.budget, float(info["cost_usd"]), calls),
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
