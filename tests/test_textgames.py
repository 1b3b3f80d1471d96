"""The real text-game worlds (TextWorld games built with tw-make, ScienceWorld's JVM) and the
OpenAI-compatible executor (against the local pool server over real HTTP, with injected
failures; against vLLM's own OpenAI server in tests/test_serve.py's session)."""

from __future__ import annotations

import json
import re
import time

import gymnasium as gym
import httpx
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import envs  # noqa: F401  (registers the ids)
from envs.budget import Budget
from envs.executors import ExecutorError, OpenAIExecutor, parse_action
from envs.pool import Pool
from envs.worlds import build_world
from rlrouter.serve.local_pool import LocalPoolServer

# A tier whose simulated executor always writes the gold command: sigmoid(12 * (50 - d)) == 1.0.
GOLD_POOL = [
    {"name": "small", "usd_per_1m_input": 0.4, "usd_per_1m_output": 1.6,
     "executor": {"kind": "simulated", "skill": 0.5, "output_tokens_mean": 60}},
    {"name": "large", "usd_per_1m_input": 2.0, "usd_per_1m_output": 8.0,
     "executor": {"kind": "simulated", "skill": 50.0, "output_tokens_mean": 90}},
]
SW_TASKS = ["find-non-living-thing", "lifespan-longest-lived", "chemistry-mix-paint-secondary-color"]


@pytest.fixture(scope="module")
def tw_spec(tmp_path_factory):
    return {"n_train": 4, "n_test": 3, "world_size": 3, "nb_objects": 6, "quest_lengths": [2, 4],
            "games_dir": str(tmp_path_factory.mktemp("tw-games"))}


def play(env, task_id, seed, route, budget=None):
    """One episode; ``route(step) -> tier``; returns the step infos (what an episode did)."""
    _, info = env.reset(seed=seed, options={"task_id": task_id, "budget": budget or Budget()})
    steps = []
    while True:
        _, reward, terminated, truncated, info = env.step(route(len(steps)))
        steps.append({k: info[k] for k in ("event", "executor_event", "input_tokens", "output_tokens",
                                           "step_cost_usd", "progress", "success")}
                     | {"obs": env.history[-1][2], "reward": reward})
        if terminated or truncated:
            return steps, info


# -- TextWorld --------------------------------------------------------------------------------
@pytest.mark.slow
def test_textworld_env_passes_check_env(tw_spec):
    env = gym.make("rlrouter/TextWorld-v0", world=tw_spec, split="test").unwrapped
    check_env(env, skip_render_check=True)
    env.close()


@pytest.mark.slow
def test_textworld_walkthrough_replay_wins_in_exactly_its_length(tw_spec):
    env = gym.make("rlrouter/TextWorld-v0", world=tw_spec, pool=GOLD_POOL, split="test").unwrapped
    for task_id in env.task_ids:
        env.reset(seed=3, options={"task_id": task_id})
        walkthrough = list(env._state.plan)  # TextWorld's own policy_commands at the start
        assert walkthrough, task_id
        steps, info = play(env, task_id, 3, lambda i: 1)
        assert info["success"] and steps[-1]["progress"] == 1.0
        assert [s["executor_event"] for s in steps] == ["gold"] * len(walkthrough)
        assert [s["event"] for s in steps] == ["ok"] * len(walkthrough)
        assert [c for c, _ in env._state.history] == walkthrough
        assert steps[-1]["reward"] == pytest.approx(1.0)  # cost_lambda 0: the success reward only
    env.close()


