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

import re
from dataclasses import dataclass

import numpy as np

from envs.openai_client import ChatCallError, ChatEndpoint, usage_tokens
from envs.pool import Tier
from envs.tokens import count_tokens

ACTION_RE = re.compile(r"^\s*action\s*:\s*(.+?)\s*$", re.IGNORECASE | re.MULTILINE)


AGENT_SYSTEM_PROMPT = (
    "You are an agent in a text environment. Each turn you see the task, your recent commands with "
    "what they did, and the current observation. Think briefly, then reply with one line "
    "'Action: <command>' holding exactly one command the game accepts."
)


@dataclass
class Move:
    """A command an executor wrote, with the tokens the call used."""

    command: str | None
    input_tokens: int
    output_tokens: int
    event: str | None = None  # what a simulated executor knows it wrote: "gold", "wrong" or "look"
    note: str = ""  # why there is no command


class ExecutorError(RuntimeError):
    """A real executor's call failed for good (after its retries)."""


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
        try:
            self.client = ChatEndpoint(self.endpoint, self.model, self.api_key_env, self.timeout_s, self.max_retries,
                                       self.retry_backoff_s)
        except ValueError:
            raise ValueError(f"pool tier {self.tier!r}: executor.endpoint must be an http(s) URL ending in /v1, "
                             f"got {self.endpoint!r}") from None
        if self.api_key_env is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(self.api_key_env)):
            raise ValueError(f"pool tier {self.tier!r}: executor.api_key_env must name an environment variable "
                             f"(e.g. OPENAI_API_KEY), not hold the key itself")
        self.url = self.client.url
        self.invalid = 0

    @property
    def calls(self) -> int:
        return self.client.calls

    @property
    def retries(self) -> int:
        return self.client.retries

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
        """One chat completion with bounded retries (``envs.openai_client``); the parsed JSON response."""
        try:
            extra = {"temperature": self.temperature, **(extra or {})}
            return self.client.complete(messages, self.max_tokens, extra)[0]
        except ChatCallError as err:
            last = err.attempts[-1].error
            if err.refused:
                status = err.attempts[-1].status
                hint = f"; check the key in ${self.api_key_env}" if status in (401, 403) and self.api_key_env else ""
                raise ExecutorError(f"pool tier {self.tier!r}: {self.url} refused the call ({last}){hint}") from None
            if err.attempts[-1].status == 200:
                raise ExecutorError(f"pool tier {self.tier!r}: {self.url} {last}") from None
            raise ExecutorError(f"pool tier {self.tier!r}: {err}") from None


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
