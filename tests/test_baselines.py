"""Baselines, including the hindsight oracle against brute force and a hand-computed case."""

import itertools
import json

import numpy as np
import pytest

from envs import Budget, make_routing_env
from rlrouter.evaluate.baselines import EscalateOnFailure, FirstLarge, HindsightOracle, RandomRouter, make_baselines
from rlrouter.evaluate.runner import run_episode


def uniform_table(tmp_path, n=20):
    """Every query: the cheap model is wrong, the strong one right; costs recorded."""
    path = tmp_path / "t.jsonl"
    rows = [{"prompt": f"q{i}", "cheap": False, "strong": True, "cheap_cost": 0.001, "strong_cost": 0.01}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def table_env(path, success_fraction, **kwargs):
    pool = [{"name": "small", "usd_per_1m_input": 1, "usd_per_1m_output": 1, "executor": {"model": "cheap"}},
            {"name": "large", "usd_per_1m_input": 9, "usd_per_1m_output": 9, "executor": {"model": "strong"}}]
    world = {"source": "table", "table": str(path), "episode_length": 3, "success_fraction": success_fraction}
    return make_routing_env("replay", pool=pool, world=world, **kwargs)


@pytest.mark.parametrize("fraction, cost, large_calls", [(2 / 3, 0.021, 2), (1.0, 0.03, 3), (1 / 3, 0.012, 1)])
def test_oracle_finds_the_hand_computed_cheapest_success(tmp_path, fraction, cost, large_calls):
    env = table_env(uniform_table(tmp_path), fraction)
    record = run_episode(env, HindsightOracle(), "train-0", Budget(), seed=0)
    assert record.success
    assert record.cost_usd == pytest.approx(cost)
    assert record.calls["large"] == large_calls


def test_oracle_fails_cheaply_when_the_budget_makes_success_impossible(tmp_path):
    env = table_env(uniform_table(tmp_path), 1.0)
    oracle = HindsightOracle()
    record = run_episode(env, oracle, "train-0", Budget(max_calls={"large": 2}), seed=0)
    assert not oracle.found and not record.success
    assert record.cost_usd == pytest.approx(0.003)  # always-small: 3 x $0.001


def test_oracle_matches_brute_force_on_recorded_mmlu(routellm_dir):
    env = make_routing_env("replay", world={"source": "routellm-mmlu", "episode_length": 5})
    for i in range(15):
        task = f"test-{i}"
        best = None
        for route in itertools.product([0, 1], repeat=5):
            env.reset(seed=0, options={"task_id": task})
            for a in route:
                _, _, _, _, info = env.step(a)
            if info["success"] and (best is None or info["cost_usd"] < best - 1e-15):
                best = info["cost_usd"]
        record = run_episode(env, HindsightOracle(), task, Budget(), seed=0)
        if best is None:
            assert not record.success
        else:
            assert record.success and record.cost_usd == pytest.approx(best, rel=1e-12)


def test_oracle_never_costs_more_than_always_large_when_that_succeeds():
    env = make_routing_env("synthetic", world={"n_test": 30}, split="test")
    large, oracle = make_baselines(["always-large", "oracle"], 2)
    for i in range(30):
        r_large = run_episode(env, large, f"test-{i}", Budget(), seed=i)
        r_oracle = run_episode(env, oracle, f"test-{i}", Budget(), seed=i)
        if r_large.success:
            assert r_oracle.success and r_oracle.cost_usd <= r_large.cost_usd + 1e-12


def test_first_large_uses_large_for_exactly_k_steps():
    env = make_routing_env("synthetic", world={"n_test": 5, "min_length": 8}, split="test")
    record = run_episode(env, FirstLarge(3, 2), "test-0", Budget(), seed=0)
    assert record.calls["large"] == min(3, record.steps)


def test_escalate_goes_large_only_after_a_failed_step():
    policy = EscalateOnFailure(2)
    mask = np.array([1, 1], dtype=np.int8)
    assert policy.act(None, {"action_mask": mask}) == 0
    assert policy.act(None, {"action_mask": mask, "step_ok": False}) == 1
    assert policy.act(None, {"action_mask": mask, "step_ok": True}) == 0
    assert policy.act(None, {"action_mask": np.array([1, 0], dtype=np.int8), "step_ok": False}) == 0


def test_random_router_hits_its_probability():
    env = make_routing_env("synthetic", world={"n_test": 40}, split="test")
    policy = RandomRouter(0.3, 2)
    large = total = 0
    for i in range(40):
        r = run_episode(env, policy, f"test-{i}", Budget(), seed=i)
        large += r.calls.get("large", 0)
        total += sum(r.calls.values())
    assert abs(large / total - 0.3) < 0.05


def test_baselines_respect_call_caps():
    env = make_routing_env("synthetic", world={"n_test": 10}, split="test")
    for policy in make_baselines(["always-large", "random", "escalate"], 2, random_p=[0.9]):
        for i in range(10):
            r = run_episode(env, policy, f"test-{i}", Budget(max_calls={"large": 2}), seed=i)
            assert r.calls.get("large", 0) <= 2 and not r.violation


# -- more than two tiers -----------------------------------------------------------------------
THREE_TIERS = [
    {"name": "small", "usd_per_1m_input": 0.4, "usd_per_1m_output": 1.6, "executor": {"kind": "simulated", "skill": 0.5}},
    {"name": "medium", "usd_per_1m_input": 1.0, "usd_per_1m_output": 4.0, "executor": {"kind": "simulated", "skill": 0.7}},
    {"name": "large", "usd_per_1m_input": 2.0, "usd_per_1m_output": 8.0, "executor": {"kind": "simulated", "skill": 0.9}},
]


def test_random_routing_uses_every_tier_above_the_cheapest_with_three_tiers():
    env = make_routing_env("synthetic", pool=THREE_TIERS, world={"n_train": 40})
    records = [run_episode(env, RandomRouter(1.0, 3), f"train-{i}", Budget(), seed=i) for i in range(40)]
    calls = {t: sum(r.calls[t] for r in records) for t in ("small", "medium", "large")}
    assert calls["small"] == 0  # p = 1: never the cheapest
    assert 0.4 < calls["medium"] / (calls["medium"] + calls["large"]) < 0.6  # uniform over the two


def test_escalate_climbs_one_tier_per_failure_and_drops_back_after_a_success():
    policy = EscalateOnFailure(3)

    class Pool3:
        names = ["small", "medium", "large"]

    policy.begin(type("Env", (), {"pool": Pool3})(), 0)
    mask = np.ones(3, dtype=np.int8)
    assert policy.act(None, {"action_mask": mask}) == 0  # first step: cheapest
    assert policy.act(None, {"action_mask": mask, "step_ok": False, "tier": "small"}) == 1
    assert policy.act(None, {"action_mask": mask, "step_ok": False, "tier": "medium"}) == 2
    assert policy.act(None, {"action_mask": mask, "step_ok": False, "tier": "large"}) == 2  # already at the top
    assert policy.act(None, {"action_mask": mask, "step_ok": True, "tier": "large"}) == 0
    masked = np.array([1, 0, 1], dtype=np.int8)  # medium masked: the nearest allowed, cheaper first
    assert policy.act(None, {"action_mask": masked, "step_ok": False, "tier": "small"}) == 0


def test_summaries_give_every_tiers_share_with_three_tiers(tmp_path):
    from rlrouter.evaluate.report import markdown_table
    from rlrouter.evaluate.runner import summarize

    env = make_routing_env("synthetic", pool=THREE_TIERS, world={"n_train": 10})
    records = [run_episode(env, RandomRouter(0.5, 3), f"train-{i}", Budget(), seed=i) for i in range(10)]
    (row,) = summarize(records, "large", ["small", "medium", "large"])
    total = sum(sum(r.calls.values()) for r in records)
    assert list(row["tier_shares"]) == ["small", "medium", "large"]
    for tier, share in row["tier_shares"].items():
        assert share == pytest.approx(sum(r.calls[tier] for r in records) / total)
    assert row["large_fraction"] == row["tier_shares"]["large"]
    table = markdown_table([row])
    assert "| calls small / medium / large |" in table
    assert f"| {row['tier_shares']['small']:.2f} / {row['tier_shares']['medium']:.2f} / " in table