@pytest.mark.slow
def test_textworld_seeded_simulated_executor_replays_the_same_episode(tw_spec):
    runs = []
    for _ in range(2):
        env = gym.make("rlrouter/TextWorld-v0", world=tw_spec, split="test").unwrapped
        runs.append([play(env, "test-1", seed, lambda i: i % 2)[0] for seed in (0, 1, 2, 3)])
        env.close()
    assert runs[0] == runs[1]
    assert len({json.dumps(r) for r in runs[0]}) > 1  # the seed matters
    hidden = {s["executor_event"] for r in runs[0] for s in r}
    assert "gold" in hidden and hidden & {"wrong", "look"}
    # the router sees only that a command was played, not whether it was the right one
    assert {s["event"] for r in runs[0] for s in r} <= {"ok", "fatal"}
    env = gym.make("rlrouter/TextWorld-v0", world=tw_spec, split="test").unwrapped
    play(env, "test-1", 0, lambda i: i % 2)
    prompt = env._prompt()
    labels = re.findall(r"^\d+\. \[(?:small|large)\] (\w+):", prompt, re.MULTILINE)
    assert labels and set(labels) <= {"ok", "fatal", "invalid"}
    env.close()


@pytest.mark.slow
def test_textworld_redraw_replays_one_step_under_fresh_draws(tw_spec):
    env = gym.make("rlrouter/TextWorld-v0", world=tw_spec, split="test").unwrapped
    own, _ = play(env, "test-1", 5, lambda i: 0)
    events = []
    for salt in range(8):
        env.reset(seed=5, options={"task_id": "test-1", "budget": Budget()})
        env.step(0)  # the episode's own first step
        state = env._state
        # the second step's command is gold iff its uniform (computed here from numpy, with
        # the salt as the last key) is below small's success probability
        u = np.random.default_rng([state.seed, 1, 1, *([salt] if salt else [])]).random(3)[0]
        p = env.world.success_probability(state, "small")
        assert env.redraw(salt) and state.redraw == salt
        _, _, terminated, truncated, info = env.step(0)
        assert (info["executor_event"] == "gold") == bool(u < p)
        assert state.redraw == 0  # later steps draw the episode's own numbers
        events.append(info["executor_event"])
        if salt == 0:  # redraw 0 is the episode's own step
            assert env.history[-1][2] == own[1]["obs"] and info["executor_event"] == own[1]["executor_event"]
    assert len(set(events)) > 1  # the redraws do differ
    env.close()


@pytest.mark.slow
def test_textworld_sessions_are_capped_and_finished_episodes_give_theirs_back(tw_spec, trained):
    from envs.routing import RoutingEnv
    from rlrouter.router.checkpoint import load_checkpoint
    from rlrouter.evaluate.router_policy import RouterPolicy

    world = build_world({"kind": "textworld", **tw_spec, "max_sessions": 2}, Pool.default())
    a, b = world.reset("test-0", 0), world.reset("test-1", 0)
    with pytest.raises(RuntimeError, match=r"2 game sessions are live \(world.max_sessions\); play fewer episodes"):
        world.reset("test-2", 0)
    world.release(a)
    world.release(b)
    # a router plays 6 episodes, 2 at a time: each finished episode's env gives its session back
    model, tokenizer, _ = load_checkpoint(trained[1], world.pool.names)
    router = RouterPolicy(model, tokenizer, world.pool.names, max_new_tokens=32, batch_size=2)
    records = router.evaluate(lambda: RoutingEnv(world, world.pool), ["test-0", "test-1", "test-2"],
                              [Budget(), Budget.from_dict({"large_calls": 1})], seed=0, progress=False)
    assert len(records) == 6 and world.open_sessions == 2
    world.close()


def test_textworld_config_errors_name_the_field():
    pool = Pool.default()
    with pytest.raises(ValueError, match=r"world: unknown textworld-world field\(s\) \['quest_len'\]"):
        build_world({"kind": "textworld", "quest_len": 3}, pool)
    with pytest.raises(ValueError, match=r"world.quest_lengths"):
        build_world({"kind": "textworld", "quest_lengths": [0]}, pool)
    with pytest.raises(ValueError, match="kind must be 'simulated' or 'openai'"):
        build_world({"kind": "textworld"}, Pool.from_config([{**GOLD_POOL[0], "executor": {"kind": "gpt"}},
                                                              GOLD_POOL[1]]))


