"""The router prompt format (one place, versioned) and its two parsers.

A routing episode is one multi-turn conversation:

    system     the pool (tiers, descriptors, prices) and the answer format
    user       Task, Budget, and the first step:  "Step 1 (limit 23), 0/18 done. Next: <step text>"
    assistant  <think>…</think><route>TIER</route>
    user       <information>EVENT: OBSERVATION</information> + spend, budget left, next step
    assistant  <think>…</think><route>TIER</route>
    ...

Router-R1-style outputs are understood too: ``<route tier="large">sub-query</route>`` and a
final ``<answer>…</answer>``.

Parsers:
- ``parse_strict`` (training rewards): the whole output must be exactly one
  ``<think>…</think>`` followed by exactly one route to a tier of the pool; anything else is
  a format error (``RouteFormatError``), which the RL reward penalizes.
- ``parse_tolerant`` (serving, evaluation): finds the first route tag anywhere, is
  case-insensitive, and accepts a missing ``</route>`` at the end of a truncated output.
  When no known tier can be read it falls back to ``fallback`` (the caller passes the
  cheapest tier the budget allows) and says why in ``ParsedRoute.error``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PROMPT_FORMAT_VERSION = 1

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ROUTE_OPEN, ROUTE_CLOSE = "<route>", "</route>"
INFO_OPEN, INFO_CLOSE = "<information>", "</information>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
FORMAT_TAGS = (THINK_OPEN, THINK_CLOSE, ROUTE_OPEN, ROUTE_CLOSE, INFO_OPEN, INFO_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)

_STRICT = re.compile(
    r"\s*<think>(?P<think>[^<]*)</think>\s*"
    r"(?:<route>(?P<tier>[^<\s]+)</route>|<route tier=\"(?P<tier2>[^\"<]+)\">(?P<query>[^<]*)</route>)\s*",
    re.S,
)
_TOLERANT = re.compile(
    r"<route(?:\s+tier\s*=\s*[\"']?(?P<tier2>[\w.-]+)[\"']?)?\s*>(?P<body>[^<]*)(?:</route>|$)", re.I | re.S
)
_THINK = re.compile(r"<think>(?P<think>.*?)(?:</think>|$)", re.S)


class RouteFormatError(ValueError):
    """The router's output is not a well-formed route to a known tier."""


@dataclass(frozen=True)
class ParsedRoute:
    tier: str
    think: str = ""
    query: str | None = None  # Router-R1 sub-query, when given
    error: str | None = None  # tolerant parser: why the fallback was used

    @property
    def well_formed(self) -> bool:
        return self.error is None


def parse_strict(text: str, tiers: list[str]) -> ParsedRoute:
    """Exactly ``<think>…</think><route>TIER</route>`` (or the Router-R1 form); else raise."""
    match = _STRICT.fullmatch(text)
    if not match:
        n_routes = len(re.findall(r"<route\b", text))
        detail = "two or more routes" if n_routes > 1 else ("no route" if n_routes == 0 else "malformed tags")
        raise RouteFormatError(f"not <think>…</think><route>TIER</route> ({detail}): {text[:120]!r}")
    tier = match.group("tier") or match.group("tier2")
    if tier not in tiers:
        raise RouteFormatError(f"unknown tier {tier!r}; the pool has {tiers}")
    return ParsedRoute(tier, match.group("think").strip(), match.group("query"))


def parse_tolerant(text: str, tiers: list[str], fallback: str) -> ParsedRoute:
    """First readable route to a known tier; else ``fallback`` with the reason in ``error``."""
    think_match = _THINK.search(text)
    think = think_match.group("think").strip() if think_match else ""
    lowered = {t.lower(): t for t in tiers}
    match = _TOLERANT.search(text)
    if not match:
        return ParsedRoute(fallback, think, error="no <route> tag")
    if match.group("tier2"):
        name, query = match.group("tier2"), match.group("body").strip() or None
    else:
        name, query = match.group("body").strip(), None
    tier = lowered.get(name.lower())
    if tier is None:
        return ParsedRoute(fallback, think, error=f"unknown tier {name!r}")
    return ParsedRoute(tier, think, query)


def parse_route(text: str, tiers: list[str], fallback: str) -> tuple[ParsedRoute, bool]:
    """(route, well_formed): the strict parse when the text is in the trained format, else
    the tolerant one with ``fallback``. Rollouts, evaluation and the server all read a
    router turn this way; ``well_formed`` is what the RL format penalty counts."""
    try:
        return parse_strict(text, tiers), True
    except RouteFormatError:
        return parse_tolerant(text, tiers, fallback=fallback), False


def route_regex(allowed: list[str]) -> str:
    """The strict format over the allowed tiers, as a regex for vLLM's structured outputs."""
    tiers = "|".join(re.escape(t) for t in allowed)
    return (f"{re.escape(THINK_OPEN)}[^<]*{re.escape(THINK_CLOSE)}"
            f"{re.escape(ROUTE_OPEN)}({tiers}){re.escape(ROUTE_CLOSE)}")


