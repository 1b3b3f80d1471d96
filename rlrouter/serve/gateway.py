"""Gateway mode: rlrouter as the ``base_url`` of an unmodified agent.

An agent built on LangGraph, the OpenAI Agents SDK, smolagents or plain ``openai`` tool
calling sends one ``/chat/completions`` request per step, with its whole history and its
tools. With ``model: "rlrouter/auto"`` (``server.gateway_model``) each such request is one
step of a **task**:

1. *Which task*: the ``X-Rlrouter-Task`` header, else ``metadata.rlrouter_task``, else the
   request's ``user``, else a hash of the system and first user message (what every step of
   one agent run repeats). Its budget comes from the first request (``X-Rlrouter-Budget``
   header with a JSON object, or the body field ``budget``), from ``POST /v1/tasks``, or
   ``server.default_budget``.
2. *Which tier*: the router reads the trained step prompt (task = the first user message,
   history = the task's earlier steps and their tiers from the ledger, next step = the last
   message) and picks among the tiers the task's remaining budget can pay for.
3. *Reserve*: the worst case of the call (its input bound, and ``max_tokens`` capped to what
   the budget left pays for) is reserved in the task ledger (``rlrouter.serve.ledger``).
4. *Forward*: the request goes to the tier's endpoint with ``model`` (and the capped
   ``max_tokens``) rewritten and rlrouter's own fields removed; tools, tool calls, response
   format and streaming pass through. Failures: the tier's retries, then the next cheaper
   tier the budget allows.
5. *Settle*: the reservation becomes the real cost from the reply's ``usage`` (cached prompt
   tokens at the tier's cached-input price); the reply goes back as it came, with headers
   naming the tier and the task's spend. Each step is appended to ``server.traffic_log``.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

from envs.budget import Budget
from envs.openai_client import ChatCallError
from envs.pool import Tier
from rlrouter.serve.ledger import PICO, TaskState, new_reservation_id, same_budget, settle_with_retries
from rlrouter.serve.service import MIN_OUTPUT_TOKENS, RouterService, Spend

TASK_HEADER = "x-rlrouter-task"
BUDGET_HEADER = "x-rlrouter-budget"
OWN_FIELDS = ("budget",)  # body fields rlrouter reads and never forwards
OWN_METADATA = ("rlrouter_task", "rlrouter_budget")
RESERVE_ATTEMPTS = 8  # a reserve refused because a concurrent step of the task reserved first is retried
OBSERVATION_CHARS = 200  # the text of a step kept in the ledger (the router's history shows tier and event)


class GatewayError(Exception):
    """An error the app returns in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


# -- reading a request ------------------------------------------------------------------
def message_text(message: dict) -> str:
    """What a message says: its text content (string or text parts), or its tool calls."""
    content = message.get("content")
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    text = content if isinstance(content, str) else ""
    if message.get("tool_calls"):
        calls = [c.get("function", {}) for c in message["tool_calls"] if isinstance(c, dict)]
        text += " ".join(f"{c.get('name')}({c.get('arguments', '')})" for c in calls)
    return text


def check_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise GatewayError(400, "messages must be a non-empty list of chat messages", param="messages",
                           code="invalid_value")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise GatewayError(400, f"messages[{i}] must be an object with a 'role'", param=f"messages.{i}",
                               code="invalid_value")
    if not any(m["role"] == "user" for m in messages):
        raise GatewayError(400, "messages must hold at least one user message (the task)", param="messages",
                           code="invalid_value")
    return messages


def task_identity(headers: dict, body: dict, messages: list[dict]) -> tuple[str, str]:
    """(task id, where it came from)."""
    metadata = body.get("metadata") if isinstance(body.get("metadata"), dict) else {}
    for value, source in ((headers.get(TASK_HEADER), "header"), (metadata.get("rlrouter_task"), "metadata"),
                          (body.get("user"), "user")):
        if value is not None:
            if not isinstance(value, str) or not value.strip() or len(value) > 256:
                raise GatewayError(400, f"the task id from the {source} must be a non-empty string of at most "
                                        "256 characters", param=TASK_HEADER if source == "header" else source,
                                   code="invalid_task_id")
            return value.strip(), source
    opening = [m for m in messages if m["role"] in ("system", "developer")][:1] + \
        [next(m for m in messages if m["role"] == "user")]
    digest = hashlib.sha256(json.dumps([message_text(m) for m in opening]).encode()).hexdigest()[:24]
    return f"auto-{digest}", "derived"


