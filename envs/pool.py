"""The model pool: named tiers, their list prices, and the cost of every call.

This is the one place where dollars are computed. A call's cost is always

    cost_usd = input_tokens * usd_per_1m_input / 1e6 + output_tokens * usd_per_1m_output / 1e6

from the call's real token counts (never estimated after the fact). Tiers are ordered
from cheapest to most expensive; the pool needs at least two.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

# Default list prices, dollars per 1M tokens (input, output).
DEFAULT_PRICES = {"small": (0.40, 1.60), "large": (2.00, 8.00)}
DEFAULT_DESCRIPTORS = {
    "small": "cheap, fast model; reliable on routine steps",
    "large": "expensive, strong model; use for hard or critical steps",
}


@dataclass(frozen=True)
class Tier:
    """One model of the pool.

    Attributes:
        name: tier name the router writes inside ``<route>`` (e.g. ``"small"``).
        usd_per_1m_input: list price in dollars per 1M input (prompt) tokens.
        usd_per_1m_output: list price in dollars per 1M output (completion) tokens.
        descriptor: one line the router prompt shows for this tier.
        usd_per_1m_cached_input: what a provider bills per 1M prompt tokens it served from
            its prompt cache (``usage.prompt_tokens_details.cached_tokens``); None = no
            discount, cached tokens cost ``usd_per_1m_input``.
        executor: how this tier's model takes agent steps (world-specific mapping,
            e.g. ``{"kind": "simulated", "skill": 0.8}`` or ``{"kind": "recorded",
            "model": "gpt-4-1106-preview"}``).
    """

    name: str
    usd_per_1m_input: float
    usd_per_1m_output: float
    descriptor: str = ""
    executor: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)
    usd_per_1m_cached_input: float | None = None

    def __post_init__(self):
        if not self.name or not self.name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(
                f"tier name {self.name!r} is invalid: use letters, digits, '-' or '_' "
                "(the router writes it inside <route>…</route>)"
            )
        for price_field in ("usd_per_1m_input", "usd_per_1m_output", "usd_per_1m_cached_input"):
            price = getattr(self, price_field)
            if price is None and price_field == "usd_per_1m_cached_input":
                continue
            if isinstance(price, bool) or not isinstance(price, (int, float)) or price < 0:
                raise ValueError(
                    f"tier {self.name!r}: {price_field} must be a non-negative number "
                    f"of dollars per 1M tokens, got {price!r}"
                )

    @property
    def cached_input_price(self) -> float:
        """Dollars per 1M cached prompt tokens (the input price when none is declared)."""
        return self.usd_per_1m_input if self.usd_per_1m_cached_input is None else self.usd_per_1m_cached_input

    def cost_usd(self, input_tokens: int, output_tokens: int, cached_tokens: int = 0) -> float:
        """Dollar cost of one call with these real token counts; ``cached_tokens`` of the
        ``input_tokens`` were served from the prompt cache (billed at the cached price)."""
        if input_tokens < 0 or output_tokens < 0 or not 0 <= cached_tokens <= input_tokens:
            raise ValueError(f"token counts must be >= 0 with cached <= input, got input {input_tokens}, "
                             f"output {output_tokens}, cached {cached_tokens}")
        return ((input_tokens - cached_tokens) * self.usd_per_1m_input + cached_tokens * self.cached_input_price
                + output_tokens * self.usd_per_1m_output) / 1e6

    def pico_prices(self) -> tuple[int, int, int]:
        """(input, cached input, output) prices in pico-dollars (1e-12 USD) per token: exact
        integers for prices given to 1e-6 dollars per 1M tokens. The gateway's ledger adds
        these, so many processes sum the same spend with no rounding."""
        return tuple(int(round(p * 1e6)) for p in (self.usd_per_1m_input, self.cached_input_price,
                                                   self.usd_per_1m_output))


@dataclass(frozen=True)
class Pool:
    """Tiers ordered from cheapest to most expensive (by output price, then input)."""

    tiers: tuple[Tier, ...]

    def __post_init__(self):
        if len(self.tiers) < 2:
            raise ValueError(f"a pool needs at least two tiers, got {len(self.tiers)}")
        names = [t.name for t in self.tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names must be unique, got {names}")
        ordered = tuple(sorted(self.tiers, key=lambda t: (t.usd_per_1m_output, t.usd_per_1m_input)))
        object.__setattr__(self, "tiers", ordered)

    @classmethod
    def default(cls) -> "Pool":
        """small = $0.40 / $1.60, large = $2.00 / $8.00 per 1M input / output tokens."""
        return cls(
            tuple(
                Tier(name, p_in, p_out, DEFAULT_DESCRIPTORS[name])
                for name, (p_in, p_out) in DEFAULT_PRICES.items()
            )
        )

    @classmethod
    def from_config(cls, tiers: Sequence[Mapping[str, Any]], where: str = "pool.tiers") -> "Pool":
        """Build from recipe entries ``{name, usd_per_1m_input, usd_per_1m_output, ...}``."""
        known = {"name", "usd_per_1m_input", "usd_per_1m_output", "descriptor", "executor", "usd_per_1m_cached_input"}
        built = []
        for i, entry in enumerate(tiers):
            if not isinstance(entry, Mapping):
                raise ValueError(f"{where}[{i}] must be a mapping, got {type(entry).__name__}")
            unknown = set(entry) - known
            if unknown:
                raise ValueError(f"{where}[{i}]: unknown field(s) {sorted(unknown)}; allowed: {sorted(known)}")
            missing = {"name", "usd_per_1m_input", "usd_per_1m_output"} - set(entry)
            if missing:
                raise ValueError(f"{where}[{i}]: missing field(s) {sorted(missing)}")
            try:
                built.append(Tier(**dict(entry)))
            except ValueError as err:
                raise ValueError(f"{where}[{i}]: {err}") from None
        return cls(tuple(built))

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tiers]

    @property
    def cheapest(self) -> Tier:
        return self.tiers[0]

    @property
    def priciest(self) -> Tier:
        return self.tiers[-1]

    def __len__(self) -> int:
        return len(self.tiers)

    def index(self, name: str) -> int:
        for i, tier in enumerate(self.tiers):
            if tier.name == name:
                return i
        raise KeyError(f"unknown tier {name!r}; the pool has {self.names}")

    def __getitem__(self, name: str) -> Tier:
        return self.tiers[self.index(name)]

    def describe(self) -> list[dict]:
        """JSON-friendly descriptors (what the router prompt and checkpoints store); the
        cached-input price only where a tier declares one."""
        out = []
        for t in self.tiers:
            d = {"name": t.name, "usd_per_1m_input": t.usd_per_1m_input, "usd_per_1m_output": t.usd_per_1m_output,
                 "descriptor": t.descriptor}
            if t.usd_per_1m_cached_input is not None:
                d["usd_per_1m_cached_input"] = t.usd_per_1m_cached_input
            out.append(d)
        return out

    @property
    def has_cached_prices(self) -> bool:
        return any(t.usd_per_1m_cached_input is not None for t in self.tiers)


@dataclass
class CostLedger:
    """Running account of one episode's calls: tokens and dollars per tier."""

    pool: Pool
    calls: dict[str, int] = field(default_factory=dict)
    input_tokens: dict[str, int] = field(default_factory=dict)
    output_tokens: dict[str, int] = field(default_factory=dict)
    cost_usd: float = 0.0
    cached_tokens: dict[str, int] = field(default_factory=dict)  # input tokens billed at the cached price

    def charge(self, tier: Tier, input_tokens: int, output_tokens: int, cached_tokens: int = 0) -> float:
        """Record one call and return its cost (``cached_tokens`` of its input served from
        the tier's prompt cache)."""
        cost = tier.cost_usd(input_tokens, output_tokens, cached_tokens)
        if cached_tokens:
            self.cached_tokens[tier.name] = self.cached_tokens.get(tier.name, 0) + cached_tokens
        return self.charge_recorded(tier, input_tokens, output_tokens, cost)

    def charge_recorded(self, tier: Tier, input_tokens: int, output_tokens: int, cost_usd: float) -> float:
        """Record one call whose dollar cost was recorded (replayed data with a cost column)."""
        if cost_usd < 0:
            raise ValueError(f"recorded cost must be >= 0, got {cost_usd}")
        self.calls[tier.name] = self.calls.get(tier.name, 0) + 1
        self.input_tokens[tier.name] = self.input_tokens.get(tier.name, 0) + input_tokens
        self.output_tokens[tier.name] = self.output_tokens.get(tier.name, 0) + output_tokens
        self.cost_usd += cost_usd
        return cost_usd

    def copy(self) -> "CostLedger":
        return CostLedger(self.pool, dict(self.calls), dict(self.input_tokens), dict(self.output_tokens), self.cost_usd,
                          dict(self.cached_tokens))

    def summary(self) -> dict:
        return {
            "cost_usd": self.cost_usd,
            "calls": dict(self.calls),
            "input_tokens": dict(self.input_tokens),
            "output_tokens": dict(self.output_tokens),
            "cached_tokens": dict(self.cached_tokens),
        }
