"""Budget specs and the route mask."""

import numpy as np
import pytest

from envs.budget import Budget, parse_budget_arg, route_mask
from envs.pool import CostLedger, Pool


def test_cli_budget_with_several_values_makes_one_budget_each():
    budgets = parse_budget_arg("large_calls=5,10,15")
    assert [b.max_calls for b in budgets] == [{"large": 5}, {"large": 10}, {"large": 15}]
    assert [b.label for b in budgets] == ["large_calls=5", "large_calls=10", "large_calls=15"]


def test_cli_budget_usd_combined_and_none():
    assert parse_budget_arg("usd=0.05")[0].usd == 0.05
    both = parse_budget_arg("usd=0.05+large_calls=5")
    assert len(both) == 1 and both[0].usd == 0.05 and both[0].max_calls == {"large": 5}
    assert both[0].label == "usd=0.05+large_calls=5"
    assert parse_budget_arg("none")[0].unbounded


@pytest.mark.parametrize("spec, message", [
    ("large_calls", "KEY=VALUE"),
    ("usd=abc", "not a number"),
    ("large_calls=2.5", "integer"),
    ("dollars=3", "unknown key 'dollars'"),
    ("usd=-1", "non-negative"),
])
def test_bad_budget_specs_are_explained(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_budget_arg(spec)


def test_budget_on_an_unknown_tier_names_the_pool():
    with pytest.raises(ValueError, match="pool has"):
        Budget(max_calls={"xl": 3}).check_tiers(Pool.default())


def test_mask_blocks_a_tier_whose_call_cap_is_reached():
    pool = Pool.default()
    ledger = CostLedger(pool)
    budget = Budget(max_calls={"large": 1})
    assert route_mask(budget, ledger, [0.0, 0.0]).tolist() == [1, 1]
    ledger.charge(pool["large"], 10, 10)
    assert route_mask(budget, ledger, [0.0, 0.0]).tolist() == [1, 0]


def test_mask_blocks_a_tier_whose_worst_case_cost_exceeds_the_dollars_left():
    pool = Pool.default()
    ledger = CostLedger(pool)
    ledger.charge(pool["small"], 1000, 500)  # $0.0012 spent
    budget = Budget(usd=0.002)  # $0.0008 left
    mask = route_mask(budget, ledger, [0.0008, 0.00081])  # exactly affordable vs. just not
    assert mask.tolist() == [1, 0]
    assert mask.dtype == np.int8