def requested_budget(headers: dict, body: dict, pool) -> Budget | None:
    """The budget the request states, or None; a malformed one is a 400 naming where it was."""
    metadata = body.get("metadata") if isinstance(body.get("metadata"), dict) else {}
    for raw, param in ((headers.get(BUDGET_HEADER), BUDGET_HEADER), (body.get("budget"), "budget"),
                       (metadata.get("rlrouter_budget"), "metadata.rlrouter_budget")):
        if raw is None:
            continue
        if isinstance(raw, str):
            try:
                raw = json.loads(raw)
            except ValueError:
                raise GatewayError(400, f"{param} must be a JSON object like {{\"usd\": 0.05, \"large_calls\": 3}}",
                                   param=param, code="invalid_budget") from None
        try:
            budget = Budget.from_dict(raw, where=param)
            budget.check_tiers(pool)
        except (ValueError, TypeError) as err:
            raise GatewayError(400, str(err), param=param, code="invalid_budget") from None
        return budget
    return None


def input_token_bound(body: dict, overhead: int, tools_overhead: int) -> int:
    """Upper bound on the prompt tokens of forwarding ``body``: the UTF-8 bytes of its
    messages, tools and response format as JSON (byte-level BPE never makes more tokens than
    bytes), ``overhead`` per message for the chat template's role markers, and
    ``tools_overhead`` once when tools are sent (templates add a tool-use instruction)."""
    shown = {k: body[k] for k in ("messages", "tools", "tool_choice", "response_format") if body.get(k) is not None}
    n = len(json.dumps(shown, ensure_ascii=False).encode())
    return n + overhead * (len(body["messages"]) + 1) + (tools_overhead if body.get("tools") else 0)


def output_limit(body: dict, server_max: int) -> tuple[int, str]:
    """(the most output tokens this step may use, the body key that carries it)."""
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise GatewayError(400, f"{key} must be an integer >= 1, got {value!r}", param=key,
                                   code="invalid_value")
            return min(value, server_max), key
    return server_max, "max_tokens"


