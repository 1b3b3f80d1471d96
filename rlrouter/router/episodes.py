"""Routing episodes played by the router LLM, token-in/token-out, in lockstep batches.

An episode alternates router turns and environment steps. Every token the router
generated is kept exactly as generated (ids and their log-probs under the policy); the
environment's text is tokenized once, on its own, and appended as masked tokens. Nothing
is ever decoded and re-encoded to be trained on. Evaluation (``RouterPolicy``) and the RL
stage play episodes with this one function.

Two prompt modes (recipe ``router.prompt_mode``):

- ``episode``: one growing token sequence. After a turn, the chat template's text between
  the end of the assistant turn and the next assistant turn (the user's feedback message)
  is tokenized and appended; the next turn is generated from the whole sequence.
- ``step``: each decision gets its own short prompt (the state with a bounded history
  window, ``step_user_message``). A turn is then one (prompt, completion) pair; the episode
  is still the unit of reward.

Engines (``rlrouter.router.generation``) share one interface,
``generate(prompts, allowed, sample, temperature, logprobs, constrain)``, and carry the
router's ``format`` (``RouterFormat``: turn format, prompt cut), which builds the system
message and the prompts and parses the turns here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from envs.budget import Budget
from envs.routing import RoutingEnv, nearest_allowed
from rlrouter.router.prompt import RouterFormat, feedback_user_message, first_user_message, step_user_message


@dataclass
class RouterTurn:
    prompt_ids: list[int]  # what the turn was generated from (episode mode: the whole context)
    completion_ids: list[int]
    logprobs: list[float] | None
    tier: str
    well_formed: bool
    allowed: list[str]
    constrained: bool = True
    turn_format: str = "think_route"  # the format the constraint enforced (``RouterFormat.turn_format``)


@dataclass(frozen=True)
class EpisodeSpec:
    task_id: str
    budget: Budget
    seed: int


@dataclass
class Rollout:
    spec: EpisodeSpec
    turns: list[RouterTurn] = field(default_factory=list)
    info: dict = field(default_factory=dict)  # RoutingEnv's final info
    played: list[str] = field(default_factory=list)  # the tier the environment ran at each step
    ledger: dict = field(default_factory=dict)  # the episode's CostLedger.summary() (tokens by tier)

    @property
    def success(self) -> bool:
        return bool(self.info["success"])

    @property
    def cost_usd(self) -> float:
        return float(self.info["cost_usd"])

    @property
    def calls(self) -> dict[str, int]:
        return dict(self.info["calls"])

    @property
    def routes(self) -> list[str]:
        """Every step's tier, turn by turn."""
        return [t.tier for t in self.turns]

    @property
    def malformed_fraction(self) -> float:
        return float(np.mean([not t.well_formed for t in self.turns])) if self.turns else 0.0


_SENTINEL = "\u2063ROUTER_TURN\u2063"


def feedback_ids(tokenizer, feedback: str, turn_ended: bool) -> list[int]:
    """The environment's tokens between one router turn and the next, cut from the chat
    template itself (so any ChatML-like template works): what follows the assistant's
    content up to the next assistant header. If the router's turn ended with the
    end-of-turn token, that token is not repeated."""
    chat = [{"role": "user", "content": "x"}, {"role": "assistant", "content": _SENTINEL},
            {"role": "user", "content": feedback}]
    text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    segment = text[text.index(_SENTINEL) + len(_SENTINEL):]
    eos = tokenizer.eos_token
    if turn_ended and segment.startswith(eos):
        segment = segment[len(eos):]
    return tokenizer(segment, add_special_tokens=False)["input_ids"]


def play_episodes(engine, make_env: Callable[[], RoutingEnv], specs: list[EpisodeSpec], prompt_mode: str = "step",
                  sample: bool = False, temperature: float = 1.0, logprobs: bool = False, constrain: bool = True,
                  progress: bool = False, desc: str = "episodes", timings: dict | None = None) -> list[Rollout]:
    """Play all ``specs`` in lockstep: one ``engine.generate`` call per step for every live episode.

    ``timings``, when given, accumulates ``generate_s`` (engine) and ``env_s`` (environment
    steps, i.e. the executors) in seconds."""
    if prompt_mode not in ("step", "episode"):
        raise ValueError(f"prompt_mode must be 'step' or 'episode', got {prompt_mode!r}")
    tok = engine.tokenizer
    tiers = engine.tiers
    fmt: RouterFormat = engine.format
    envs = [make_env() for _ in specs]
    rollouts = [Rollout(spec) for spec in specs]
    infos, contexts, live = [], [], list(range(len(specs)))
    for env, spec in zip(envs, specs):
        infos.append(env.reset(seed=spec.seed, options={"task_id": spec.task_id, "budget": spec.budget})[1])
        system = {"role": "system", "content": fmt.system(env.pool.describe())}
        contexts.append(fmt.prompt_ids(tok, [[system, {"role": "user", "content": first_user_message(env.view())}]])[0]
                        if prompt_mode == "episode" else system)
    bar = tqdm(total=len(specs), desc=desc, disable=not progress, leave=False)
    while live:
        if prompt_mode == "step":
            prompts = fmt.prompt_ids(tok, [[contexts[i], {"role": "user", "content": step_user_message(
                envs[i].view())}] for i in live])
        else:
            prompts = [contexts[i] for i in live]
        allowed = [[tiers[a] for a in np.flatnonzero(infos[i]["action_mask"])] or tiers[:1] for i in live]
        started = time.perf_counter()
        generations = engine.generate(prompts, allowed, sample=sample, temperature=temperature, logprobs=logprobs,
                                      constrain=constrain)
        generated = time.perf_counter()
        still, env_s = [], 0.0
        for i, prompt, gen, row_allowed in zip(live, prompts, generations, allowed):
            route, well_formed = fmt.parse(tok.decode(gen.ids, skip_special_tokens=True), tiers, row_allowed[0])
            tier = route.tier
            rollouts[i].turns.append(RouterTurn(prompt, gen.ids, gen.logprobs, tier, well_formed, row_allowed,
                                                constrain, fmt.turn_format))
            mask = infos[i]["action_mask"]
            action = tiers.index(tier)
            if mask.any() and not mask[action]:  # only possible with constrain=False
                action = nearest_allowed(action, mask)
            env_start = time.perf_counter()
            _, _, terminated, truncated, infos[i] = envs[i].step(action)
            env_s += time.perf_counter() - env_start
            if terminated or truncated:
                rollouts[i].info = infos[i]
                rollouts[i].played = [name for name, _, _ in envs[i].history]
                rollouts[i].ledger = envs[i].ledger.summary()
                envs[i].close()  # gives a text game's session back for the next episodes
                bar.update(1)
                continue
            if prompt_mode == "episode":
                ended = bool(gen.ids) and gen.ids[-1] == tok.eos_token_id
                contexts[i] = prompt + gen.ids + feedback_ids(tok, feedback_user_message(envs[i].view()), ended)
            still.append(i)
        live = still
        if timings is not None:
            timings["generate_s"] = timings.get("generate_s", 0.0) + generated - started
            timings["env_s"] = timings.get("env_s", 0.0) + env_s
    bar.close()
    return rollouts
