"""The router prompt format (one place, versioned), its two parsers, and ``RouterFormat``
(the turn format and the prompt-length rule a router is trained with, carried by its
checkpoint so training, evaluation and serving use one rule).

A routing episode is one multi-turn conversation:

    system     the pool (tiers, descriptors, prices) and the answer format
    user       Task, Budget, and the first step:  "Step 1 (limit 23), 0/18 done. Next: <step text>"
    assistant  <think>…</think><route>TIER</route>
    user       <information>EVENT: OBSERVATION</information> + spend, budget left, next step
    assistant  <think>…</think><route>TIER</route>
    ...

Two turn formats (``router.turn_format``): ``think_route`` (above; the default) and
``route`` (``<route>TIER</route>`` alone: one short decision per step, for pretrained bases
on CPU and for fast RL).

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
from statistics import median

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


_STRICT_ROUTE_ONLY = re.compile(r"\s*<route>(?P<tier>[^<\s]+)</route>\s*", re.S)
TURN_FORMATS = ("think_route", "route")


def parse_strict(text: str, tiers: list[str], turn_format: str = "think_route") -> ParsedRoute:
    """Exactly ``<think>…</think><route>TIER</route>`` (or the Router-R1 form), or with
    ``turn_format="route"`` exactly ``<route>TIER</route>``; else raise."""
    match = (_STRICT_ROUTE_ONLY if turn_format == "route" else _STRICT).fullmatch(text)
    if not match:
        n_routes = len(re.findall(r"<route\b", text))
        detail = "two or more routes" if n_routes > 1 else ("no route" if n_routes == 0 else "malformed tags")
        shape = "<route>TIER</route>" if turn_format == "route" else "<think>…</think><route>TIER</route>"
        raise RouteFormatError(f"not {shape} ({detail}): {text[:120]!r}")
    tier = match.group("tier") or match.groupdict().get("tier2")
    if tier not in tiers:
        raise RouteFormatError(f"unknown tier {tier!r}; the pool has {tiers}")
    if turn_format == "route":
        return ParsedRoute(tier)
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


def parse_route(text: str, tiers: list[str], fallback: str,
                turn_format: str = "think_route") -> tuple[ParsedRoute, bool]:
    """(route, well_formed): the strict parse when the text is in the trained format, else
    the tolerant one with ``fallback``. Rollouts, evaluation and the server all read a
    router turn this way; ``well_formed`` is what the RL format penalty counts."""
    try:
        return parse_strict(text, tiers, turn_format), True
    except RouteFormatError:
        return parse_tolerant(text, tiers, fallback=fallback), False


def route_regex(allowed: list[str], turn_format: str = "think_route") -> str:
    """The strict format over the allowed tiers, as a regex over text: what the route
    constraint lets a turn say (the constraint also fixes how it is tokenized)."""
    tiers = "|".join(re.escape(t) for t in allowed)
    route = f"{re.escape(ROUTE_OPEN)}({tiers}){re.escape(ROUTE_CLOSE)}"
    if turn_format == "route":
        return route
    return f"{re.escape(THINK_OPEN)}[^<]*{re.escape(THINK_CLOSE)}" + route


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


def tier_token_ids(tokenizer, tier: str) -> list[int]:
    """A tier's canonical spelling after ``<route>``: its own tokenization, no special
    tokens. ``RouteConstraint`` (on transformers, and inside vLLM through
    ``rlrouter.router.vllm_route``) allows exactly this spelling."""
    return tokenizer.encode(tier, add_special_tokens=False)


def format_route(tier: str, think: str, turn_format: str = "think_route") -> str:
    """The assistant turn the router is trained to write."""
    if turn_format == "route":
        return f"{ROUTE_OPEN}{tier}{ROUTE_CLOSE}"
    return f"{THINK_OPEN}{think}{THINK_CLOSE}{ROUTE_OPEN}{tier}{ROUTE_CLOSE}"


# -- building the conversation from RoutingEnv.view() ------------------------------------
REPLY_LINES = {"think_route": "Reply <think>short reasoning</think><route>TIER</route>.",
               "route": "Reply <route>TIER</route>."}


def price_text(tier: dict) -> str:
    """``$0.40/$1.60 per 1M tokens`` (input/output), with the cached-input price where the
    tier declares one: a router that sees it can learn that staying on a tier is cheaper."""
    text = f"${tier['usd_per_1m_input']:.2f}/${tier['usd_per_1m_output']:.2f} per 1M tokens"
    if tier.get("usd_per_1m_cached_input") is not None:
        text += f" (cached input ${tier['usd_per_1m_cached_input']:.2f}, while steps stay on it)"
    return text


def system_message(pool_descriptors: list[dict], turn_format: str = "think_route") -> str:
    lines = ["You route each step of an agent to one model of the pool, within the task's budget.", "Pool:"]
    for tier in pool_descriptors:
        lines.append(f"- {tier['name']}: {price_text(tier)}. {tier.get('descriptor', '')}".rstrip())
    lines.append(REPLY_LINES[turn_format])
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


# -- the rule a router is trained with, carried by its checkpoint -------------------------
CUT_MARKER = "\n[… {n} tokens cut …]\n"
_CUT = re.compile(re.escape(CUT_MARKER).replace(r"\{n\}", r"(\d+)"))


def cut_middle(tokenizer, text: str, drop: int, head_share: float = 0.5) -> str:
    """``text`` without ``drop`` of its tokens (at least) from the middle: its head and its
    tail stay, joined by ``CUT_MARKER`` (few-shot prompts put the actual question last; the
    step prompt's head holds the task, budget and history)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    keep = max(len(ids) - drop, 0)
    head = int(round(keep * head_share))
    tail = keep - head
    return (tokenizer.decode(ids[:head]) + CUT_MARKER.format(n=len(ids) - keep)
            + (tokenizer.decode(ids[len(ids) - tail:]) if tail else ""))


@dataclass(frozen=True)
class RouterFormat:
    """How a router's turns look and how long its prompts may be (recipe ``router.turn_format``,
    ``router.max_prompt_tokens``, ``router.cut_head_share``); written into every checkpoint's
    ``rlrouter.json`` (``router.format``) and read back by evaluation, RL and serving, so
    one rule holds everywhere.

    ``max_prompt_tokens``: a prompt longer than this (chat template included) keeps the head
    and the tail of its last user message (``cut_middle``), cut until it fits. ``None``: no
    cut (the router's context length is the only limit).
    """

    turn_format: str = "think_route"
    max_prompt_tokens: int | None = None
    cut_head_share: float = 0.5

    def __post_init__(self):
        if self.turn_format not in TURN_FORMATS:
            raise ValueError(f"router.turn_format must be one of {TURN_FORMATS}, got {self.turn_format!r}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 32:
            raise ValueError(f"router.max_prompt_tokens must be >= 32 (or null for no cut), got {self.max_prompt_tokens}")
        if not 0.0 <= self.cut_head_share <= 1.0:
            raise ValueError(f"router.cut_head_share must be in [0, 1], got {self.cut_head_share}")

    @classmethod
    def from_meta(cls, meta: dict) -> "RouterFormat":
        """The format of a checkpoint (``rlrouter.json``); older checkpoints: the defaults."""
        return cls(**meta.get("router", {}).get("format", {}))

    def to_dict(self) -> dict:
        return {"turn_format": self.turn_format, "max_prompt_tokens": self.max_prompt_tokens,
                "cut_head_share": self.cut_head_share}

    def system(self, pool_descriptors: list[dict]) -> str:
        return system_message(pool_descriptors, self.turn_format)

    def route(self, tier: str, think: str) -> str:
        return format_route(tier, think, self.turn_format)

    def parse(self, text: str, tiers: list[str], fallback: str) -> tuple[ParsedRoute, bool]:
        return parse_route(text, tiers, fallback, self.turn_format)

    def regex(self, allowed: list[str]) -> str:
        return route_regex(allowed, self.turn_format)

    def fit(self, tokenizer, messages: list[dict]) -> list[dict]:
        """``messages`` whose rendered prompt (generation prompt included) has at most
        ``max_prompt_tokens`` tokens: the last user message is cut in the middle. Raises
        ``ValueError`` when the rest of the prompt alone does not fit."""
        if self.max_prompt_tokens is None:
            return messages
        last = max(i for i, m in enumerate(messages) if m["role"] == "user")
        content = messages[last]["content"]
        fitted, drop = messages, 0
        for _ in range(8):  # decode/encode at the cut can merge tokens differently: re-check
            over = len(prompt_token_ids(tokenizer, fitted)) - self.max_prompt_tokens
            if over <= 0:
                return fitted
            if drop == 0:  # the first cut: only a prompt over the limit pays for these two counts
                length = len(tokenizer(content, add_special_tokens=False)["input_ids"])
                drop = over + len(tokenizer(CUT_MARKER.format(n=0), add_special_tokens=False)["input_ids"]) + 2
            else:
                drop += over
            if length - drop <= 6:
                break
            # always a cut of the original text, so its one marker counts every token cut
            fitted = [*messages[:last], {**messages[last], "content": cut_middle(
                tokenizer, content, drop, self.cut_head_share)}, *messages[last + 1:]]
        raise ValueError(f"router.max_prompt_tokens = {self.max_prompt_tokens} is too small: the prompt around the "
                         "step text does not fit; raise it")

    def as_training_example(self, tokenizer, messages: list[dict]) -> list[dict]:
        """A synthesized conversation (think/route turns) in this format: the system line and
        the route turns rewritten; a step example ([system, user, assistant]) cut to fit."""
        out = []
        for m in messages:
            if m["role"] == "system":
                m = {**m, "content": m["content"].replace(REPLY_LINES["think_route"], REPLY_LINES[self.turn_format])}
            elif m["role"] == "assistant" and self.turn_format == "route":
                m = {**m, "content": format_route(_route_tier(m["content"]), "", "route")}
            out.append(m)
        if self.max_prompt_tokens is None:
            return out
        return [*self.fit(tokenizer, out[:-1]), out[-1]]

    def cut_report(self, tokenizer, conversations: list[list[dict]]) -> dict:
        """How much of ``conversations`` (after ``fit`` or ``as_training_example``) the cut
        removed: prompts cut, and per cut prompt the tokens cut and the tokens of its last
        user message kept (median). The SFT stage prints it and writes it into the
        checkpoint: a limit that leaves a few dozen tokens of the step text is easy to set
        without noticing (the system message counts against it)."""
        cut, kept = [], []
        for messages in conversations:
            content = [m for m in messages if m["role"] == "user"][-1]["content"]
            found = _CUT.search(content)
            if found:
                cut.append(int(found.group(1)))
                rest = content[:found.start()] + content[found.end():]
                kept.append(len(tokenizer(rest, add_special_tokens=False)["input_ids"]))
        return {"max_prompt_tokens": self.max_prompt_tokens, "prompts": len(conversations), "cut": len(cut),
                "median_tokens_cut": median(cut) if cut else None,
                "median_user_tokens_kept": median(kept) if kept else None}

    def prompt_ids(self, tokenizer, conversations: list[list[dict]]) -> list[list[int]]:
        """``batch_prompt_token_ids`` after ``fit``: the prompts every engine is given."""
        return batch_prompt_token_ids(tokenizer, [self.fit(tokenizer, m) for m in conversations])


def _route_tier(text: str) -> str:
    match = _TOLERANT.search(text)
    return (match.group("tier2") or match.group("body")).strip() if match else ""


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
        lines.append(f"- {tier['name']}: {price_text(tier)}. {tier.get('descriptor', '')}".rstrip())
    lines.append("Each turn: <think>short reasoning</think> then either "
                 "<route tier=\"TIER\">sub-query</route> (the reply comes back in <information>…</information>; "
                 "an empty sub-query sends the whole request) or <answer>final answer</answer> "
                 "(an empty answer returns the last reply).")
    return "\n".join(lines)
