"""The environments' prompt-cache option (``env.prompt_cache``): while consecutive steps stay
on one tier, the history prefix is billed at the tier's cached-input price; a switch loses
it. Costs are checked against hand-computed dollars."""

from __future__ import annotations

import pytest

from envs.pool import Pool, Tier
from envs.routing import RoutingEnv
from envs.tokens import count_tokens
from envs.worlds.base import RouterView, StepResult, World
from envs.worlds.synthetic import SyntheticConfig, SyntheticWorld
from rlrouter.config import RecipeError, recipe_from_dict
from rlrouter.evaluate.runner import run_episode, summarize

# dollars per 1M tokens: input, output, cached input (a tenth of the input price)
POOL = Pool((Tier("small", 0.40, 1.60, usd_per_1m_cached_input=0.04),
             Tier("large", 2.00, 8.00, usd_per_1m_cached_input=0.20)))


class LineWorld(World):
    """A world with round token counts: call k reads 1000 + 100·k prompt tokens, of which the
    last 40 are its step text (so 960 + 100·k of them open call k+1's prompt too) and
    writes 50; every step succeeds; the task is 5 steps long."""

    name = "line"
    models_prompt_prefix = True

    def task_ids(self, split):
        return ["t0"]

    def reset(self, task_id, seed):
        return {"k": 0, "done": False}

    def router_view(self, state):
        return RouterView("line task", f"step {state['k']}", state["k"], state["k"], 5, 10)

    def worst_case_tokens(self, state, tier):
        return 1000 + 100 * state["k"], 50

    def prompt_prefix_tokens(self, state):
        return 960 + 100 * state["k"]

    def step(self, state, tier):
        state["k"] += 1
        state["done"] = state["k"] == 5
        return StepResult("ok", 1000 + 100 * (state["k"] - 1), 50, True, "ok", state["k"] / 5, state["done"],
                          state["done"])


def play(env, route):
    env.reset(seed=0, options={"task_id": env.task_ids[0]})
    infos = []
    for tier in route:
        *_, info = env.step(env.pool.index(tier))
        infos.append(info)
    return infos


def test_a_stay_then_switch_episode_costs_what_was_computed_by_hand():
    env = RoutingEnv(LineWorld(POOL), prompt_cache=True)
    infos = play(env, ["small", "small", "large", "large", "small"])
    # by hand, in millionths of a dollar (tokens x dollars per 1M tokens):
    #   0 small, cold:          1000·0.40 + 50·1.60                       = 480
    #   1 small, stays:  (1100−960)·0.40 + 960·0.04 + 50·1.60 = 56 + 38.4 + 80 = 174.4
    #   2 large, switch: cold   1200·2.00 + 50·8.00                       = 2800
    #   3 large, stays:  (1300−1160)·2.00 + 1160·0.20 + 50·8.00 = 280 + 232 + 400 = 912
    #   4 small, back:  its cache went with the switch: 1400·0.40 + 50·1.60 = 640
    expected = [480, 174.4, 2800, 912, 640]
    assert [i["cached_tokens"] for i in infos] == [0, 960, 0, 1160, 0]
    assert [i["step_cost_usd"] * 1e6 for i in infos] == pytest.approx(expected)
    assert infos[-1]["cost_usd"] * 1e6 == pytest.approx(5006.4)
    assert env.ledger.cached_tokens == {"small": 960, "large": 1160}


def test_the_cache_is_off_by_default_and_then_every_token_pays_the_input_price():
    env = RoutingEnv(LineWorld(POOL))
    infos = play(env, ["small", "small", "large", "large", "small"])
    # 480 + (1100·0.40 + 80) + 2800 + (1300·2.00 + 400) + 640
    assert infos[-1]["cost_usd"] * 1e6 == pytest.approx(480 + 520 + 2800 + 3000 + 640)
    assert all(i["cached_tokens"] == 0 for i in infos)


def test_a_snapshot_restores_which_tier_holds_the_cache():
    env = RoutingEnv(LineWorld(POOL), prompt_cache=True)
    play(env, ["small"])
    saved = env.snapshot()
    *_, stay = env.step(0)
    env.restore(saved)
    *_, switch = env.step(1)
    env.restore(saved)
    *_, again = env.step(0)
    assert (stay["cached_tokens"], switch["cached_tokens"], again["cached_tokens"]) == (960, 0, 960)


