"""Executors of the text-game worlds: the models that write the agent's commands.

``build_executor(tier, spec, world)`` reads a tier's ``executor:`` mapping:

- ``{kind: simulated, skill, output_tokens_mean}``: the gold command with a tier- and
  step-dependent probability (see :mod:`envs.worlds.textgame`).
- ``{kind: openai, endpoint, model, api_key_env, max_tokens, timeout_s, max_retries,
  retry_backoff_s, prompt_token_margin, temperature, max_listed_commands,
  constrain_to_admissible}``: a real LLM behind an
  OpenAI-compatible ``/chat/completions`` (vLLM's server, a hosted API). The prompt is
  ReAct-style: task, the last ``history_steps`` commands with what they did, the current
  observation and (when there are at most ``max_listed_commands``) the admissible commands;
  the reply's ``Action: <command>`` line is the command. A reply without one, or with a
  command the game does not list as admissible, is an *invalid* step: no command reaches
  the game, the step is counted and paid for. Tokens (and so dollars, at the tier's list
  prices) come from the response's ``usage``; a reply without ``usage`` is charged its
  worst case. A timeout, a connection error, 429 or a 5xx is retried after
  ``retry_backoff_s * 2^k`` s (or the server's ``Retry-After``, at most 10 s), at most
  ``max_retries`` times; then, or on any other error status, the step raises
  :class:`ExecutorError` naming the tier and endpoint. The API key is read from the
  environment variable named by ``api_key_env`` at call time and never logged.
  ``constrain_to_admissible: true`` (vLLM servers only) sends vLLM's ``structured_outputs``
  with a choice of ``Action: <command>`` over the admissible commands, so even a small
  model always writes a valid command (and no thought).

Budgets stay hard with real executors: the worst case of a call is the prompt's token
estimate times ``prompt_token_margin`` (default 1.5, for a tokenizer that counts more
tokens than ours) plus 64, and ``max_tokens`` output (the request's own cap).
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import numpy as np

from envs.pool import Tier
from envs.tokens import count_tokens
from envs.worlds.textgame import AGENT_SYSTEM_PROMPT, Move

RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
MAX_RETRY_AFTER_S = 10.0
ACTION_RE = re.compile(r"^\s*action\s*:\s*(.+?)\s*$", re.IGNORECASE | re.MULTILINE)


class ExecutorError(RuntimeError):
    """A real executor's call failed for good (after its retries)."""


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


def parse_action(reply: str, admissible: list[str]) -> tuple[str | None, str]:
    """The command of a ReAct reply (its last ``Action:`` line), matched case-insensitively to
    an admissible command. Returns ``(command, "")`` or ``(None, why)``."""
    found = ACTION_RE.findall(reply or "")
    if not found:
        return None, "the reply has no 'Action: <command>' line"
    command = found[-1].strip().strip("`'\"").rstrip(".").strip()
    if not admissible:
        return command, ""
    by_lower = {a.lower(): a for a in admissible}
    if command.lower() in by_lower:
        return by_lower[command.lower()], ""
    return None, f"{command[:80]!r} is not an admissible command"


