"""Generating router turns: the route constraint and the engines that apply it.

Constrained decoding: a router turn is ``<think>TEXT</think><route>TIER</route>`` with TIER
one of the tiers the budget allows (``info["action_mask"]``). Once the model writes
``<route>``, the only tokens it may produce continue an allowed tier, then ``</route>``,
then the end of turn. A forbidden tier therefore cannot be generated: the budget is
respected by the generation itself, not by overriding the output afterwards.

Engines (the same rule on each):

- ``HFEngine``: transformers ``generate`` with ``RouteConstraint`` as a logits processor
  (the CPU default for rollouts and evaluation).
- ``VLLMEngine``: vLLM's offline engine in this process, the same rule as a vLLM logits
  processor (``rlrouter.router.vllm_route``); ``load_weights`` pushes new policy weights in
  place (RL).
- ``AsyncRouterEngine``: vLLM's async engine for the server (``rlrouter serve``), with the
  same processor for step routes.

The RL stage recomputes the log-probs of the *constrained* distribution it sampled from
(``constraint_masks``), so training and sampling see the same policy.
"""

from __future__ import annotations

import copy
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LogitsProcessor

from rlrouter.router.prompt import ROUTE_CLOSE, ROUTE_OPEN, THINK_CLOSE, THINK_OPEN, RouterFormat, tier_token_ids


