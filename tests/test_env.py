"""RoutingEnv: Gymnasium compliance, accounting, rewards, masks and hard budgets."""

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from hypothesis import given, settings
from hypothesis import strategies as st

import envs
from envs import Budget, Pool, make_routing_env
from envs.routing import RoutingEnv


def synthetic(**kwargs) -> RoutingEnv:
    return make_routing_env("synthetic", world={"n_train": 50, "n_test": 20}, **kwargs)


def play(env, actions_fn, seed=0, task_id=None, budget=None):
    options = {}
    if task_id:
        options["task_id"] = task_id
    if budget is not None:
        options["budget"] = budget
    obs, info = env.reset(seed=seed, options=options)
    trace = [(obs, info)]
    rewards = []
    while True:
        obs, reward, terminated, truncated, info = env.step(actions_fn(info))
        trace.append((obs, info))
        rewards.append(reward)
        if terminated or truncated:
            return trace, rewards, terminated, truncated


@pytest.mark.parametrize("env_id", ["rlrouter/Synthetic-v0"])
def test_check_env_passes_for_the_synthetic_env(env_id):
    check_env(gym.make(env_id, budget={"usd": 0.05}).unwrapped, skip_render_check=False)


@pytest.mark.parametrize("env_id", ["rlrouter/RouteLLM-MMLU-v0", "rlrouter/RouteLLM-GSM8K-v0"])
def test_check_env_passes_for_the_replay_envs(env_id, routellm_dir):
    check_env(gym.make(env_id, budget={"large_calls": 2}).unwrapped)


def test_check_env_passes_for_a_generic_replay_table(tmp_path):
    table = tmp_path / "t.csv"
    table.write_text("prompt,m1,m2\n" + "".join(f"q{i},{i % 2},1\n" for i in range(20)))
    env = gym.make("rlrouter/Replay-v0", world={"table": str(table), "episode_length": 3},
                   pool=[{"name": "small", "usd_per_1m_input": 1, "usd_per_1m_output": 1,
                          "executor": {"kind": "recorded", "model": "m1"}},
                         {"name": "large", "usd_per_1m_input": 5, "usd_per_1m_output": 5,
                          "executor": {"kind": "recorded", "model": "m2"}}])
    check_env(env.unwrapped)


def test_every_registered_id_is_listed():
    for env_id in envs.ENV_IDS:
        assert env_id in gym.registry


def test_vector_env_steps_all_copies():
    vec = gym.make_vec("rlrouter/Synthetic-v0", num_envs=3, vectorization_mode="sync", budget={"large_calls": 2})
    obs, info = vec.reset(seed=0)
    assert obs["features"].shape == (3, vec.single_observation_space["features"].shape[0])
    assert info["action_mask"].shape == (3, 2)
    for _ in range(40):
        obs, reward, terminated, truncated, info = vec.step(np.ones(3, dtype=int) * 0)
    assert reward.shape == (3,)
    vec.close()


def test_same_seed_same_actions_same_episode():
    a, b = synthetic(), synthetic()
    rng_actions = lambda seed: (lambda info, r=np.random.default_rng(seed): int(r.integers(2)))  # noqa: E731
    ta, ra, *_ = play(a, rng_actions(3), seed=11)
    tb, rb, *_ = play(b, rng_actions(3), seed=11)
    assert ra == rb
    assert [o["prompt"] for o, _ in ta] == [o["prompt"] for o, _ in tb]
    assert all(np.array_equal(x["features"], y["features"]) for (x, _), (y, _) in zip(ta, tb))


def test_episode_cost_is_the_sum_of_per_step_token_costs():
    env = synthetic()
    pool = Pool.default()
    trace, *_ = play(env, lambda info: 1 if len(env.history) % 3 == 0 else 0, seed=5)
    by_hand = 0.0
    for _, info in trace[1:]:
        tier = pool[info["tier"]]
        step_cost = (info["input_tokens"] * tier.usd_per_1m_input + info["output_tokens"] * tier.usd_per_1m_output) / 1e6
        assert info["step_cost_usd"] == pytest.approx(step_cost, rel=1e-12)
        by_hand += step_cost
    assert trace[-1][1]["cost_usd"] == pytest.approx(by_hand, rel=1e-12)


