"""Prices and cost accounting: pinned by hand-computed values."""

import pytest

from envs.pool import CostLedger, Pool, Tier


def test_default_prices_are_the_documented_list_prices():
    pool = Pool.default()
    assert pool.names == ["small", "large"]
    assert (pool["small"].usd_per_1m_input, pool["small"].usd_per_1m_output) == (0.40, 1.60)
    assert (pool["large"].usd_per_1m_input, pool["large"].usd_per_1m_output) == (2.00, 8.00)


def test_call_cost_is_tokens_times_price_per_million():
    pool = Pool.default()
    # 1000 * 0.40/1e6 + 500 * 1.60/1e6 = 0.0004 + 0.0008
    assert pool["small"].cost_usd(1000, 500) == pytest.approx(0.0012, abs=1e-15)
    # 2000 * 2.00/1e6 + 100 * 8.00/1e6 = 0.004 + 0.0008
    assert pool["large"].cost_usd(2000, 100) == pytest.approx(0.0048, abs=1e-15)
    assert pool["large"].cost_usd(0, 0) == 0.0


def test_ledger_accumulates_tokens_calls_and_dollars_per_tier():
    pool = Pool.default()
    ledger = CostLedger(pool)
    ledger.charge(pool["small"], 1000, 500)
    ledger.charge(pool["large"], 2000, 100)
    ledger.charge(pool["small"], 10, 0)
    assert ledger.calls == {"small": 2, "large": 1}
    assert ledger.input_tokens == {"small": 1010, "large": 2000}
    assert ledger.output_tokens == {"small": 500, "large": 100}
    assert ledger.cost_usd == pytest.approx(0.0012 + 0.0048 + 0.000004, abs=1e-15)


def test_recorded_cost_is_charged_as_recorded():
    pool = Pool.default()
    ledger = CostLedger(pool)
    assert ledger.charge_recorded(pool["large"], 5, 5, 0.25) == 0.25
    assert ledger.cost_usd == 0.25 and ledger.calls == {"large": 1}


def test_tiers_are_ordered_cheapest_first_and_more_than_two_are_allowed():
    pool = Pool.from_config([
        {"name": "xl", "usd_per_1m_input": 10, "usd_per_1m_output": 30},
        {"name": "small", "usd_per_1m_input": 0.4, "usd_per_1m_output": 1.6},
        {"name": "medium", "usd_per_1m_input": 1, "usd_per_1m_output": 4, "descriptor": "mid"},
    ])
    assert pool.names == ["small", "medium", "xl"]
    assert pool.cheapest.name == "small" and pool.priciest.name == "xl"
    assert pool["medium"].descriptor == "mid"


@pytest.mark.parametrize(
    "tiers, message",
    [
        ([{"name": "small", "usd_per_1m_input": 1, "usd_per_1m_output": 1}], "at least two tiers"),
        ([{"name": "a", "usd_per_1m_input": 1, "usd_per_1m_output": 1},
          {"name": "a", "usd_per_1m_input": 2, "usd_per_1m_output": 2}], "unique"),
        ([{"name": "a", "usd_per_1m_input": -1, "usd_per_1m_output": 1},
          {"name": "b", "usd_per_1m_input": 2, "usd_per_1m_output": 2}], r"pool.tiers\[0\]: .*usd_per_1m_input"),
        ([{"name": "a", "usd_per_1m_input": 1},
          {"name": "b", "usd_per_1m_input": 2, "usd_per_1m_output": 2}], r"pool.tiers\[0\]: missing .*usd_per_1m_output"),
        ([{"name": "a b", "usd_per_1m_input": 1, "usd_per_1m_output": 1},
          {"name": "b", "usd_per_1m_input": 2, "usd_per_1m_output": 2}], "tier name"),
        ([{"name": "a", "usd_per_1m_input": 1, "usd_per_1m_output": 1, "price": 3},
          {"name": "b", "usd_per_1m_input": 2, "usd_per_1m_output": 2}], "unknown field"),
    ],
)
def test_bad_pool_config_names_the_field(tiers, message):
    with pytest.raises(ValueError, match=message):
        Pool.from_config(tiers)


def test_unknown_tier_lookup_lists_the_pool():
    with pytest.raises(KeyError, match="small"):
        Pool.default()["medium"]


def test_negative_tokens_are_rejected():
    with pytest.raises(ValueError):
        Tier("small", 1, 1).cost_usd(-1, 0)
