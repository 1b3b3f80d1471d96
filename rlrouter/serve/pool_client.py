"""Calls to the pool's models over their OpenAI-compatible ``/chat/completions``, through
``envs.openai_client`` (retries, ``Retry-After``, keys read at call time and never shown).

One call = up to ``1 + max_retries`` attempts (the tier's), backing off
``server.retry_backoff_s · 2^k`` seconds. Tokens and dollars come from the response's
``usage``; a reply without ``usage`` is charged its worst case (the input bound and
``max_tokens``) and marked ``usage_estimated``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import httpx

from envs.openai_client import Attempt, ChatCallError, ChatEndpoint, reply_text, usage_tokens
from rlrouter.serve.config import ServeConfig


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
        self.endpoints = {tier: ChatEndpoint(e.base_url, e.model, e.api_key_env, e.timeout_s, e.max_retries,
                                             config.retry_backoff_s) for tier, e in config.endpoints.items()}

    async def aclose(self) -> None:
        await self.client.aclose()

    async def complete(self, tier: str, messages: list[dict], max_tokens: int, input_bound: int,
                       sampling: dict | None = None) -> PoolReply:
        """One call to ``tier`` with retries; raises ``PoolCallError`` when all attempts fail."""
        try:
            data, attempts = await self.endpoints[tier].acomplete(messages, max_tokens, self.client, sampling)
        except ChatCallError as err:
            self._count(tier, "retry", len(err.attempts) - 1)
            self._count(tier, "failed")
            raise PoolCallError(tier, err.attempts) from None
        self._count(tier, "retry", len(attempts) - 1)
        text = reply_text(data)
        if text is None:
            attempts[-1].error = "malformed response (no choices[0].message.content)"
            self._count(tier, "failed")
            raise PoolCallError(tier, attempts)
        self._count(tier, "ok")
        counted = usage_tokens(data)
        n_in, n_out = counted or (input_bound, max_tokens)
        finish = (data["choices"][0].get("finish_reason") or "stop")
        return PoolReply(tier, text, n_in, n_out, self.config.pool[tier].cost_usd(n_in, n_out), finish,
                         counted is None, attempts)

    def _count(self, tier: str, outcome: str, n: int = 1) -> None:
        if self.metrics is not None and n:
            self.metrics.pool_calls.labels(tier=tier, outcome=outcome).inc(n)