class RouteConstraint(LogitsProcessor):
    """Keeps every router turn in the strict format ``<think>TEXT</think><route>TIER</route>``
    with TIER one of the row's allowed tiers (the tiers its budget can still pay for):

    - the turn opens with ``<think>``; the think text may not contain ``<`` (as the strict
      parser requires) and the turn cannot end inside it;
    - ``</think>`` is followed by ``<route>``, then the tokens of an allowed tier, then
      ``</route>``, then the end-of-turn token.

    A forbidden tier therefore cannot be generated, and only running out of
    ``max_new_tokens`` inside the think text can leave a turn malformed. vLLM applies this
    very rule (``rlrouter.router.vllm_route.RouteLogitsProcessor`` calls ``mask``),
    token for token. With ``turn_format="route"``
    the turn opens with ``<route>`` directly.

    ``route_bias`` b (log-odds; 0 = plain greedy) is the threshold knob of classic routers,
    for any number of tiers: right after ``<route>`` the router takes the cheapest allowed
    tier t whose cumulative probability P(tier <= t), over the allowed tiers in price order,
    reaches sigmoid(b). With two tiers that is "large iff P(large) / (P(large) + P(small)) >
    sigmoid(-b)", the same as adding b to large's logit; with three it escalates through the
    middle tier (b > 0 leaves small when small holds less than sigmoid(b) of the mass, and
    goes past medium only when small and medium together hold less). Tiers are told apart by
    their first token; tiers that share one form one group and are chosen greedily after it.
    """

    def __init__(self, tokenizer, allowed: list[list[str]], prompt_length: int, route_bias: float = 0.0,
                 turn_format: str = "think_route"):
        self.route_only = turn_format == "route"
        self.open_id = tokenizer.convert_tokens_to_ids(ROUTE_OPEN)
        self.close_id = tokenizer.convert_tokens_to_ids(ROUTE_CLOSE)
        self.think_open_id = tokenizer.convert_tokens_to_ids(THINK_OPEN)
        self.think_close_id = tokenizer.convert_tokens_to_ids(THINK_CLOSE)
        self.eos_id = tokenizer.eos_token_id
        self.prompt_length = prompt_length
        self.sequences = [[tier_token_ids(tokenizer, t) + [self.close_id] for t in row]
                          for row in allowed]
        # each row's distinct first tier tokens, in price order: what the route bias chooses among
        self.first_tokens = [list(dict.fromkeys(seq[0] for seq in row)) for row in self.sequences]
        self.route_bias = float(route_bias)
        self.think_banned = think_banned_ids(tokenizer)
        self._banned_tensor: torch.Tensor | None = None  # think_banned on the scores' device, made on first use

    def allowed_next(self, row: int, generated: list[int]) -> list[int] | None:
        """Token ids allowed next for ``row``; None = think text (anything but
        ``think_banned``: the end of turn and tokens containing ``<`` other than ``</think>``)."""
        if not generated:
            return [self.open_id if self.route_only else self.think_open_id]
        if self.open_id not in generated:
            return [self.open_id] if generated[-1] == self.think_close_id else None
        start = len(generated) - 1 - generated[::-1].index(self.open_id)
        suffix = generated[start + 1:]
        if self.close_id in suffix:
            return [self.eos_id]
        return sorted({seq[len(suffix)] for seq in self.sequences[row]
                       if len(seq) > len(suffix) and seq[: len(suffix)] == suffix}) or [self.eos_id]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """One transformers decoding step for the whole batch (``mask`` over every row)."""
        scores = scores.clone()  # generate(output_logits=True) keeps the raw tensor: never edit it in place
        generated = input_ids[:, self.prompt_length:].tolist()  # one copy of the generated ids
        self.mask(scores, [(row, row, ids) for row, ids in enumerate(generated)])
        return scores

    def mask(self, scores: torch.Tensor, rows: list[tuple[int, int, list[int]]]) -> None:
        """Masks ``scores`` in place for ``rows``, each ``(index, row, generated)``: line
        ``index`` of ``scores`` follows the rule's ``row`` after the tokens ``generated``.
        transformers' ``__call__`` and vLLM's processor both call it. The allowed sets are
        worked out in Python, then applied with a few batched tensor operations (per-row
        indexing cost a CUDA launch per row and step: 40% of an RL iteration on a GPU)."""
        think_rows, forced_rows, keep_rows, keep_cols, bias_rows, bias_firsts = [], [], [], [], [], []
        for index, row, generated in rows:
            allowed = self.allowed_next(row, generated)
            if allowed is None:
                think_rows.append(index)  # inside the think text
                continue
            forced_rows.append(index)
            keep_rows += [index] * len(allowed)
            keep_cols += allowed
            if self.route_bias and generated and generated[-1] == self.open_id and len(self.first_tokens[row]) > 1:
                bias_rows.append(index)
                bias_firsts.append(self.first_tokens[row])
        device = scores.device
        if think_rows:
            lines = torch.tensor(think_rows, device=device)
            scores[lines[:, None], self._banned_on(device)[None, :]] = -float("inf")
        if forced_rows:
            lines, cols = torch.tensor(keep_rows, device=device), torch.tensor(keep_cols, device=device)
            keep = scores[lines, cols]
            scores[torch.tensor(forced_rows, device=device)] = -float("inf")
            scores[lines, cols] = keep
            if bias_rows:
                self._escalate(scores, bias_rows, bias_firsts)

    def _escalate(self, scores: torch.Tensor, rows: list[int], firsts: list[list[int]]) -> None:
        """At the tier token of ``rows`` (lines of ``scores``): keep only the tier the cumulative
        rule picks (class docstring), batched over the rows (padded to the widest row's tier count)."""
        device = scores.device
        width = max(len(f) for f in firsts)
        cols = torch.tensor([f + [f[-1]] * (width - len(f)) for f in firsts], device=device)
        counts = torch.tensor([len(f) for f in firsts], device=device)
        position = torch.arange(width, device=device)[None, :]
        real = position < counts[:, None]
        rows_t = torch.tensor(rows, device=device)
        logits = scores[rows_t[:, None], cols].masked_fill(~real, -float("inf"))
        cumulative = torch.softmax(logits.float(), dim=-1).cumsum(-1)
        threshold = torch.sigmoid(torch.tensor(self.route_bias, device=device))
        chosen = torch.minimum((cumulative < threshold).sum(-1), counts - 1)
        drop = real & (position != chosen[:, None])
        scores[rows_t[:, None].expand_as(cols)[drop], cols[drop]] = -float("inf")

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