def test_return_is_success_minus_lambda_times_cost():
    env = synthetic(cost_lambda=3.0)
    for seed in range(5):
        trace, rewards, *_ = play(env, lambda info: 1, seed=seed)
        final = trace[-1][1]
        assert sum(rewards) == pytest.approx(float(final["success"]) - 3.0 * final["cost_usd"], abs=1e-12)


def test_prompt_grows_with_history_as_in_a_real_agent():
    env = synthetic()
    trace, *_ = play(env, lambda info: 0, seed=1)
    inputs = [info["input_tokens"] for _, info in trace[1:]]
    assert all(b > a for a, b in zip(inputs, inputs[1:]))


def test_masked_action_raises_a_clear_error():
    env = synthetic(budget={"large_calls": 1})
    env.reset(seed=0)
    env.step(1)
    with pytest.raises(ValueError, match="masked by budget large_calls=1.*action_mask"):
        env.step(1)


def test_masked_action_is_remapped_when_asked():
    env = synthetic(budget={"large_calls": 1}, masked_action="remap")
    env.reset(seed=0)
    _, _, _, _, info = env.step(1)
    _, _, _, _, info = env.step(1)
    assert info["tier"] == "small" and info["calls"] == {"small": 1, "large": 1}


def test_budget_exhaustion_truncates_and_never_overspends():
    env = synthetic(budget={"usd": 0.002})
    trace, _, terminated, truncated = play(env, lambda info: int(np.flatnonzero(info["action_mask"])[-1]), seed=2)
    final = trace[-1][1]
    assert truncated and not terminated and final["budget_exhausted"]
    assert final["cost_usd"] <= 0.002


def test_a_budget_too_small_for_any_step_ends_without_a_call():
    env = synthetic(budget={"usd": 1e-9})
    _, info = env.reset(seed=0)
    assert info["action_mask"].tolist() == [0, 0]
    _, reward, terminated, truncated, info = env.step(0)
    assert (reward, terminated, truncated, info["cost_usd"]) == (0.0, False, True, 0.0)


def test_taxonomy_label_appears_in_info_when_known():
    env = synthetic(taxonomy={"train-3": "hard"})
    _, info = env.reset(seed=0, options={"task_id": "train-3"})
    assert info["taxonomy"] == "hard"


def test_reset_rejects_unknown_options():
    with pytest.raises(ValueError, match="unknown"):
        synthetic().reset(options={"task": "x"})


budget_specs = st.one_of(
    st.builds(lambda usd: Budget(usd=usd), st.floats(0.0, 0.08)),
    st.builds(lambda n: Budget(max_calls={"large": n}), st.integers(0, 12)),
    st.builds(lambda usd, n: Budget(usd=usd, max_calls={"large": n}), st.floats(0.0, 0.08), st.integers(0, 12)),
)


@settings(max_examples=60, deadline=None)
@given(budget=budget_specs, seed=st.integers(0, 10_000), p_large=st.floats(0.0, 1.0))
def test_random_policies_never_exceed_hard_budgets(budget, seed, p_large):
    env = synthetic()
    rng = np.random.default_rng(seed)

    def policy(info):
        allowed = np.flatnonzero(info["action_mask"])
        if len(allowed) == 0:
            return 0
        wanted = 1 if rng.random() < p_large else 0
        return wanted if info["action_mask"][wanted] else int(rng.choice(allowed))

    trace, *_ = play(env, policy, seed=seed, budget=budget)
    final = trace[-1][1]
    if budget.usd is not None:
        assert final["cost_usd"] <= budget.usd + 1e-12
    for tier, cap in budget.max_calls.items():
        assert final["calls"][tier] <= cap


@settings(max_examples=30, deadline=None)
@given(budget=budget_specs, seed=st.integers(0, 10_000))
def test_remapped_random_actions_never_exceed_hard_budgets(budget, seed):
    env = synthetic(masked_action="remap")
    rng = np.random.default_rng(seed)
    trace, *_ = play(env, lambda info: int(rng.integers(2)), seed=seed, budget=budget)
    final = trace[-1][1]
    assert budget.usd is None or final["cost_usd"] <= budget.usd + 1e-12
    assert all(final["calls"][t] <= cap for t, cap in budget.max_calls.items())


def test_docstring_examples_run():
    import doctest

    import envs.routing
    import envs.worlds.synthetic

    for module in (envs.routing, envs.worlds.synthetic):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__