# -- ScienceWorld -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sw_env():
    env = gym.make("rlrouter/ScienceWorld-v0", world={"tasks": SW_TASKS, "variations": 2}, pool=GOLD_POOL,
                   split="test").unwrapped
    yield env
    env.close()


@pytest.mark.slow
def test_scienceworld_env_passes_check_env_and_lists_package_splits(sw_env):
    check_env(sw_env, skip_render_check=True)
    assert len(sw_env.task_ids) == 2 * len(SW_TASKS)
    train = sw_env.world.task_ids("train")
    assert not set(train) & set(sw_env.task_ids)  # the package's train and test variations differ
    assert all(t.split(":")[0] in SW_TASKS for t in train)


@pytest.mark.slow
def test_scienceworld_gold_path_replay_scores_100(sw_env):
    for task_id in sw_env.task_ids[::2]:
        sw_env.reset(seed=0, options={"task_id": task_id})
        gold = list(sw_env._state.plan)  # the package's gold path for this variation
        steps, info = play(sw_env, task_id, 0, lambda i: 1)
        assert info["success"], (task_id, sw_env._state.history)
        # the gold path, played as is (the task may complete before its last command)
        assert [c for c, _ in sw_env._state.history] == gold[:len(steps)] and steps[-1]["progress"] == 1.0
        assert len(steps) >= len(gold) - 1


@pytest.mark.slow
def test_scienceworld_seeded_episode_replays_and_sessions_are_reused(sw_env):
    world = sw_env.world
    task = sw_env.task_ids[1]
    first = [play(sw_env, task, seed, lambda i: 0)[0] for seed in (5, 6)]
    again = [play(sw_env, task, seed, lambda i: 0)[0] for seed in (5, 6)]
    assert first == again
    assert world.open_sessions == 1  # one JVM, leased per episode and given back at the next reset


@pytest.mark.slow
def test_scienceworld_close_ends_the_jvms():
    import psutil

    def java_children() -> set[int]:
        return {p.pid for p in psutil.Process().children(recursive=True) if "java" in p.name()}

    others = java_children()  # other tests' worlds
    world = build_world({"kind": "scienceworld", "tasks": SW_TASKS[:1], "variations": 1}, Pool.default())
    a, b = (world.reset(t, 0) for t in (world.task_ids("test")[0], world.task_ids("train")[0]))
    assert world.open_sessions == 2  # two live episodes, two JVMs
    java = java_children() - others
    assert len(java) == 2
    world.release(a)
    world.close()
    time.sleep(1.0)
    assert not [p for p in java if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    with pytest.raises(RuntimeError, match="released; reset first"):
        world.step(a, world.pool.tiers[0])
    del b


DEAD_JVM_SCRIPT = """
import json
from envs.pool import Pool
from envs.worlds import build_world
world = build_world({"kind": "scienceworld", "tasks": ["find-non-living-thing"], "variations": 1}, Pool.default())
state = world.reset(world.task_ids("test")[0], 0)
state.session.env._gateway.java_process.kill()
state.session.env._gateway.java_process.wait()
try:
    world.step(state, world.pool.tiers[0])
    error = None
except RuntimeError as err:
    error = str(err)
after = world.open_sessions
fresh = world.reset(world.task_ids("test")[0], 0)
tokens = world.step(fresh, world.pool.tiers[1]).input_tokens
print(json.dumps({"error": error, "after": after, "tokens": tokens, "sessions": world.open_sessions}))
world.close()
"""


@pytest.mark.slow
def test_scienceworld_a_dead_jvm_gives_a_clear_error_and_is_not_reused():
    # In a child process: py4j's teardown after a killed JVM trips a CPython 3.11 bug
    # ("AST constructor recursion depth mismatch") in a later compile of the host process.
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", DEAD_JVM_SCRIPT], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert re.search(r"scienceworld: the game failed while .* its session was closed, reset to start a new episode",
                     result["error"])
    assert result["after"] == 0  # the dead session is not reused
    assert result["tokens"] > 0 and result["sessions"] == 1  # the next episode got a new JVM