def constraint_masks(tokenizer, turn) -> list[list[int] | None]:
    """For each generated token of ``turn``, the token ids the route constraint allowed at
    that point (``None``: think text, anything but ``RouteConstraint.think_banned``; ``[]``
    for an unconstrained turn means no mask). Recomputed from the ids, so it needs nothing from the engine."""
    if not turn.constrained:
        return [[] for _ in turn.completion_ids]
    rule = RouteConstraint(tokenizer, [turn.allowed], prompt_length=0, turn_format=turn.turn_format)
    ids = turn.completion_ids
    return [rule.allowed_next(0, ids[:t]) for t in range(len(ids))]


@dataclass
class Generation:
    ids: list[int]  # generated tokens, ending with the end-of-turn token when the turn ended
    logprobs: list[float] | None = None  # log π(ids[t] | ...), when asked for


class HFEngine:
    """transformers ``generate`` over left-padded token ids, routes constrained per row.
    ``format`` is the router's ``RouterFormat`` (its turn format and prompt cut); every engine
    carries one, and ``play_episodes`` builds and reads turns with it."""

    name = "hf"

    def __init__(self, model, tokenizer, tiers: list[str], max_new_tokens: int = 32, route_bias: float = 0.0,
                 format: RouterFormat | None = None):
        self.format = format or RouterFormat()
        self.model = model
        self.tokenizer = tokenizer
        self.tiers = list(tiers)
        self.max_new_tokens = max_new_tokens
        self.route_bias = route_bias

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], allowed: list[list[str]], sample: bool = False,
                 temperature: float = 1.0, logprobs: bool = False, constrain: bool = True) -> list[Generation]:
        from transformers import LogitsProcessorList

        tok = self.tokenizer
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), tok.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, ids in enumerate(prompts):  # left padding: the last prompt token sits at the same column
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention[row, width - len(ids):] = 1
        processors = LogitsProcessorList()
        if constrain:
            processors.append(RouteConstraint(tok, allowed, width, self.route_bias, self.format.turn_format))
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


def with_route_bias(engine, route_bias: float):
    """``engine`` (``HFEngine`` or ``VLLMEngine``; its model shared, not copied) deciding
    with route bias ``route_bias``: an evaluation sweep plays every bias on one engine."""
    biased = copy.copy(engine)
    biased.route_bias = float(route_bias)
    return biased


def vllm_environment(in_process: bool) -> None:
    """Environment defaults every vLLM engine here starts with: 1 GiB of KV cache on CPU
    (ignored on GPU); ``in_process``: the offline engine runs in this process as a
    one-rank "external launcher" (no engine subprocess, no torch.distributed set-up of
    its own)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if not in_process:
        return
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])


ROUTE_PROCESSOR = "rlrouter.router.vllm_route:RouteLogitsProcessor"  # loaded by every vLLM engine here
ROUTE_ARGS = "rlrouter_route"  # the sampling parameters' extra_args key that asks for it


def route_args(allowed: list[str], turn_format: str, route_bias: float = 0.0) -> dict:
    """``extra_args`` of a router turn decoded by vLLM under ``RouteConstraint``'s rule."""
    return {ROUTE_ARGS: {"allowed": list(allowed), "turn_format": turn_format, "route_bias": float(route_bias)}}


