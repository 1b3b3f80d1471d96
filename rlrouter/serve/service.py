"""What the server does, without HTTP: route one step, or run a whole think/route/answer
chat under a budget.

Budgets are enforced *before* money is spent, from worst cases:

- a pool call's input is at most its UTF-8 bytes plus ``input_overhead_tokens`` per message
  and once more for the reply header (byte-level BPE tokenizers never make more tokens
  than bytes; the overhead covers the chat template's role markers);
- a tier is allowed only if its calls cap is not reached and it can pay for that input
  plus ``MIN_OUTPUT_TOKENS`` of output with the dollars left;
- the call then gets ``max_tokens`` = the output tokens the dollars left can pay for (at
  most the request's ``max_tokens``), so its real cost cannot pass the budget.

The router's own decoding can only name allowed tiers, so a budget-breaking route cannot
be generated: step routes are decoded under the route constraint itself
(``rlrouter.router.vllm_route``, the rule of the RL engines, so a tag or a tier is spelled
as training spelled it), chat turns under a regex (vLLM structured outputs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from envs.budget import Budget
from envs.pool import Pool, Tier
from rlrouter.router.generation import route_args
from rlrouter.router.prompt import (HISTORY_WINDOW, INFO_CLOSE, INFO_OPEN, QUERY_CHARS, RouterFormat,
                                    chat_system_message, chat_turn_regex, parse_chat_turn, prompt_token_ids,
                                    step_user_message)
from rlrouter.serve.config import ServeConfig
from rlrouter.serve.pool_client import PoolCallError, PoolClient, PoolReply

MIN_OUTPUT_TOKENS = 16  # a tier is allowed only if the budget pays for at least this many output tokens
INFORMATION_CHARS = 1500  # a pool reply shown to the router is cut to this many characters


class BudgetError(ValueError):
    """The request's budget cannot pay for a single call to any tier."""


class RequestTooLong(ValueError):
    """The request does not fit in the router's context."""


class UpstreamError(RuntimeError):
    """Every allowed tier failed for one route."""

    def __init__(self, message: str, trace: list[dict]):
        super().__init__(message)
        self.trace = trace


# -- budget arithmetic (pure functions) ------------------------------------------------
def input_token_bound(messages: list[dict], overhead: int) -> int:
    """Upper bound on a chat call's prompt tokens: UTF-8 bytes plus template overhead."""
    return sum(len(str(m.get("content", "")).encode()) + overhead for m in messages) + overhead


@dataclass
class Spend:
    """What one request (or the episode a step request describes) has spent so far."""

    usd: float = 0.0
    calls: dict[str, int] = field(default_factory=dict)

    def add(self, reply: PoolReply) -> None:
        self.usd += reply.cost_usd
        self.calls[reply.tier] = self.calls.get(reply.tier, 0) + 1

    def to_dict(self) -> dict:
        return {"usd": self.usd, "calls": dict(self.calls)}


def max_output_tokens(tier: Tier, budget: Budget, spend: Spend, input_bound: int, limit: int) -> int:
    """Most output tokens a call to ``tier`` may use: ``limit``, or fewer if the dollars left
    cannot pay for them on top of ``input_bound`` input tokens. 0 = the tier cannot be paid."""
    cap = budget.max_calls.get(tier.name)
    if cap is not None and spend.calls.get(tier.name, 0) >= cap:
        return 0
    if budget.usd is None:
        return limit
    left = budget.usd - spend.usd - tier.cost_usd(input_bound, 0)
    if left < 0:
        return 0
    if tier.usd_per_1m_output == 0:
        return limit
    tokens = min(limit, math.floor(left * 1e6 / tier.usd_per_1m_output))
    while tokens > 0 and spend.usd + tier.cost_usd(input_bound, tokens) > budget.usd:
        tokens -= 1  # float rounding at the boundary
    return max(tokens, 0)


def allowed_tiers(pool: Pool, budget: Budget, spend: Spend, input_bound: int, limit: int) -> list[str]:
    """Tiers (cheapest first) that can pay for a call of ``MIN_OUTPUT_TOKENS`` or more."""
    return [t.name for t in pool.tiers
            if max_output_tokens(t, budget, spend, input_bound, limit) >= min(MIN_OUTPUT_TOKENS, limit)]


def conversation_text(messages: list[dict]) -> str:
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def chat_budget_text(budget: Budget, spend: Spend) -> str:
    parts = [f"spent ${spend.usd:.4f}"]
    if budget.usd is not None:
        parts.append(f"${max(budget.usd - spend.usd, 0):.4f} of ${budget.usd:.4f} left")
    for tier, cap in sorted(budget.max_calls.items()):
        parts.append(f"{tier} calls {cap - spend.calls.get(tier, 0)} of {cap} left")
    return "; ".join(parts)