def prompt_token_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a router conversation with the generation prompt appended (the chat
    template rendered, then tokenized without adding special tokens a second time)."""
    return batch_prompt_token_ids(tokenizer, [messages])[0]


def batch_prompt_token_ids(tokenizer, conversations: list[list[dict]]) -> list[list[int]]:
    """``prompt_token_ids`` of many conversations with one tokenizer call: the same ids,
    without a Python round trip per prompt (a lockstep rollout step builds one per episode)."""
    if not conversations:
        return []
    texts = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in conversations]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def format_route(tier: str, think: str) -> str:
    """The assistant turn the router is trained to write."""
    return f"{THINK_OPEN}{think}{THINK_CLOSE}{ROUTE_OPEN}{tier}{ROUTE_CLOSE}"


# -- building the conversation from RoutingEnv.view() ------------------------------------
def system_message(pool_descriptors: list[dict]) -> str:
    lines = ["You route each step of an agent to one model of the pool, within the task's budget.", "Pool:"]
    for tier in pool_descriptors:
        lines.append(
            f"- {tier['name']}: ${tier['usd_per_1m_input']:.2f}/${tier['usd_per_1m_output']:.2f} per 1M tokens. "
            f"{tier.get('descriptor', '')}".rstrip()
        )
    lines.append("Reply <think>short reasoning</think><route>TIER</route>.")
    return "\n".join(lines)


OBSERVATION_CHARS = 60  # feedback observations are cut to this many characters


def budget_text(view: dict) -> str:
    parts = []
    if view["budget"].get("usd") is not None:
        parts.append(f"${view['usd_left']:.4f} of ${view['budget']['usd']:.4f} left")
    for tier, left in sorted(view["calls_left"].items()):
        parts.append(f"{tier} calls {left} of {view['budget']['max_calls'][tier]} left")
    return "; ".join(parts) if parts else "none"


def step_line(view: dict) -> str:
    return (f"Step {view['step_index'] + 1}/{view['max_steps']}, {view['position']}/{view['length']} done. "
            f"Next: {view['step_text']}")


def first_user_message(view: dict) -> str:
    return f"Task: {view['task']}\nBudget: {budget_text(view)}\n{step_line(view)}"


def feedback_user_message(view: dict) -> str:
    """The environment's turn after a step: what happened, then the next step."""
    last = view["history"][-1]
    observation = last["observation"]
    if len(observation) > OBSERVATION_CHARS:
        observation = observation[:OBSERVATION_CHARS] + "…"
    return (f"{INFO_OPEN}{last['event']}: {observation}{INFO_CLOSE}\n"
            f"Spent ${view['cost_usd']:.4f}. Budget: {budget_text(view)}\n{step_line(view)}")


HISTORY_WINDOW = 4  # steps of history in a step prompt when the view does not say (``env.history_window``)


def step_user_message(view: dict) -> str:
    """The whole state in one user turn, with a bounded window of history
    (``view["history_window"]``, the recipe's ``env.history_window``): the prompt of
    ``prompt_mode: step`` (one short chat per decision) instead of the growing episode chat."""
    window = view.get("history_window", HISTORY_WINDOW)
    history = view["history"][-window:] if window > 0 else []
    shown = ", ".join(f"{h['tier']} {'ok' if h['event'] == 'ok' else h['event']}" for h in history) or "none"
    return (f"Task: {view['task']}\nBudget: {budget_text(view)}\nSpent ${view['cost_usd']:.4f}. "
            f"Last {len(history)} of {len(view['history'])} steps: {shown}\n{step_line(view)}")


def think_text(view: dict) -> str:
    """Short reasoning written only from what the router can see at this step: the last
    outcome and the caps left. It does not echo the step text: a small router that cannot
    yet copy would route on its own mis-copied words instead of the user turn."""
    history = view["history"]
    last = "start" if not history else ("ok" if history[-1]["event"] == "ok" else "failed")
    caps = [f"{tier} {left}" for tier, left in sorted(view["calls_left"].items())]
    if view["budget"].get("usd") is not None:
        caps.append(f"${view['usd_left']:.3f}")
    return f"{last}; {', '.join(caps) or 'no cap'}"


# -- chat mode (``rlrouter serve``'s think / route / answer loop, Router-R1 style) ---------
THINK_CHARS, QUERY_CHARS, ANSWER_CHARS = 400, 400, 2000  # caps in the chat regex


def chat_turn_regex(allowed: list[str], may_answer: bool) -> str:
    think = f"<think>[^<]{{0,{THINK_CHARS}}}</think>"
    options = []
    if allowed:
        tiers = "|".join(re.escape(t) for t in allowed)
        options.append(f'<route tier="({tiers})">[^<]{{0,{QUERY_CHARS}}}</route>')
    if may_answer:
        options.append(f"<answer>[^<]{{0,{ANSWER_CHARS}}}</answer>")
    return think + "(" + "|".join(options) + ")"


_CHAT_TURN = re.compile(r"<think>(?P<think>[^<]*)</think>(?:<route tier=\"(?P<tier>[^\"<]+)\">(?P<query>[^<]*)</route>"
                        r"|<answer>(?P<answer>[^<]*)</answer>)\s*", re.S)


def parse_chat_turn(text: str, tiers: list[str]) -> dict | None:
    """``{"think", "tier", "query"}`` or ``{"think", "answer"}``; None if malformed."""
    match = _CHAT_TURN.fullmatch(text.strip())
    if not match:
        return None
    if match.group("answer") is not None:
        return {"think": match.group("think").strip(), "answer": match.group("answer").strip()}
    if match.group("tier") not in tiers:
        return None
    return {"think": match.group("think").strip(), "tier": match.group("tier"), "query": match.group("query").strip()}


def chat_system_message(pool_descriptors: list[dict]) -> str:
    lines = ["You answer a request by consulting the models of a pool, within the request's budget.", "Pool:"]
    for tier in pool_descriptors:
        lines.append(f"- {tier['name']}: ${tier['usd_per_1m_input']:.2f}/${tier['usd_per_1m_output']:.2f} per 1M "
                     f"tokens. {tier.get('descriptor', '')}".rstrip())
    lines.append("Each turn: <think>short reasoning</think> then either "
                 "<route tier=\"TIER\">sub-query</route> (the reply comes back in <information>…</information>; "
                 "an empty sub-query sends the whole request) or <answer>final answer</answer> "
                 "(an empty answer returns the last reply).")
    return "\n".join(lines)