def sampling_params(regex: str | None, max_tokens: int, temperature: float, logprobs: bool = False,
                    skip_special_tokens: bool = True, extra_args: dict | None = None):
    """vLLM sampling parameters of one turn: decoded under ``regex`` when given (the server's
    chat turns), under the route constraint when ``extra_args`` is
    ``route_args(...)`` (router turns)."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    return SamplingParams(temperature=temperature, max_tokens=max_tokens, logprobs=0 if logprobs else None,
                          skip_special_tokens=skip_special_tokens, extra_args=extra_args,
                          structured_outputs=StructuredOutputsParams(regex=regex) if regex else None)


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
                 gpu_memory_utilization: float = 0.5, max_model_len: int = 2048, format: RouterFormat | None = None,
                 route_bias: float = 0.0):
        self.format = format or RouterFormat()
        self.route_bias = float(route_bias)
        vllm_environment(in_process=True)
        from vllm import LLM

        threads = torch.get_num_threads()
        self.llm = LLM(model=str(model_dir), dtype="float32", seed=seed, enforce_eager=True,
                       logprobs_mode="processed_logprobs",  # after temperature and the route constraint
                       gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                       distributed_executor_backend="external_launcher", logits_processors=[ROUTE_PROCESSOR])
        torch.set_num_threads(threads)
        self.tokenizer = tokenizer
        self.tiers = list(tiers)
        self.max_new_tokens = max_new_tokens

    def close(self) -> None:
        """Shut the engine down now (idempotent; copies made by ``with_route_bias`` share it).
        In-process engines share vLLM's global parallel state: with the earlier ones left open,
        the third engine of one process (``rlrouter train``: the RL stage's, then one per
        evaluated checkpoint) failed its first step with "pipeline model parallel group is not
        initialized". Shutting one down tears that state down, and the next engine sets it up
        afresh; so whoever starts another engine closes this one first."""
        self.llm.llm_engine.engine_core.shutdown()

    def load_weights(self, model) -> None:
        """Push the policy's current weights into the engine (in place, no restart)."""
        state = [(name, tensor.detach().float().cpu()) for name, tensor in model.state_dict().items()]
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": state})
        self.llm.reset_prefix_cache()

    def generate(self, prompts: list[list[int]], allowed: list[list[str]], sample: bool = False,
                 temperature: float = 1.0, logprobs: bool = False, constrain: bool = True) -> list[Generation]:
        from vllm.inputs import TokensPrompt

        params = [sampling_params(None, self.max_new_tokens, temperature if sample else 0.0, logprobs=logprobs,
                                  skip_special_tokens=False,
                                  extra_args=route_args(row_allowed, self.format.turn_format, self.route_bias)
                                  if constrain else None)
                  for row_allowed in allowed]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        result = []
        for out in outputs:
            completion = out.outputs[0]
            ids = list(completion.token_ids)
            lps = [d[t].logprob for t, d in zip(ids, completion.logprobs)] if logprobs else None
            result.append(Generation(ids, lps))
        return result


@dataclass
class EngineOutput:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (the format closed) or "length" (cut by max_tokens)


class AsyncRouterEngine:
    """The router on vLLM's async engine, in the server's process: one request at a time
    from many coroutines, each decoded under its own rule (the route constraint for step
    routes, a structured-output regex for chat turns)."""

    def __init__(self, checkpoint: str | Path, max_model_len: int = 2048, gpu_memory_utilization: float = 0.5,
                 dtype: str = "auto", seed: int = 0, enforce_eager: bool = False):
        vllm_environment(in_process=False)
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.max_model_len = max_model_len
        self.llm = AsyncLLM.from_engine_args(AsyncEngineArgs(
            model=str(checkpoint), dtype=dtype, max_model_len=max_model_len, seed=seed,
            gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager, enable_log_requests=False,
            logits_processors=[ROUTE_PROCESSOR]))

    async def generate(self, prompt_ids: list[int], regex: str | None, max_tokens: int, temperature: float = 0.0,
                       request_id: str | None = None, extra_args: dict | None = None) -> EngineOutput:
        from vllm.inputs import TokensPrompt

        params = sampling_params(regex, max_tokens, temperature, extra_args=extra_args)
        final = None
        async for output in self.llm.generate(TokensPrompt(prompt_token_ids=prompt_ids), params,
                                              request_id or uuid.uuid4().hex):
            final = output
        completion = final.outputs[0]
        return EngineOutput(completion.text, len(final.prompt_token_ids), len(completion.token_ids),
                            completion.finish_reason or "stop")

    @property
    def healthy(self) -> bool:
        return not self.llm.errored

    def shutdown(self) -> None:
        self.llm.shutdown()