@dataclass
class OpenAIExecutor:
    """A tier whose commands come from an OpenAI-compatible chat endpoint (module docstring)."""

    tier: str
    endpoint: str
    model: str
    api_key_env: str | None = None
    max_tokens: int = 128
    timeout_s: float = 30.0
    max_retries: int = 3
    retry_backoff_s: float = 0.5
    prompt_token_margin: float = 1.5
    temperature: float = 0.0
    max_listed_commands: int = 60
    constrain_to_admissible: bool = False

    def __post_init__(self):
        if not str(self.endpoint).startswith(("http://", "https://")):
            raise ValueError(f"pool tier {self.tier!r}: executor.endpoint must be an http(s) URL ending in /v1, "
                             f"got {self.endpoint!r}")
        if self.api_key_env is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(self.api_key_env)):
            raise ValueError(f"pool tier {self.tier!r}: executor.api_key_env must name an environment variable "
                             f"(e.g. OPENAI_API_KEY), not hold the key itself")
        self.url = str(self.endpoint).rstrip("/") + "/chat/completions"
        self.calls = 0
        self.retries = 0
        self.invalid = 0

    def messages(self, world, state) -> list[dict]:
        c = world.config
        history = state.history[-c.history_steps:] if c.history_steps else []
        lines = [f"Task: {state.task_text}"]
        if history:
            lines.append("Recent steps:")
            lines += [f"> {command}\n{observation}" for command, observation in history]
        lines.append(f"Observation: {state.observation.text.strip()}")
        admissible = state.observation.admissible
        if 0 < len(admissible) <= self.max_listed_commands:
            lines.append("Admissible commands: " + ", ".join(admissible))
        lines.append("Reply with 'Thought: ...' and then 'Action: <command>'.")
        return [{"role": "system", "content": AGENT_SYSTEM_PROMPT}, {"role": "user", "content": "\n".join(lines)}]

    def worst_case_tokens(self, world, state) -> tuple[int, int]:
        estimate = sum(count_tokens(m["content"]) + 4 for m in self.messages(world, state))
        return int(estimate * self.prompt_token_margin) + 64, self.max_tokens

    def act(self, world, state, tier: Tier) -> Move:
        messages = self.messages(world, state)
        extra = None
        if self.constrain_to_admissible and state.observation.admissible:
            extra = {"structured_outputs": {"choice": [f"Action: {a}" for a in state.observation.admissible]}}
        data = self.complete(messages, extra)
        reply = ((data.get("choices") or [{}])[0].get("message") or {}).get("content") or ""
        n_in, n_out = usage_tokens(data) or self.worst_case_tokens(world, state)
        command, why = parse_action(reply, state.observation.admissible)
        if command is None:
            self.invalid += 1
        return Move(command, n_in, n_out, None, why)

    def complete(self, messages: list[dict], extra: dict | None = None) -> dict:
        """One chat completion with bounded retries; the parsed JSON response."""
        body = json.dumps({"model": self.model, "messages": messages, "max_tokens": self.max_tokens,
                           "temperature": self.temperature, **(extra or {})}).encode()
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        failures = []
        for k in range(self.max_retries + 1):
            wait = None
            self.calls += 1
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as reply:
                    payload = reply.read()
                try:
                    return json.loads(payload)
                except ValueError:
                    raise ExecutorError(f"pool tier {self.tier!r}: {self.url} answered 200 with a body that is not "
                                        "JSON; is it an OpenAI-compatible server?") from None
            except urllib.error.HTTPError as err:
                failures.append(error_message(err.code, err.read()))
                if err.code not in RETRYABLE_STATUS:
                    hint = (f"; check the key in ${self.api_key_env}" if err.code in (401, 403) and self.api_key_env
                            else "")
                    raise ExecutorError(f"pool tier {self.tier!r}: {self.url} refused the call "
                                        f"({failures[-1]}){hint}") from None
                wait = retry_after_seconds(err.headers.get("Retry-After"))
            except (TimeoutError, urllib.error.URLError, OSError) as err:
                reason = getattr(err, "reason", err)
                failures.append(f"timeout after {self.timeout_s:g}s" if isinstance(reason, TimeoutError)
                                or "timed out" in str(reason) else f"connection error: {reason}")
            if k < self.max_retries:
                self.retries += 1
                time.sleep(wait if wait is not None else self.retry_backoff_s * 2 ** k)
        raise ExecutorError(f"pool tier {self.tier!r}: {len(failures)} attempt(s) at {self.url} failed; last: "
                            f"{failures[-1]}")


@dataclass(frozen=True)
class SimulatedExecutor:
    """Writes the gold command with a tier- and step-dependent probability
    (:meth:`envs.worlds.textgame.TextGameWorld.simulated_command`); the output is drawn
    log-normal around ``output_tokens_mean``."""

    skill: float
    output_tokens_mean: float = 80.0

    def act(self, world, state, tier: Tier) -> Move:
        command, event = world.simulated_command(state, tier)
        out = self.output_tokens_mean * world.rng(state, 2 + world.pool.index(tier.name)).lognormal(0.0, 0.35)
        output_tokens = int(np.clip(round(out), 8, world.config.max_output_tokens))
        return Move(command, world.agent_prompt_tokens(state), output_tokens, event)

    def worst_case_tokens(self, world, state) -> tuple[int, int]:
        return world.agent_prompt_tokens(state), world.config.max_output_tokens


OPENAI_FIELDS = {"endpoint", "model", "api_key_env", "max_tokens", "timeout_s", "max_retries", "retry_backoff_s",
                 "prompt_token_margin", "temperature", "max_listed_commands", "constrain_to_admissible"}


def build_executor(tier: Tier, spec: dict, world: str):
    """The executor of ``tier`` from its ``executor:`` mapping (module docstring)."""
    spec = dict(spec)
    kind = spec.pop("kind", "simulated")
    where = f"pool tier {tier.name!r} executor"
    if kind == "simulated":
        unknown = set(spec) - {"skill", "output_tokens_mean"}
        if unknown or "skill" not in spec:
            raise ValueError(f"{where}: the {world} world's simulated executor takes skill (required) and "
                             f"output_tokens_mean; got {sorted(spec)}")
        return SimulatedExecutor(float(spec["skill"]), float(spec.get("output_tokens_mean", 80)))
    if kind == "openai":
        unknown = set(spec) - OPENAI_FIELDS
        if unknown or "endpoint" not in spec:
            raise ValueError(f"{where}: kind openai takes endpoint (required) and {sorted(OPENAI_FIELDS - {'endpoint'})}"
                             f"; unknown: {sorted(unknown)}")
        return OpenAIExecutor(tier=tier.name, model=str(spec.pop("model", tier.name)), **spec)
    raise ValueError(f"{where}: kind must be 'simulated' or 'openai', got {kind!r}")
