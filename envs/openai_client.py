"""One client for OpenAI-compatible ``/chat/completions`` endpoints, sync and async: the
executors of the text-game worlds, the simulated executors' round trips, the server's pool
calls and the benchmarks all call models through it.

One call = up to ``1 + max_retries`` attempts. A timeout, a connection error, 429 or a 5xx
is retried after ``retry_backoff_s · 2^k`` seconds, or after the server's ``Retry-After``
(at most ``MAX_RETRY_AFTER_S``); any other answer is final. The API key is read from the
environment variable ``api_key_env`` at call time and never appears in an error or a
trace. ``usage_tokens`` reads the token counts a reply was billed for.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass, field

import httpx

RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
MAX_RETRY_AFTER_S = 10.0


@dataclass
class Attempt:
    """One HTTP attempt: its status (None when no answer came) and what went wrong."""

    status: int | None
    error: str | None = None
    seconds: float = 0.0


class ChatCallError(RuntimeError):
    """Every attempt of one call failed (or one failed in a way no retry can mend)."""

    def __init__(self, url: str, attempts: list[Attempt]):
        last = attempts[-1]
        super().__init__(f"{len(attempts)} attempt(s) at {url} failed; last: {last.error}")
        self.url = url
        self.attempts = attempts

    @property
    def refused(self) -> bool:
        """The server answered with a status no retry can change (e.g. 401, 404)."""
        status = self.attempts[-1].status
        return status is not None and status != 200 and status not in RETRYABLE_STATUS


def retry_after_seconds(value: str | None) -> float | None:
    """A ``Retry-After`` header in seconds, clipped to [0, 10]; None when absent or not a number."""
    try:
        return min(max(float(value), 0.0), MAX_RETRY_AFTER_S) if value is not None else None
    except ValueError:
        return None


def error_message(status: int, body: bytes | str | None) -> str:
    """``HTTP <status>[: <the server's error message>]`` from an OpenAI-style error body."""
    try:
        message = json.loads(body or b"{}").get("error", {})
        message = message.get("message") if isinstance(message, dict) else message
    except (ValueError, AttributeError):
        message = None
    return f"HTTP {status}" + (f": {str(message)[:200]}" if message else "")


def usage_tokens(data: dict) -> tuple[int, int] | None:
    """(prompt, completion) tokens of an OpenAI-style response's ``usage``; None without one."""
    usage = data.get("usage") or {}
    try:
        return int(usage["prompt_tokens"]), int(usage["completion_tokens"])
    except (KeyError, TypeError, ValueError):
        return None


def reply_text(data: dict) -> str | None:
    """``choices[0].message.content`` of a chat completion; None when the response has none."""
    try:
        return data["choices"][0]["message"]["content"] or ""
    except (KeyError, IndexError, TypeError):
        return None


@dataclass
class ChatEndpoint:
    """An OpenAI-compatible endpoint: ``base_url`` ends in ``/v1`` (or wherever
    ``/chat/completions`` sits), ``model`` is the name it serves."""

    base_url: str
    model: str
    api_key_env: str | None = None
    timeout_s: float = 30.0
    max_retries: int = 3
    retry_backoff_s: float = 0.5
    calls: int = field(default=0, init=False)  # attempts made, retries included
    retries: int = field(default=0, init=False)
    _http: httpx.Client | None = field(default=None, init=False, repr=False)  # made on first sync call

    def __getstate__(self) -> dict:  # a live connection pool is not copied or pickled (Ray ships worlds)
        return {**self.__dict__, "_http": None}

    def __post_init__(self):
        if not str(self.base_url).startswith(("http://", "https://")):
            raise ValueError(f"endpoint must be an http(s) URL, got {self.base_url!r}")
        self.base_url = str(self.base_url).rstrip("/")

    @property
    def url(self) -> str:
        return f"{self.base_url}/chat/completions"

    def headers(self) -> dict:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _record(self, attempts: list[Attempt], k: int, seconds: float, response: httpx.Response | None,
                failure: Exception | None) -> tuple[dict | None, float | None]:
        """Record attempt ``k``: (the parsed JSON of a good answer, else None; the seconds to
        wait before the next attempt, None when there is none)."""
        self.calls += 1
        data, retry, retry_after = None, False, None
        if isinstance(failure, httpx.TimeoutException):
            attempt, retry = Attempt(None, f"timeout after {self.timeout_s:g}s", seconds), True
        elif failure is not None:
            attempt, retry = Attempt(None, f"connection error: {type(failure).__name__}", seconds), True
        elif response.status_code != 200:
            attempt = Attempt(response.status_code, error_message(response.status_code, response.content), seconds)
            retry = response.status_code in RETRYABLE_STATUS
            retry_after = retry_after_seconds(response.headers.get("retry-after"))
        else:
            try:
                attempt, data = Attempt(200, None, seconds), response.json()
            except ValueError:
                attempt = Attempt(200, "answered 200 with a body that is not JSON; is it an OpenAI-compatible "
                                       "server?", seconds)
        attempts.append(attempt)
        if data is not None or not retry or k == self.max_retries:
            return data, None
        self.retries += 1
        return None, retry_after if retry_after is not None else self.retry_backoff_s * 2 ** k

    def _result(self, data: dict | None, attempts: list[Attempt]) -> tuple[dict, list[Attempt]]:
        if data is None:
            raise ChatCallError(self.url, attempts)
        return data, attempts

    def _body(self, messages: list[dict], max_tokens: int, extra: dict | None) -> dict:
        return {"model": self.model, "messages": messages, "max_tokens": int(max_tokens), **(extra or {})}

    def complete(self, messages: list[dict], max_tokens: int, extra: dict | None = None,
                 client: httpx.Client | None = None) -> tuple[dict, list[Attempt]]:
        """One chat completion with retries: (the response's JSON, its attempts); raises
        ``ChatCallError`` when no attempt got a JSON answer. Without ``client``, the
        endpoint's own connection pool (kept between calls)."""
        body, attempts = self._body(messages, max_tokens, extra), []
        if client is None:
            self._http = client = self._http or httpx.Client()
        for k in range(self.max_retries + 1):
            start, response, failure = time.perf_counter(), None, None
            try:
                response = client.post(self.url, json=body, headers=self.headers(), timeout=self.timeout_s)
            except httpx.TransportError as err:
                failure = err
            data, wait = self._record(attempts, k, time.perf_counter() - start, response, failure)
            if data is not None or wait is None:
                break
            time.sleep(wait)
        return self._result(data, attempts)

    async def acomplete(self, messages: list[dict], max_tokens: int, client: httpx.AsyncClient,
                        extra: dict | None = None) -> tuple[dict, list[Attempt]]:
        """``complete`` on an ``httpx.AsyncClient`` (the server's event loop)."""
        return await self.apost(self._body(messages, max_tokens, extra), client)

    async def apost(self, body: dict, client: httpx.AsyncClient) -> tuple[dict, list[Attempt]]:
        """POST ``body`` as it is (a gateway forwards an agent's request) with retries."""
        attempts = []
        for k in range(self.max_retries + 1):
            start, response, failure = time.perf_counter(), None, None
            try:
                response = await client.post(self.url, json=body, headers=self.headers(), timeout=self.timeout_s)
            except httpx.TransportError as err:
                failure = err
            data, wait = self._record(attempts, k, time.perf_counter() - start, response, failure)
            if data is not None or wait is None:
                break
            await asyncio.sleep(wait)
        return self._result(data, attempts)

    async def astream(self, body: dict, client: httpx.AsyncClient) -> tuple[httpx.Response, list[Attempt]]:
        """POST a ``stream: true`` body; retries happen before the first byte only. Returns the
        open 200 response (the caller reads its SSE lines and closes it) and the attempts;
        raises ``ChatCallError`` like ``apost``."""
        attempts: list[Attempt] = []
        for k in range(self.max_retries + 1):
            start, response, failure = time.perf_counter(), None, None
            try:
                request = client.build_request("POST", self.url, json=body, headers=self.headers(),
                                               timeout=self.timeout_s)
                response = await client.send(request, stream=True)
            except httpx.TransportError as err:
                failure = err
            if response is not None and response.status_code == 200:
                self.calls += 1
                attempts.append(Attempt(200, None, time.perf_counter() - start))
                return response, attempts
            if response is not None:
                await response.aread()
                await response.aclose()
            _, wait = self._record(attempts, k, time.perf_counter() - start, response, failure)
            if wait is None:
                break
            await asyncio.sleep(wait)
        raise ChatCallError(self.url, attempts)
