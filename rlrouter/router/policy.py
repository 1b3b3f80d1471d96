"""The router LLM as a policy: plays RoutingEnv episodes in batches, with budgets
enforced at decode time.

Constrained decoding: once the model writes ``<route>``, the only tokens it may produce are
those that continue the token sequence of a tier the budget allows (``info["action_mask"]``)
followed by ``</route>``, and after ``</route>`` only the end-of-turn token. A forbidden
tier therefore cannot be generated — the budget is respected by the generation itself,
not by overriding the output afterwards.

Episodes run in lockstep batches (one generate call per step for all live episodes);
each environment step uses the tolerant parser, and the strict parser's verdict is
recorded as the well-formedness of the route.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList
from tqdm.auto import tqdm

from envs.budget import Budget
from envs.routing import nearest_allowed
from rlrouter.evaluate.runner import EpisodeRecord, budget_violated, episode_seed
from rlrouter.router.prompt import (ROUTE_CLOSE, ROUTE_OPEN, THINK_CLOSE, RouteFormatError, feedback_user_message,
                                    first_user_message, parse_strict, parse_tolerant, step_user_message,
                                    system_message)


class RouteConstraint(LogitsProcessor):
    """Restricts what follows ``<route>`` to the allowed tiers of each batch row, and keeps
    the turn in format: it cannot end before a route is written, and ``</think>`` is
    followed by ``<route>``.

    ``route_bias`` (log-odds) is added to the first token of the priciest allowed tier right
    after ``<route>``: with two single-token tiers, greedy decoding then routes large iff
    P(large) / (P(large) + P(small)) >= sigmoid(-route_bias), the threshold knob of
    classic routers (0 = plain greedy).
    """

    def __init__(self, tokenizer, allowed: list[list[str]], prompt_length: int, route_bias: float = 0.0):
        self.open_id = tokenizer.convert_tokens_to_ids(ROUTE_OPEN)
        self.close_id = tokenizer.convert_tokens_to_ids(ROUTE_CLOSE)
        self.think_close_id = tokenizer.convert_tokens_to_ids(THINK_CLOSE)
        self.eos_id = tokenizer.eos_token_id
        self.prompt_length = prompt_length
        self.sequences = [[tokenizer.encode(t, add_special_tokens=False) + [self.close_id] for t in row]
                          for row in allowed]
        self.route_bias = float(route_bias)

    def allowed_next(self, row: int, generated: list[int]) -> list[int] | None:
        """Token ids allowed next for ``row`` (None = anything but ending the turn)."""
        if self.open_id not in generated:
            return [self.open_id] if generated and generated[-1] == self.think_close_id else None
        start = len(generated) - 1 - generated[::-1].index(self.open_id)
        suffix = generated[start + 1:]
        if self.close_id in suffix:
            return [self.eos_id]
        return sorted({seq[len(suffix)] for seq in self.sequences[row]
                       if len(seq) > len(suffix) and seq[: len(suffix)] == suffix}) or [self.eos_id]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for row in range(input_ids.shape[0]):
            generated = input_ids[row, self.prompt_length:].tolist()
            allowed = self.allowed_next(row, generated)
            if allowed is None:
                scores[row, self.eos_id] = -float("inf")  # no route yet: the turn cannot end
            else:
                keep = scores[row, allowed].clone()
                scores[row, :] = -float("inf")
                scores[row, allowed] = keep
                if self.route_bias and generated and generated[-1] == self.open_id and len(self.sequences[row]) > 1:
                    scores[row, self.sequences[row][-1][0]] += self.route_bias
        return scores


@dataclass
class Turn:
    text: str
    tier: str
    well_formed: bool


class RouterPolicy:
    """Greedy (default) or sampled router LLM over RoutingEnv episodes."""

    name = "router"

    def __init__(self, model, tokenizer, pool_names: list[str], max_new_tokens: int = 48, batch_size: int = 32,
                 do_sample: bool = False, temperature: float = 1.0, constrain: bool = True, route_bias: float = 0.0,
                 prompt_mode: str = "step", name: str = "router"):
        self.model = model
        self.tokenizer = tokenizer
        self.pool_names = list(pool_names)
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.do_sample = do_sample
        self.temperature = temperature
        self.constrain = constrain
        self.route_bias = route_bias
        if prompt_mode not in ("step", "episode"):
            raise ValueError(f"prompt_mode must be 'step' or 'episode', got {prompt_mode!r}")
        self.prompt_mode = prompt_mode
        self.name = name

    @torch.no_grad()
    def generate_turns(self, conversations: list[list[dict]], masks: list[np.ndarray]) -> list[Turn]:
        """One assistant turn per conversation, routes constrained to each row's mask."""
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
                   for c in conversations]
        batch = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        batch = {k: v.to(self.model.device) for k, v in batch.items()}
        allowed = [[self.pool_names[i] for i in np.flatnonzero(m)] or self.pool_names[:1] for m in masks]
        processors = LogitsProcessorList()
        if self.constrain:
            processors.append(RouteConstraint(self.tokenizer, allowed, batch["input_ids"].shape[1], self.route_bias))
        out = self.model.generate(
            **batch,
            max_new_tokens=self.max_new_tokens,
            do_sample=self.do_sample,
            temperature=self.temperature if self.do_sample else None,
            top_p=None, top_k=None,
            logits_processor=processors,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        new = out[:, batch["input_ids"].shape[1]:]
        turns = []
        for row, ids in enumerate(new.tolist()):
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            try:
                tier = parse_strict(text, self.pool_names).tier
                well_formed = True
            except RouteFormatError:
                tier = parse_tolerant(text, self.pool_names, fallback=allowed[row][0]).tier
                well_formed = False
            turns.append(Turn(text, tier, well_formed))
        return turns

    def play(self, env_factory, episodes: list[tuple[str, Budget, int]], progress: bool = True) -> list[EpisodeRecord]:
        """Play ``(task_id, budget, seed)`` episodes in lockstep batches."""
        records = []
        bar = tqdm(total=len(episodes), desc=f"{self.name} episodes", disable=not progress, leave=False)
        for start in range(0, len(episodes), self.batch_size):
            chunk = episodes[start:start + self.batch_size]
            envs = [env_factory() for _ in chunk]
            conversations, infos, turns_ok = [], [], [[] for _ in chunk]
            for env, (task_id, budget, seed) in zip(envs, chunk):
                _, info = env.reset(seed=seed, options={"task_id": task_id, "budget": budget})
                chat = [{"role": "system", "content": system_message(env.pool.describe())}]
                if self.prompt_mode == "episode":  # step mode rebuilds its one user turn each step
                    chat.append({"role": "user", "content": first_user_message(env.view())})
                conversations.append(chat)
                infos.append(info)
            live = list(range(len(chunk)))
            steps = [0] * len(chunk)
            while live:
                if self.prompt_mode == "step":  # the state with a bounded history window, one chat per decision
                    prompts = [[conversations[i][0], {"role": "user", "content": step_user_message(envs[i].view())}]
                               for i in live]
                else:
                    prompts = [conversations[i] for i in live]
                turns = self.generate_turns(prompts, [infos[i]["action_mask"] for i in live])
                still = []
                for i, turn in zip(live, turns):
                    env = envs[i]
                    mask = infos[i]["action_mask"]
                    action = self.pool_names.index(turn.tier)
                    if mask.any() and not mask[action]:  # only possible with constrain=False
                        action = nearest_allowed(action, mask)
                    turns_ok[i].append(turn.well_formed)
                    _, _, terminated, truncated, infos[i] = env.step(action)
                    steps[i] += 1
                    if terminated or truncated:
                        continue
                    if self.prompt_mode == "episode":
                        conversations[i] += [{"role": "assistant", "content": turn.text},
                                             {"role": "user", "content": feedback_user_message(env.view())}]
                    still.append(i)
                live = still
            for i, (task_id, budget, _) in enumerate(chunk):
                info = infos[i]
                calls = dict(info["calls"])
                records.append(EpisodeRecord(
                    policy=self.name, budget=budget.label, task_id=task_id, success=bool(info["success"]),
                    cost_usd=float(info["cost_usd"]), calls=calls, steps=steps[i],
                    budget_exhausted=bool(info["budget_exhausted"]),
                    violation=budget_violated(budget, float(info["cost_usd"]), calls),
                    extra={"well_formed": float(np.mean(turns_ok[i])), "turns": len(turns_ok[i])},
                ))
            bar.update(len(chunk))
        bar.close()
        return records

    def evaluate(self, env_factory, task_ids: list[str], budgets: list[Budget], seed: int,
                 progress: bool = True) -> list[EpisodeRecord]:
        """Same tasks and seeds as the baselines' ``evaluate`` (paired comparison)."""
        episodes = [(t, b, episode_seed(seed, i)) for b in budgets for i, t in enumerate(task_ids)]
        return self.play(env_factory, episodes, progress=progress)
