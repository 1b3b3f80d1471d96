"""Hard per-task budgets and the route mask that enforces them.

A budget caps what one episode (one task) may spend: dollars, and/or the number of calls
to given tiers (``large_calls=5`` caps calls to the tier named ``large``). A tier is
allowed at a step only if the budget can pay for that step's *worst case*: its calls cap
is not reached and ``cost so far + upper bound of this step's cost <= usd``. The bound
comes from the world (the next prompt's exact token count and the executor's
``max_output_tokens``), so a masked policy can never exceed the budget. When no tier is
affordable the episode is truncated (``info["budget_exhausted"] = True``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from envs.pool import CostLedger, Pool


@dataclass(frozen=True)
class Budget:
    """Per-episode caps. ``usd=None`` and an empty ``max_calls`` mean unbounded."""

    usd: float | None = None
    max_calls: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self):
        if self.usd is not None and (not isinstance(self.usd, (int, float)) or self.usd < 0):
            raise ValueError(f"budget usd must be a non-negative number of dollars, got {self.usd!r}")
        for tier, cap in self.max_calls.items():
            if not isinstance(cap, int) or cap < 0:
                raise ValueError(f"budget {tier}_calls must be a non-negative integer, got {cap!r}")
        object.__setattr__(self, "max_calls", dict(self.max_calls))

    @property
    def unbounded(self) -> bool:
        return self.usd is None and not self.max_calls

    @property
    def label(self) -> str:
        """Short name used in tables: ``usd=0.05``, ``large_calls=5``, ``none``."""
        parts = []
        if self.usd is not None:
            parts.append(f"usd={self.usd:g}")
        parts += [f"{tier}_calls={cap}" for tier, cap in sorted(self.max_calls.items())]
        return "+".join(parts) or "none"

    def check_tiers(self, pool: Pool) -> None:
        for tier in self.max_calls:
            if tier not in pool.names:
                raise ValueError(
                    f"budget caps calls to tier {tier!r}, but the pool has {pool.names}; "
                    f"write e.g. {pool.priciest.name}_calls=5"
                )

    def to_dict(self) -> dict:
        return {"usd": self.usd, "max_calls": dict(self.max_calls)}

    @classmethod
    def from_dict(cls, data: Mapping | None, where: str = "budget") -> "Budget":
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise ValueError(f"{where} must be a mapping like {{usd: 0.05, large_calls: 5}}")
        usd = None
        max_calls = {}
        for key, value in data.items():
            if key == "usd":
                usd = None if value is None else float(value)
            elif key == "max_calls" and isinstance(value, Mapping):
                max_calls.update({str(k): int(v) for k, v in value.items()})
            elif key.endswith("_calls"):
                if value is not None:
                    if isinstance(value, bool) or not float(value).is_integer():
                        raise ValueError(f"{where}.{key} must be an integer, got {value!r}")
                    max_calls[key[: -len("_calls")]] = int(value)
            else:
                raise ValueError(f"{where}: unknown key {key!r}; use usd or <tier>_calls (e.g. large_calls)")
        try:
            return cls(usd=usd, max_calls=max_calls)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None


def parse_budget_arg(text: str) -> list[Budget]:
    """Parse a CLI budget: ``large_calls=5,10,15`` -> three budgets; ``usd=0.05``;
    ``usd=0.05+large_calls=5`` -> one budget with both caps; ``none`` -> unbounded."""
    text = text.strip()
    if text in ("none", ""):
        return [Budget()]
    parts = text.split("+")
    if len(parts) > 1:
        spec = {}
        for part in parts:
            key, _, value = part.partition("=")
            if not value or "," in value:
                raise ValueError(f"budget {text!r}: combined caps take one value each, e.g. usd=0.05+large_calls=5")
            spec[key.strip()] = _number(value, text)
        return [Budget.from_dict(spec, where=f"--budget {text}")]
    key, eq, values = text.partition("=")
    if not eq or not values:
        raise ValueError(f"budget {text!r} is not KEY=VALUE[,VALUE...]; e.g. large_calls=5,10 or usd=0.05")
    return [Budget.from_dict({key.strip(): _number(v, text)}, where=f"--budget {text}") for v in values.split(",")]


def parse_budgets(specs, where: str = "budgets") -> list[Budget]:
    """A recipe's list of budget specs (``[none, large_calls=5, usd=0.05]`` or mappings);
    a bad entry raises ``ValueError`` naming ``where`` and its index."""
    if not isinstance(specs, list):
        raise ValueError(f"{where} must be a list like [none, large_calls=5, usd=0.05]")
    budgets: list[Budget] = []
    for i, spec in enumerate(specs):
        try:
            if isinstance(spec, Mapping):
                budgets.append(Budget.from_dict(spec, where=f"{where}[{i}]"))
            else:
                budgets += parse_budget_arg(str(spec))
        except ValueError as err:
            raise ValueError(f"{where}[{i}]: {err}") from None
    return budgets


def _number(value: str, text: str) -> float | int:
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"budget {text!r}: {value!r} is not a number") from None
    return int(number) if number.is_integer() else number


def route_mask(budget: Budget, ledger: CostLedger, worst_case_cost_usd: list[float]) -> np.ndarray:
    """``int8`` mask over the pool's tiers: 1 where the budget can pay for this step.

    ``worst_case_cost_usd[i]`` is an upper bound on the next call's cost with tier i.
    """
    pool = ledger.pool
    mask = np.ones(len(pool), dtype=np.int8)
    for i, tier in enumerate(pool.tiers):
        cap = budget.max_calls.get(tier.name)
        if cap is not None and ledger.calls.get(tier.name, 0) >= cap:
            mask[i] = 0
        # small tolerance: float sums of exact prices must not lock out an exactly-affordable step
        if budget.usd is not None and ledger.cost_usd + worst_case_cost_usd[i] > budget.usd + 1e-12:
            mask[i] = 0
    return mask


def usd_left(budget: Budget, ledger: CostLedger) -> float:
    return math.inf if budget.usd is None else max(0.0, budget.usd - ledger.cost_usd)