def step_view(request: dict, spend: Spend, budget: Budget, history_window: int = HISTORY_WINDOW) -> dict:
    """The RoutingEnv-style view a step request describes (the trained prompt is built from
    it, with the history window the checkpoint was trained with)."""
    history = request.get("history") or []
    progress = request.get("progress") or {}
    done = progress.get("done", sum(1 for h in history if h.get("event", "ok") == "ok"))
    return {
        "task": request["task"], "step_text": request["next_step"],
        "step_index": request.get("step_index", len(history)), "max_steps": request.get("max_steps", "?"),
        "position": done, "length": progress.get("total", "?"),
        "cost_usd": spend.usd, "budget": budget.to_dict(),
        "usd_left": None if budget.usd is None else max(0.0, budget.usd - spend.usd),
        "calls_left": {t: cap - spend.calls.get(t, 0) for t, cap in budget.max_calls.items()},
        "history": [{"tier": h["tier"], "event": h.get("event", "ok"), "observation": h.get("observation", "")}
                    for h in history],
        "history_window": history_window,
    }


def route_request(view: dict, **extra) -> dict:
    """The ``/v1/route`` body for a RoutingEnv view (``env.view()``): what an agent holding an
    rlrouter environment sends; ``step_view`` turns it back into the same prompt."""
    budget = {"usd": view["budget"].get("usd")}
    budget.update({f"{tier}_calls": cap for tier, cap in view["budget"].get("max_calls", {}).items()})
    return {"task": view["task"], "next_step": view["step_text"], "step_index": view["step_index"],
            "max_steps": view["max_steps"], "progress": {"done": view["position"], "total": view["length"]},
            "history": [dict(h) for h in view["history"]],
            "budget": {k: v for k, v in budget.items() if v is not None},
            "spent": {"usd": view["cost_usd"], "calls": {t: n for t, n in view["calls"].items() if n}}, **extra}