def test_on_the_synthetic_world_a_stay_reads_the_previous_calls_history_prefix():
    world = SyntheticWorld(POOL, SyntheticConfig(seed=0, n_train=5, n_test=5))
    env = RoutingEnv(world, prompt_cache=True)
    route = ["small", "small", "small", "large", "large", "small"]
    for seed in range(50):  # the first episode that lasts the whole route (no early fatal step)
        env.reset(seed=seed, options={"task_id": env.task_ids[0]})
        task_tokens, infos = env._state.task_tokens, []
        for tier in route:
            *_, terminated, truncated, info = env.step(env.pool.index(tier))
            infos.append(info)
            if terminated or truncated:
                break
        if len(infos) == len(route):
            break
    assert len(infos) == len(route), "no episode lasted the route"
    # the prefix of call k: system prompt + task + every earlier step's output and observation
    history = [0]
    for i, info in enumerate(infos):
        history.append(history[-1] + info["output_tokens"] + count_tokens(env.history[i][2]))
    for k in range(1, len(infos)):
        stays = route[k] == route[k - 1]
        expected = world.config.system_tokens + task_tokens + history[k - 1] if stays else 0
        assert infos[k]["cached_tokens"] == expected, k
        tier = POOL[route[k]]
        full = (infos[k]["input_tokens"] * tier.usd_per_1m_input + infos[k]["output_tokens"] * tier.usd_per_1m_output)
        assert infos[k]["step_cost_usd"] * 1e6 == pytest.approx(
            full - expected * (tier.usd_per_1m_input - tier.usd_per_1m_cached_input))


class FixedRoute:
    name = "fixed"

    def __init__(self, route):
        self.route = route

    def begin(self, env, seed):
        self.k = 0

    def act(self, obs, info):
        self.k += 1
        return POOL.index(self.route[self.k - 1])


def test_evaluation_counts_switches_and_the_cached_share_of_input():
    from envs.budget import Budget

    env = RoutingEnv(LineWorld(POOL), prompt_cache=True)
    record = run_episode(env, FixedRoute(["small", "small", "large", "large", "small"]), "t0", Budget(), 0)
    assert (record.switches, record.input_tokens, record.cached_tokens) == (2, 6000, 2120)
    row = summarize([record], "large")[0]
    assert row["switch_rate"] == 2 / 4 and row["cached_input_share"] == pytest.approx(2120 / 6000)


class ScriptedEngine:
    """A router engine that writes a fixed route, one turn per step (one episode per batch)."""

    def __init__(self, tokenizer, tiers, route):
        from rlrouter.router.prompt import RouterFormat

        self.tokenizer, self.tiers, self.format, self.route = tokenizer, tiers, RouterFormat(), list(route)

    def generate(self, prompts, allowed, **_):
        from rlrouter.router.generation import Generation
        from rlrouter.router.prompt import format_route

        return [Generation(self.tokenizer(format_route(self.route.pop(0), "go"), add_special_tokens=False)["input_ids"])
                for _ in prompts]


def test_a_router_policys_records_count_switches_and_cached_input_like_the_baselines():
    from envs.budget import Budget
    from rlrouter.evaluate.router_policy import RouterPolicy
    from rlrouter.router.model import train_tokenizer

    route = ["small", "small", "large", "large", "small"]
    tokenizer = train_tokenizer(["route small large think go step line task"], vocab_size=300)
    policy = RouterPolicy(None, tokenizer, POOL.names, batch_size=1, engine=ScriptedEngine(tokenizer, POOL.names, route))
    [record] = policy.play(lambda: RoutingEnv(LineWorld(POOL), prompt_cache=True), [("t0", Budget(), 0)],
                           progress=False)
    assert (record.switches, record.input_tokens, record.cached_tokens) == (2, 6000, 2120)  # as computed above
    assert record.cost_usd == pytest.approx(5006.4e-6)


def test_a_recipe_turning_the_cache_on_needs_cached_prices_and_a_world_with_a_prefix():
    tiers = [{"name": "small", "usd_per_1m_input": 0.4, "usd_per_1m_output": 1.6},
             {"name": "large", "usd_per_1m_input": 2.0, "usd_per_1m_output": 8.0}]
    with pytest.raises(RecipeError, match="env.prompt_cache is on but no tier of pool.tiers declares "
                                          "usd_per_1m_cached_input"):
        recipe_from_dict({"name": "x", "pool": {"tiers": tiers}, "env": {"prompt_cache": True}})
    with pytest.raises(RecipeError, match="env.prompt_cache must be true or false"):
        recipe_from_dict({"name": "x", "env": {"prompt_cache": "yes"}})
    cached = [dict(t, usd_per_1m_cached_input=t["usd_per_1m_input"] / 10) for t in tiers]
    recipe = recipe_from_dict({"name": "x", "pool": {"tiers": cached}, "env": {"prompt_cache": True},
                               "world": {"kind": "synthetic", "n_train": 5, "n_test": 5}})
    assert recipe.make_env("train").prompt_cache
    with pytest.raises(ValueError, match="share no prompt prefix"):
        RoutingEnv(_ReplayLike(POOL), prompt_cache=True)


class _ReplayLike(LineWorld):
    name = "replay-like"
    models_prompt_prefix = False