def test_scienceworld_unknown_task_is_named():
    world = build_world({"kind": "scienceworld", "tasks": ["boil-the-ocean"]}, Pool.default())
    try:
        with pytest.raises(ValueError, match=r"world.tasks: unknown ScienceWorld task\(s\) \['boil-the-ocean'\]"):
            world.task_ids("train")
    finally:
        world.close()


# -- the OpenAI-compatible executor ------------------------------------------------------------
def test_parse_action_takes_the_last_action_line_and_matches_admissible():
    admissible = ["go east", "take key", "look"]
    assert parse_action("Thought: east.\nAction: Go East.", admissible) == ("go east", "")
    assert parse_action("Action: look\nThought: no\naction: `take key`", admissible) == ("take key", "")
    assert parse_action("I would take the key", admissible)[0] is None
    command, why = parse_action("Action: eat key", admissible)
    assert command is None and "not an admissible command" in why


@pytest.fixture(scope="module")
def pool_server():
    with LocalPoolServer(api_key="tw-pool-secret-1234") as server:
        yield server


def openai_pool(base_url: str, **extra) -> list[dict]:
    return [{"name": "small", "usd_per_1m_input": 0.4, "usd_per_1m_output": 1.6,
             "executor": {"kind": "openai", "endpoint": base_url, "model": "agent-small",
                          "api_key_env": "TW_POOL_KEY", "retry_backoff_s": 0.01, **extra}},
            {"name": "large", "usd_per_1m_input": 2.0, "usd_per_1m_output": 8.0,
             "executor": {"kind": "openai", "endpoint": base_url, "model": "agent-large",
                          "api_key_env": "TW_POOL_KEY", "retry_backoff_s": 0.01, **extra}}]


def control(server, **body):
    httpx.post(f"http://127.0.0.1:{server.port}/control", json=body).raise_for_status()


def ledger(server) -> list[dict]:
    return httpx.get(f"http://127.0.0.1:{server.port}/ledger").json()["calls"]


@pytest.mark.slow
def test_openai_executor_plays_steps_and_charges_the_usage(pool_server, tw_spec, monkeypatch):
    monkeypatch.setenv("TW_POOL_KEY", "tw-pool-secret-1234")
    control(pool_server, reset_ledger=True)
    env = gym.make("rlrouter/TextWorld-v0", world=tw_spec, pool=openai_pool(pool_server.base_url),
                   split="test").unwrapped
    env.reset(seed=0, options={"task_id": "test-0"})
    first = env._state.plan[0]
    control(pool_server, model="agent-large", reply=f"Thought: the walkthrough says so.\nAction: {first}")
    _, _, _, _, info = env.step(1)  # a valid command: the game executes it
    assert info["event"] == "ok" and env._state.history[-1][0] == first
    control(pool_server, model="agent-small", reply="I am not sure what to do.")
    before = env._state.observation
    _, _, _, _, info2 = env.step(0)  # no Action line: a counted no-op step, paid for
    assert info2["event"] == "invalid" and env._state.observation is before and env._state.steps_taken == 2
    calls = ledger(pool_server)
    assert [c["model"] for c in calls] == ["agent-large", "agent-small"]
    for step_info, call, price in ((info, calls[0], (2.0, 8.0)), (info2, calls[1], (0.4, 1.6))):
        assert (step_info["input_tokens"], step_info["output_tokens"]) == (call["prompt_tokens"],
                                                                           call["completion_tokens"])
        assert step_info["step_cost_usd"] == pytest.approx((call["prompt_tokens"] * price[0]
                                                            + call["completion_tokens"] * price[1]) / 1e6)
    assert env.world.executors["small"].invalid == 1
    control(pool_server, model="agent-large", reply=None)
    control(pool_server, model="agent-small", reply=None)
    env.close()