# -- the service --------------------------------------------------------------------------
class RouterService:
    """Owns the router engine, its tokenizer and the pool client."""

    def __init__(self, engine, tokenizer, config: ServeConfig, pool_client: PoolClient, metrics, descriptors=None,
                 history_window: int = HISTORY_WINDOW, fmt: RouterFormat | None = None):
        self.engine = engine
        self.format = fmt or RouterFormat()  # the checkpoint's turn format and prompt cut
        self.history_window = history_window  # the step prompt's window the router was trained with
        self.tokenizer = tokenizer
        self.config = config
        self.pool = config.pool
        self.pool_client = pool_client
        self.metrics = metrics
        self.descriptors = descriptors or config.pool.describe()
        self.step_system = {"role": "system", "content": self.format.system(self.descriptors)}
        self.chat_system = {"role": "system", "content": chat_system_message(self.descriptors)}

    # ---- step mode ----
    def step_allowed(self, request: dict, budget: Budget, spend: Spend) -> list[str]:
        """Tiers that can pay for the next call at the size the request states
        (``next_call_tokens``; default input 0, output ``server.max_tokens``)."""
        tokens = request.get("next_call_tokens") or {}
        n_in = int(tokens.get("input", 0))
        n_out = int(tokens.get("output", self.config.max_tokens))
        return [t.name for t in self.pool.tiers if max_output_tokens(t, budget, spend, n_in, n_out) >= n_out]

    def step_user_text(self, request: dict, budget: Budget, spend: Spend) -> str:
        """The step prompt's user turn for the state the request describes (before any cut)."""
        return step_user_message(step_view(request, spend, budget, self.history_window))

    def step_prompt(self, request: dict, budget: Budget, spend: Spend) -> list[int]:
        """Token ids of the trained step prompt for the state the request describes."""
        view = step_view(request, spend, budget, self.history_window)
        return self.format.prompt_ids(self.tokenizer, [[self.step_system,
                                                        {"role": "user", "content": step_user_message(view)}]])[0]

    async def route(self, request: dict, budget: Budget, spend: Spend, allowed: list[str] | None = None,
                    mode: str = "step") -> dict:
        """The tier for the next step of an episode (no model is called), among ``allowed``
        (default: the tiers ``step_allowed`` finds for the request)."""
        allowed = self.step_allowed(request, budget, spend) if allowed is None else allowed
        if not allowed:
            return {"tier": None, "think": "", "allowed_tiers": [], "budget_exhausted": True, "malformed": False,
                    "usage": {"prompt_tokens": 0, "completion_tokens": 0}}
        ids = self.step_prompt(request, budget, spend)
        if len(ids) + self.config.router_max_tokens > self.engine.max_model_len:
            raise RequestTooLong(f"the step prompt is {len(ids)} router tokens; with router_max_tokens "
                                 f"{self.config.router_max_tokens} it does not fit the router's context of "
                                 f"{self.engine.max_model_len} (shorten task, next_step or the history's observations)")
        out = await self.engine.generate(ids, None, self.config.router_max_tokens,
                                         float(request.get("temperature", 0.0)),
                                         extra_args=route_args(allowed, self.format.turn_format))
        parsed, well_formed = self.format.parse(out.text, allowed, fallback=allowed[0])
        malformed = not well_formed
        if malformed:
            self.metrics.malformed.inc()
            self.metrics.fallbacks.labels(reason="malformed").inc()
        self.metrics.routes.labels(tier=parsed.tier, mode=mode).inc()
        return {"tier": parsed.tier, "think": parsed.think, "allowed_tiers": allowed, "budget_exhausted": False,
                "malformed": malformed, "usage": {"prompt_tokens": out.prompt_tokens,
                                                  "completion_tokens": out.completion_tokens}}

    # ---- chat mode ----
    async def chat(self, messages: list[dict], budget: Budget, max_turns: int, max_tokens: int,
                   router_temperature: float = 0.0, sampling: dict | None = None) -> dict:
        """Think, route sub-queries to the pool, read the replies, answer.

        Returns ``{"answer", "finish_reason", "trace", "spend", "stopped", "usage", ...}``.
        Raises ``BudgetError`` when the budget cannot pay for any first call, ``RequestTooLong``
        when the request does not fit the router's context, and
        ``UpstreamError`` when every allowed tier failed for a route.
        """
        overhead = self.config.input_overhead_tokens
        spend = Spend()
        # worst-case input of any call this request can make: the conversation, or a sub-query
        # (one message of at most QUERY_CHARS characters, 4 UTF-8 bytes each)
        input_bound = max(input_token_bound(messages, overhead), 4 * QUERY_CHARS + 2 * overhead)
        if not allowed_tiers(self.pool, budget, spend, input_bound, max_tokens) and self.config.min_routes > 0:
            self.metrics.budget_rejections.inc()
            cheapest = self.pool.cheapest.cost_usd(input_bound, min(MIN_OUTPUT_TOKENS, max_tokens))
            raise BudgetError(f"budget {budget.label} cannot pay for one call to any tier (the cheapest call this "
                              f"request can make may cost ${cheapest:.6f}); raise budget.usd or the calls caps")
        router_messages = [self.chat_system, {"role": "user", "content": (
            f"Request: {conversation_text(messages)}\nBudget: {chat_budget_text(budget, spend)}")}]
        trace: list[dict] = []
        usage = {"router_prompt_tokens": 0, "router_completion_tokens": 0}
        answer, finish_reason, stopped, last = "", "stop", "max_turns", None
        malformed = 0
        for turn in range(max_turns):
            allowed = allowed_tiers(self.pool, budget, spend, input_bound, max_tokens)
            routes = sum(1 for t in trace if "tier" in t)
            may_answer = routes >= self.config.min_routes or not allowed
            if not allowed and last is None:
                stopped = "budget"
                break
            ids = prompt_token_ids(self.tokenizer, router_messages)
            if len(ids) + self.config.router_max_tokens > self.engine.max_model_len:
                if turn == 0:
                    raise RequestTooLong(
                        f"the request is {len(ids)} router tokens; with router_max_tokens "
                        f"{self.config.router_max_tokens} it does not fit the router's context of "
                        f"{self.engine.max_model_len} (shorten the messages or serve with a larger --max-model-len)")
                stopped = "context"  # the replies filled the context: answer with the last one
                break
            out = await self.engine.generate(ids, chat_turn_regex(allowed, may_answer),
                                             self.config.router_max_tokens, router_temperature)
            usage["router_prompt_tokens"] += out.prompt_tokens
            usage["router_completion_tokens"] += out.completion_tokens
            parsed = parse_chat_turn(out.text, allowed)
            if parsed is None:  # cut by router_max_tokens: send the request to the cheapest allowed tier
                malformed += 1
                self.metrics.malformed.inc()
                self.metrics.fallbacks.labels(reason="malformed").inc()
                if not allowed:
                    stopped = "budget"
                    break
                parsed = {"think": "", "tier": allowed[0], "query": "", "fallback": "malformed router output"}
            if "answer" in parsed:
                answer = parsed["answer"] or (last.text if last else "")
                if not parsed["answer"] and last is not None:
                    finish_reason = last.finish_reason
                trace.append({"turn": turn, "think": parsed["think"], "answer": bool(parsed["answer"])})
                stopped = "answer"
                break
            pool_messages = [{"role": "user", "content": parsed["query"]}] if parsed["query"] else messages
            step = {"turn": turn, "think": parsed["think"], "requested_tier": parsed["tier"],
                    "query": parsed["query"] or None}
            if "fallback" in parsed:
                step["fallback"] = parsed["fallback"]
            reply = await self._call_with_fallback(parsed["tier"], pool_messages, budget, spend, max_tokens,
                                                   input_bound, sampling, step, trace)
            spend.add(reply)
            self.metrics.routes.labels(tier=reply.tier, mode="chat").inc()
            self.metrics.cost.labels(tier=reply.tier).inc(reply.cost_usd)
            step.update(reply.trace())
            trace.append(step)
            last = reply
            if "fallback" in parsed:  # a malformed router turn ends the loop with that reply
                stopped = "fallback"
                break
            router_messages = router_messages + [
                {"role": "assistant", "content": out.text},
                {"role": "user", "content": f"{INFO_OPEN}{reply.text[:INFORMATION_CHARS]}{INFO_CLOSE}\n"
                                            f"Budget: {chat_budget_text(budget, spend)}"}]
        if stopped != "answer" and last is not None:
            answer, finish_reason = last.text, last.finish_reason
        pool_in = sum(t.get("input_tokens", 0) for t in trace)
        pool_out = sum(t.get("output_tokens", 0) for t in trace)
        usage.update({"prompt_tokens": pool_in, "completion_tokens": pool_out, "total_tokens": pool_in + pool_out,
                      "cost_usd": spend.usd})
        return {"answer": answer, "finish_reason": finish_reason, "trace": trace, "spend": spend.to_dict(),
                "stopped": stopped, "usage": usage, "budget": budget.to_dict(), "malformed_router_turns": malformed}

    async def _call_with_fallback(self, tier: str, messages, budget, spend, max_tokens, input_bound, sampling,
                                  step: dict, trace: list[dict]) -> PoolReply:
        """Call ``tier``; when all its attempts fail, the next cheaper tier the budget allows."""
        failed: list[dict] = []
        candidates = [tier] + [t for t in reversed(allowed_tiers(self.pool, budget, spend, input_bound, max_tokens))
                               if self.pool.index(t) < self.pool.index(tier)]
        for name in candidates:
            limit = max_output_tokens(self.pool[name], budget, spend, input_bound, max_tokens)
            try:
                reply = await self.pool_client.complete(name, messages, limit, input_bound, sampling)
            except PoolCallError as err:
                failed.append({"tier": name, "attempts": [vars(a) for a in err.attempts]})
                continue
            if failed:
                self.metrics.fallbacks.labels(reason="pool_failure").inc()
                step["failed_tiers"] = failed
                step["fallback"] = f"{', '.join(f['tier'] for f in failed)} failed; used {name}"
            return reply
        step["failed_tiers"] = failed
        raise UpstreamError(f"every allowed tier failed ({', '.join(f['tier'] for f in failed)}); see the trace",
                            trace + [step])


def pool_descriptors(config: ServeConfig, checkpoint_meta: dict[str, Any]) -> list[dict]:
    """The pool as the router prompt shows it: the serving prices, and each tier's
    descriptor from the pool config or, when it has none, from the checkpoint. A cached-input
    price is shown only when the checkpoint was trained with one (its prompt never had it
    otherwise)."""
    trained = {t["name"]: t for t in checkpoint_meta.get("pool", [])}
    names = set(config.pool.names)
    if trained and names != set(trained):
        raise ValueError(f"pool config tiers {sorted(names)} differ from the checkpoint's {sorted(trained)}: "
                         "the router can only route to the tiers it was trained on")
    described = config.pool.describe()
    for tier in described:
        if not tier["descriptor"]:
            tier["descriptor"] = trained.get(tier["name"], {}).get("descriptor", "")
        if trained and "usd_per_1m_cached_input" not in trained.get(tier["name"], {}):
            # billed at it all the same; shown only to routers trained with cached prices
            tier.pop("usd_per_1m_cached_input", None)
    return described