def affordable_output_tokens(tier: Tier, state: TaskState, input_bound: int, limit: int) -> int:
    """Most output tokens a call to ``tier`` may use with ``input_bound`` prompt tokens given
    the task's settled spend and open reservations; 0 = the tier cannot be paid."""
    calls_left = state.calls_left(tier.name)
    if calls_left is not None and calls_left <= 0:
        return 0
    left = state.left_pico()
    if left is None:
        return limit
    p_in, _, p_out = tier.pico_prices()
    left -= input_bound * p_in
    if left < 0:
        return 0
    return limit if p_out == 0 else min(limit, left // p_out)


def call_cost_pico(tier: Tier, usage: dict | None) -> tuple[int, dict] | None:
    """(cost in pico-dollars, tokens) of a reply's ``usage``; None when it has none."""
    try:
        n_in, n_out = int(usage["prompt_tokens"]), int(usage["completion_tokens"])
    except (KeyError, TypeError, ValueError):
        return None
    details = usage.get("prompt_tokens_details") or {}
    cached = min(max(int(details.get("cached_tokens") or 0), 0), n_in)
    p_in, p_cached, p_out = tier.pico_prices()
    return ((n_in - cached) * p_in + cached * p_cached + n_out * p_out,
            {"prompt_tokens": n_in, "completion_tokens": n_out, "cached_tokens": cached})


def forwarded_body(body: dict, model: str, limit_key: str, max_tokens: int, stream: bool) -> dict:
    """The agent's request as the tier receives it: ``model`` and the capped output limit
    rewritten, rlrouter's own fields removed, usage asked for when streaming."""
    out = {k: v for k, v in body.items() if k not in OWN_FIELDS}
    out["model"] = model
    out[limit_key] = max_tokens
    if isinstance(out.get("metadata"), dict):
        kept = {k: v for k, v in out["metadata"].items() if k not in OWN_METADATA}
        if kept:
            out["metadata"] = kept
        else:
            out.pop("metadata")
    if stream:
        out["stream_options"] = {**(out.get("stream_options") or {}), "include_usage": True}
    return out


@dataclass
class Step:
    """One agent step on its way through the gateway."""

    task_id: str
    index: int
    tier: str
    reservation_id: str
    reserved_pico: int
    max_tokens: int
    body: dict
    decision: dict
    started: float  # when the gateway began reading the request
    failed_tiers: list[dict]
    upstream_s: float = 0.0  # time spent waiting on tiers (the pool), fallbacks included
    budget: dict | None = None  # the task's budget (for the traffic log)


class TrafficLog:
    """``server.traffic_log``: one JSON line per gateway step and per posted outcome (no
    headers, no keys: only what the router saw and what the step cost)."""

    def __init__(self, path: str | None):
        self.path = Path(path) if path else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


class Gateway:
    def __init__(self, service: RouterService, ledger, log: TrafficLog):
        self.service, self.ledger, self.log = service, ledger, log
        self.config = service.config
        self.pool = service.pool

    # ---- the decision ----
    async def begin(self, body: dict, headers: dict) -> Step:
        """Read the request, open its task, route, reserve. Raises ``GatewayError``."""
        began = time.perf_counter()
        messages = check_messages(body)
        task_id, _ = task_identity(headers, body, messages)
        budget = requested_budget(headers, body, self.pool)
        limit, limit_key = output_limit(body, self.config.max_tokens)
        state, created = await self.ledger.open(task_id, budget or self.config.default_budget)
        if not created and budget is not None and not same_budget(budget, state.budget):
            raise GatewayError(409, f"task {task_id!r} already has budget {state.budget.label}; a later request "
                                    f"cannot change it to {budget.label} (start a new task id)",
                               param="budget", code="budget_conflict")
        bound = input_token_bound(body, self.config.input_overhead_tokens, self.config.tools_overhead_tokens)
        least = min(MIN_OUTPUT_TOKENS, limit)
        allowed = [t.name for t in self.pool.tiers if affordable_output_tokens(t, state, bound, limit) >= least]
        if not allowed:
            raise GatewayError(402, f"task {task_id!r} has spent ${state.spent_usd:.6f} of its budget "
                                    f"{state.budget.label}: it cannot pay for this step on any tier (its prompt "
                                    f"may be {bound} tokens)", param="budget", code="budget_exhausted")
        request = {"task": message_text(next(m for m in messages if m["role"] == "user")),
                   "next_step": message_text(messages[-1]) or messages[-1]["role"],
                   "history": [{"tier": s["tier"], "event": s.get("event", "ok")} for s in state.steps],
                   "step_index": len(state.steps)}
        spend = Spend((state.spent_pico + state.reserved_pico) / PICO,
                      {t: state.calls.get(t, 0) + state.reserved_calls.get(t, 0) for t in self.pool.names})
        start = time.perf_counter()
        decision = await self.service.route(request, state.budget, spend, allowed=allowed, mode="gateway")
        decision["seconds"] = time.perf_counter() - start
        decision["step_prompt"] = self.service.step_user_text(request, state.budget, spend)
        candidates = [decision["tier"]] + [t for t in reversed(allowed)
                                           if self.pool.index(t) < self.pool.index(decision["tier"])]
        for tier in candidates:
            reserved = await self._reserve(task_id, self.pool[tier], bound, limit, state)
            if reserved is not None:
                rid, pico, tokens = reserved
                return Step(task_id, len(state.steps), tier, rid, pico, tokens, dict(body, _limit_key=limit_key),
                            decision, began, [], budget=state.budget.to_dict())
        raise GatewayError(402, f"task {task_id!r}: concurrent steps reserved what is left of its budget "
                                f"{state.budget.label}", param="budget", code="budget_exhausted")

    async def _reserve(self, task_id: str, tier: Tier, bound: int, limit: int,
                       state: TaskState | None = None) -> tuple[str, int, int] | None:
        """Reserve the most output tokens of ``tier`` the task can pay for (at most ``limit``):
        (reservation id, pico-dollars, tokens), or None. ``state``: a snapshot to size the
        first attempt with (the store decides atomically; a refusal re-reads it)."""
        least = min(MIN_OUTPUT_TOKENS, limit)
        for attempt in range(RESERVE_ATTEMPTS):
            if attempt > 0 or state is None:
                state = await self.ledger.state(task_id, steps=False)
            if state is None:
                raise GatewayError(404, f"task {task_id!r} expired while this step was being routed",
                                   param="task", code="task_not_found")
            tokens = affordable_output_tokens(tier, state, bound, limit)
            if tokens < least:
                return None
            p_in, _, p_out = tier.pico_prices()
            pico = bound * p_in + tokens * p_out
            rid = new_reservation_id()
            outcome = await self.ledger.reserve(task_id, rid, tier.name, pico)
            if outcome == "ok":
                return rid, pico, tokens
            if outcome == "unknown_task":
                raise GatewayError(404, f"task {task_id!r} expired while this step was being routed",
                                   param="task", code="task_not_found")
        return None

    # ---- forwarding ----
    def _tier_body(self, step: Step, stream: bool) -> dict:
        body = {k: v for k, v in step.body.items() if k != "_limit_key"}
        return forwarded_body(body, self.config.endpoints[step.tier].model, step.body["_limit_key"], step.max_tokens,
                              stream)

    async def _next_tier(self, step: Step, error: ChatCallError) -> bool:
        """After ``step.tier`` failed: release it and reserve the next cheaper tier the task
        can pay for. False when none is left."""
        await self.ledger.release(step.task_id, step.reservation_id)
        step.failed_tiers.append({"tier": step.tier, "error": error.attempts[-1].error})
        if error.refused:  # the tier refused the request itself (4xx): another tier would too
            raise GatewayError(error.attempts[-1].status or 400, f"tier {step.tier!r} refused the request: "
                               f"{error.attempts[-1].error}", code="upstream_refused")
        bound = input_token_bound(step.body, self.config.input_overhead_tokens, self.config.tools_overhead_tokens)
        limit, _ = output_limit(step.body, self.config.max_tokens)
        for tier in reversed(self.pool.names[:self.pool.index(step.tier)]):
            reserved = await self._reserve(step.task_id, self.pool[tier], bound, limit)
            if reserved is not None:
                step.tier, (step.reservation_id, step.reserved_pico, step.max_tokens) = tier, reserved
                self.service.metrics.fallbacks.labels(reason="pool_failure").inc()
                return True
        return False

    async def complete(self, step: Step) -> tuple[dict, dict]:
        """Forward a non-streaming step: (the tier's JSON, the step's record)."""
        client = self.service.pool_client
        start = time.perf_counter()
        while True:
            try:
                data, _ = await client.endpoints[step.tier].apost(self._tier_body(step, False), client.client)
                break
            except ChatCallError as err:
                if not await self._next_tier(step, err):
                    raise GatewayError(502, f"every tier the budget allows failed: {step.failed_tiers}",
                                       code="pool_unavailable", kind="upstream_error") from None
        step.upstream_s = time.perf_counter() - start
        record = await self.settle(step, data.get("usage"), _finish_reason(data))
        return data, record

    async def stream(self, step: Step) -> AsyncIterator[str]:
        """Forward a streaming step; open the tier's stream before the first byte goes back
        (so a failing tier still falls back), then relay its SSE lines and settle at the end."""
        client = self.service.pool_client
        step.upstream_s = -time.perf_counter()  # until the relay has read the tier's last line
        while True:
            try:
                response, _ = await client.endpoints[step.tier].astream(self._tier_body(step, True), client.client)
                break
            except ChatCallError as err:
                if not await self._next_tier(step, err):
                    raise GatewayError(502, f"every tier the budget allows failed: {step.failed_tiers}",
                                       code="pool_unavailable", kind="upstream_error") from None
        wants_usage = bool((step.body.get("stream_options") or {}).get("include_usage"))
        return self._relay(step, response, wants_usage)

    async def _relay(self, step: Step, response, wants_usage: bool) -> AsyncIterator[str]:
        usage, finish, skip_blank = None, None, False
        try:
            async for line in response.aiter_lines():
                if skip_blank and line == "":
                    skip_blank = False
                    continue
                if line.startswith("data: ") and line != "data: [DONE]":
                    try:
                        chunk = json.loads(line[6:])
                    except ValueError:
                        chunk = {}
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    for choice in chunk.get("choices") or []:
                        finish = choice.get("finish_reason") or finish
                    if not wants_usage and not chunk.get("choices") and chunk.get("usage"):
                        skip_blank = True  # the usage chunk the gateway asked for; the agent did not
                        continue
                yield line + "\n"
        finally:
            await response.aclose()
            step.upstream_s += time.perf_counter()
            await self.settle(step, usage, finish)

    async def settle(self, step: Step, usage: dict | None, finish_reason: str | None) -> dict:
        """Charge the step's real cost (its reservation when the reply had no usage), log it."""
        tier = self.pool[step.tier]
        counted = call_cost_pico(tier, usage)
        pico, tokens = counted if counted is not None else (step.reserved_pico, {})
        record = {"tier": step.tier, "event": "ok", "finish_reason": finish_reason, **tokens,
                  "cost_usd": pico / PICO, "usage_estimated": counted is None,
                  "observation": message_text(step.body["messages"][-1])[:OBSERVATION_CHARS]}
        settled = await settle_with_retries(self.ledger, 3, step.task_id, step.reservation_id, step.tier, pico,
                                            record)
        self.service.metrics.cost.labels(tier=step.tier).inc(pico / PICO)
        self.log.write({"time": time.time(), "task": step.task_id, "step": step.index, "tier": step.tier,
                        "router_tier": step.decision["tier"], "allowed_tiers": step.decision["allowed_tiers"],
                        "step_prompt": step.decision["step_prompt"], "malformed": step.decision["malformed"],
                        "decision_s": step.decision["seconds"], "upstream_s": step.upstream_s,
                        "latency_s": time.perf_counter() - step.started,
                        "failed_tiers": step.failed_tiers, "budget": step.budget, "settled": bool(settled), **record})
        return {**record, "settled": settled}

    async def headers(self, step: Step) -> dict:
        state = await self.ledger.state(step.task_id, steps=False)
        out = {"x-rlrouter-tier": step.tier, "x-rlrouter-task": step.task_id,
               "x-rlrouter-router-tier": step.decision["tier"],
               "server-timing": f"router;dur={1000 * step.decision['seconds']:.3f}"}
        if step.upstream_s > 0:  # a whole reply: the tier has answered (a stream's headers go first)
            out["server-timing"] += f", upstream;dur={1000 * step.upstream_s:.3f}"
        if state is not None:
            out["x-rlrouter-task-spent-usd"] = f"{state.spent_usd:.9f}"
            left = state.left_pico()
            if left is not None:
                out["x-rlrouter-task-left-usd"] = f"{max(left, 0) / PICO:.9f}"
        return out


def _finish_reason(data: dict) -> str | None:
    try:
        return data["choices"][0].get("finish_reason")
    except (KeyError, IndexError, TypeError, AttributeError):
        return None


def outcome_record(body: Any) -> dict:
    """A task's posted outcome: ``{"success": bool}`` and optionally ``"score"`` (a number)."""
    if not isinstance(body, dict) or not isinstance(body.get("success"), bool):
        raise GatewayError(400, "an outcome is a JSON object with success: true|false (and optionally score: "
                                "a number)", param="success", code="invalid_value")
    score = body.get("score")
    if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))):
        raise GatewayError(400, f"score must be a number, got {score!r}", param="score", code="invalid_value")
    unknown = set(body) - {"success", "score"}
    if unknown:
        raise GatewayError(400, f"unknown outcome field(s) {sorted(unknown)}; allowed: success, score",
                           param=sorted(unknown)[0], code="invalid_value")
    return {"success": body["success"], **({"score": float(score)} if score is not None else {})}