@pytest.mark.slow
def test_openai_executor_retries_5xx_and_429_then_succeeds(pool_server, tw_spec, monkeypatch):
    monkeypatch.setenv("TW_POOL_KEY", "tw-pool-secret-1234")
    control(pool_server, reset_ledger=True)
    control(pool_server, model="agent-small", mode="500", count=2)
    env = gym.make("rlrouter/TextWorld-v0", world=tw_spec, pool=openai_pool(pool_server.base_url),
                   split="test").unwrapped
    env.reset(seed=0, options={"task_id": "test-0"})
    env.step(0)
    control(pool_server, model="agent-small", mode="429", count=1)
    env.step(0)
    assert [c["status"] for c in ledger(pool_server)] == [500, 500, 200, 429, 200]
    assert env.world.executors["small"].retries == 3
    env.close()


@pytest.mark.slow
def test_openai_executor_gives_up_after_bounded_retries_with_a_clear_error(pool_server, monkeypatch):
    monkeypatch.setenv("TW_POOL_KEY", "tw-pool-secret-1234")
    control(pool_server, reset_ledger=True)
    control(pool_server, model="agent-small", mode="timeout", count=-1)
    executor = OpenAIExecutor("small", pool_server.base_url, "agent-small", "TW_POOL_KEY", timeout_s=0.3,
                              max_retries=2, retry_backoff_s=0.01)
    with pytest.raises(ExecutorError, match=r"3 attempt\(s\) at .* failed; last: timeout after 0.3s"):
        executor.complete([{"role": "user", "content": "hi"}])
    assert len([c for c in ledger(pool_server) if c["model"] == "agent-small"]) == 3
    control(pool_server, model="agent-small", mode="ok", count=0)
    monkeypatch.setenv("TW_POOL_KEY", "wrong-key-5678")
    with pytest.raises(ExecutorError, match=r"refused the call \(HTTP 401.*check the key in \$TW_POOL_KEY") as err:
        executor.complete([{"role": "user", "content": "hi"}])
    assert "wrong-key-5678" not in str(err.value) and "tw-pool-secret" not in str(err.value)


def test_openai_executor_config_errors():
    with pytest.raises(ValueError, match="api_key_env must name an environment variable"):
        OpenAIExecutor("small", "http://127.0.0.1:1/v1", "m", api_key_env="sk-live abc")
    with pytest.raises(ValueError, match="endpoint must be an http"):
        OpenAIExecutor("small", "127.0.0.1:1/v1", "m")
    with pytest.raises(ValueError, match="unknown: \\['temprature'\\]"):
        build_world({"kind": "textworld"}, Pool.from_config(openai_pool("http://127.0.0.1:1/v1", temprature=0)))


# -- the pipeline's stages on a small subset of each world ------------------------------------
def small_recipe(path: str, tmp_path, world: dict) -> str:
    import yaml

    raw = yaml.safe_load(open(path))
    raw["world"].update(world)
    raw["synth"].update({"tasks": 4, "boundary_k": 1, "n_strata": 1, "samples": 1, "hard_repeat": 1,
                         "out_dir": str(tmp_path / "synth")})
    raw["eval"].update({"tasks": 3, "boundary_k": 1, "budgets": ["none", "large_calls=2"], "bootstrap": 20,
                        "policies": ["always-small", "always-large", "escalate", "knn", "mlp", "mf"],
                        "embedding": {"thresholds": [0.1], "cache_dir": str(tmp_path / "cache")},
                        "out_dir": str(tmp_path / "eval")})
    out = tmp_path / "recipe.yaml"
    out.write_text(yaml.safe_dump(raw))
    return str(out)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["textworld", "scienceworld"])
