"""Calls to the pool's models over their OpenAI-compatible ``/chat/completions``.

One call = up to ``1 + max_retries`` attempts. A timeout, a connection error, 429 or a 5xx
is retried after ``retry_backoff_s · 2^k`` seconds (or the server's ``Retry-After``, at
most 10 s); any other answer is final. Tokens and dollars come from the response's
``usage``; a reply without ``usage`` is charged its worst case (the input bound and
``max_tokens``) and marked ``usage_estimated``. API keys are read from the environment at
call time and never appear in errors, traces or logs.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field

import httpx

from envs.executors import RETRYABLE_STATUS, error_message, retry_after_seconds, usage_tokens
from rlrouter.serve.config import ServeConfig


@dataclass
class Attempt:
    tier: str
    status: int | None  # HTTP status; None when no answer came (timeout, connection error)
    error: str | None = None
    seconds: float = 0.0


@dataclass
class PoolReply:
    tier: str
    text: str
    input_tokens: int
    output_tokens: int
    cost_usd: float
    finish_reason: str = "stop"
    usage_estimated: bool = False
    attempts: list[Attempt] = field(default_factory=list)

    def trace(self) -> dict:
        data = asdict(self)
        data.pop("text")
        return data


class PoolCallError(RuntimeError):
    """Every attempt at one tier failed."""

    def __init__(self, tier: str, attempts: list[Attempt]):
        last = attempts[-1]
        super().__init__(f"tier {tier!r}: {len(attempts)} attempt(s) failed; last: "
                         f"{last.status or ''} {last.error or ''}".strip())
        self.tier = tier
        self.attempts = attempts


class PoolClient:
    def __init__(self, config: ServeConfig, metrics=None, client: httpx.AsyncClient | None = None):
        self.config = config
        self.metrics = metrics
        self.client = client or httpx.AsyncClient(limits=httpx.Limits(max_connections=256))

    async def aclose(self) -> None:
        await self.client.aclose()

    async def complete(self, tier: str, messages: list[dict], max_tokens: int, input_bound: int,
                       sampling: dict | None = None) -> PoolReply:
        """One call to ``tier`` with retries; raises ``PoolCallError`` when all attempts fail."""
        endpoint = self.config.endpoints[tier]
        price = self.config.pool[tier]
        headers = {"Content-Type": "application/json"}
        key = endpoint.api_key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        body = {"model": endpoint.model, "messages": messages, "max_tokens": max_tokens, **(sampling or {})}
        attempts: list[Attempt] = []
        for k in range(endpoint.max_retries + 1):
            start = time.perf_counter()
            retry_after = None
            try:
                response = await self.client.post(f"{endpoint.base_url}/chat/completions", json=body, headers=headers,
                                                  timeout=endpoint.timeout_s)
            except httpx.TimeoutException:
                attempts.append(Attempt(tier, None, f"timeout after {endpoint.timeout_s:g}s",
                                        time.perf_counter() - start))
            except httpx.TransportError as err:
                attempts.append(Attempt(tier, None, f"connection error: {type(err).__name__}",
                                        time.perf_counter() - start))
            else:
                seconds = time.perf_counter() - start
                if response.status_code == 200:
                    reply = self._reply(tier, response, price, max_tokens, input_bound)
                    if reply is not None:
                        attempts.append(Attempt(tier, 200, None, seconds))
                        reply.attempts = attempts
                        self._count(tier, "ok")
                        return reply
                    attempts.append(Attempt(tier, 200, "malformed response (no choices[0].message.content)", seconds))
                    break
                error = error_message(response.status_code, response.content)
                attempts.append(Attempt(tier, response.status_code, error, seconds))
                if response.status_code not in RETRYABLE_STATUS:
                    break
                retry_after = retry_after_seconds(response.headers.get("retry-after"))
            if k < endpoint.max_retries:
                self._count(tier, "retry")
                await asyncio.sleep(retry_after if retry_after is not None
                                    else self.config.retry_backoff_s * 2 ** k)
        self._count(tier, "failed")
        raise PoolCallError(tier, attempts)

    def _reply(self, tier, response, price, max_tokens, input_bound) -> PoolReply | None:
        try:
            data = response.json()
            choice = data["choices"][0]
            text = choice["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError):
            return None
        counted = usage_tokens(data)
        n_in, n_out = counted or (input_bound, max_tokens)
        estimated = counted is None
        return PoolReply(tier, text, n_in, n_out, price.cost_usd(n_in, n_out), choice.get("finish_reason") or "stop",
                         estimated)

    def _count(self, tier: str, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.pool_calls.labels(tier=tier, outcome=outcome).inc()