def test_boundary_synthesis_and_eval_run_on_a_small_subset(recipe, tw_spec, tmp_path, capsys):
    from rlrouter.cli import main

    world = ({**tw_spec, "n_train": 4, "n_test": 3} if recipe == "textworld"
             else {"tasks": SW_TASKS[:2], "variations": 2})
    path = small_recipe(f"recipes/{recipe}.yaml", tmp_path, world)
    for command in (["synth", path, "--quiet"], ["eval", path, "--quiet"]):  # the CLI, in this process
        assert main(command) == 0, capsys.readouterr().err[-3000:]
    report = json.loads((tmp_path / "synth" / "report.json").read_text())
    assert report["tasks"] == 4 and sum(report["taxonomy_counts"].values()) == 4 and report["examples"] >= 1
    boundary = json.loads((tmp_path / "synth" / "boundary.json").read_text())
    # (a large run can cost less than a small one here: the small model wanders for more steps)
    assert len(boundary) == 4 and all(0 <= b["s_small"] <= 1 and b["c_large"] > 0 and b["c_small"] > 0
                                      for b in boundary.values())
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    rows = {(r["policy"], r["budget"]): r for r in results["summary"]}
    policies = ("always-small", "always-large", "escalate", "knn(t=0.1)", "mlp(t=0.1)", "mf(t=0.1)")
    assert set(rows) == {(p, b) for p in policies for b in ("none", "large_calls=2")}
    # a live game cannot be copied: each boundary step has the outcome of the tier that played it only
    steps = results["meta"]["embedding"]["steps"]
    assert steps["counterfactual"] is False and steps["tasks"] == 4
    assert all(r["budget_violations"] == 0 and r["episodes"] == 3 for r in rows.values())
    assert rows[("always-small", "none")]["large_fraction"] == 0.0
    assert rows[("always-large", "none")]["large_fraction"] == 1.0
    capped = [e for e in results["episodes"] if e["budget"] == "large_calls=2"]
    assert all(e["calls"].get("large", 0) <= 2 for e in capped)


def test_the_gpu_recipe_builds_its_openai_executors_without_calling_them():
    from rlrouter.config import load_recipe

    recipe = load_recipe("recipes/scienceworld-gpu.yaml")
    world = recipe.build_world()
    try:
        executors = world.executors
        assert [type(e).__name__ for e in executors.values()] == ["OpenAIExecutor", "OpenAIExecutor"]
        assert executors["large"].url == "http://127.0.0.1:8002/v1/chat/completions"
        assert executors["small"].api_key_env == "EXECUTOR_KEY"
    finally:
        world.close()


# -- against vLLM's own OpenAI-compatible server (conftest's vllm_openai_server) ----------
@pytest.mark.slow
def test_openai_executor_against_a_real_vllm_server(vllm_openai_server, tw_spec, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("VLLM_KEY", "vllm-key-42")
    base = {"endpoint": vllm_openai_server["base_url"], "model": "tiny-agent", "api_key_env": "VLLM_KEY",
            "max_tokens": 24}
    pool = [{"name": "small", "usd_per_1m_input": 0.4, "usd_per_1m_output": 1.6,
             "executor": {"kind": "openai", **base, "constrain_to_admissible": True}},
            {"name": "large", "usd_per_1m_input": 2.0, "usd_per_1m_output": 8.0,
             "executor": {"kind": "openai", **base}}]
    env = gym.make("rlrouter/TextWorld-v0", world=tw_spec, pool=pool, split="test").unwrapped
    tokenizer = AutoTokenizer.from_pretrained(vllm_openai_server["checkpoint"])
    env.reset(seed=0, options={"task_id": "test-0"})
    for action in (0, 0, 1):
        executor = env.world.executors[env.pool.tiers[action].name]
        messages = executor.messages(env.world, env._state)
        admissible = list(env._state.observation.admissible)
        _, _, terminated, truncated, info = env.step(action)
        # prompt tokens as vLLM counts them: the checkpoint's chat template, tokenized
        expected = len(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                   return_dict=False))
        assert info["input_tokens"] == expected
        assert 1 <= info["output_tokens"] <= 24
        assert info["step_cost_usd"] == pytest.approx(env.pool.tiers[action].cost_usd(info["input_tokens"],
                                                                                       info["output_tokens"]))
        command = env._state.history[-1][0]
        if action == 0:  # constrained to the admissible commands: always a real command for the game
            assert info["event"] != "invalid" and command in admissible
        if terminated or truncated:
            break
    assert env.world.executors["small"].invalid == 0 and env.world.executors["small"].calls == 2
    env.close()
