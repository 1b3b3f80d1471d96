"""Router LLM, the parts that need no trained router: tokenizer and tiny model, synthesis,
the route constraint (the trained router's tests are in test_router_trained.py)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from envs import Budget, make_routing_env
from rlrouter.boundary.synthesis import cheapest_successful, play_trajectory, synthesize
from rlrouter.router.checkpoint import load_checkpoint, save_checkpoint
from rlrouter.router.generation import RouteConstraint
from rlrouter.router.model import TinyRouterConfig
from rlrouter.router.prompt import parse_strict, parse_tolerant
from conftest import ListTokenizer

ROOT = Path(__file__).resolve().parents[1]


def two_query_env(tmp_path, cheap_correct):
    path = tmp_path / "t.jsonl"
    rows = [{"prompt": f"q{i}", "cheap": cheap_correct[i % len(cheap_correct)], "strong": True,
             "cheap_cost": 0.001, "strong_cost": 0.01} for i in range(20)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pool = [{"name": "small", "usd_per_1m_input": 1, "usd_per_1m_output": 1, "executor": {"model": "cheap"}},
            {"name": "large", "usd_per_1m_input": 9, "usd_per_1m_output": 9, "executor": {"model": "strong"}}]
    return make_routing_env("replay", pool=pool, world={"source": "table", "table": str(path), "episode_length": 3,
                                                        "success_fraction": 1.0})


def test_tiny_router_requires_head_dim_64():
    with pytest.raises(ValueError, match="head_dim 64"):
        TinyRouterConfig(hidden_size=128, num_attention_heads=4)


def test_a_saved_router_reloads_with_the_tokenizer_it_was_trained_with(tmp_path):
    # A saved router has a Qwen2 config, so AutoTokenizer rebuilds its tokenizer as a
    # Qwen2Tokenizer (Qwen2's own normalizer and pre-tokenizer around the saved merges). A
    # tokenizer trained with another split tokenized "$0.40" differently after the round trip
    # than during SFT: the loaded router then read numbers it had never seen.
    from rlrouter.router.model import build_tiny_router, train_tokenizer

    texts = ["Spent $0.0040. Budget: large calls 12 of 15 left", "Step 14/30, 13/24 done. Next: open the log",
             "- small: $0.40/$1.60 per 1M tokens. café ÷ 2"] * 30
    tokenizer = train_tokenizer(texts, vocab_size=400)
    model = build_tiny_router(tokenizer, TinyRouterConfig(vocab_size=len(tokenizer)))
    path = save_checkpoint(model, tokenizer, tmp_path / "ckpt", {"pool": [{"name": "small"}, {"name": "large"}]})
    _, loaded, _ = load_checkpoint(path)
    assert type(loaded).__name__ == "Qwen2Tokenizer"
    chat = [{"role": "system", "content": texts[2]}, {"role": "user", "content": texts[0] + "\n" + texts[1]},
            {"role": "assistant", "content": "<think>ok; large 12</think><route>small</route>"}]
    for text in texts[:3] + ["Task 2026: 1234567 steps, $12.3456 left"]:
        assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"], text
    assert (loaded.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]
            == tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"])
    assert tokenizer.tokenize("40") == ["4", "0"]  # one token per digit, as Qwen2 splits them


def test_stratified_search_with_one_stratum_picks_the_cheapest_boundary_that_succeeds(tmp_path):
    env = two_query_env(tmp_path, [False])  # small always wrong: only all-large succeeds
    traj = cheapest_successful(env, "train-0", Budget(), seed=0, n_strata=1, samples=3)
    assert traj.success and traj.actions == [1, 1, 1] and traj.cost_usd == pytest.approx(0.03)
    env = two_query_env(tmp_path, [True])  # small always right: all-small is cheapest
    traj = cheapest_successful(env, "train-0", Budget(), seed=0, n_strata=1, samples=3)
    assert traj.actions == [0, 0, 0] and traj.cost_usd == pytest.approx(0.003)


def test_stratified_search_returns_the_cheapest_of_its_successful_samples(tmp_path):
    env = two_query_env(tmp_path, [False, True, True, False, True])
    best = cheapest_successful(env, "train-1", Budget(), seed=4, n_strata=4, samples=8)
    # independent reference: the cheapest route that succeeds, by enumeration
    rows = env.world.rows_of("train-1")
    needed_large = [not env.world.table.correct["cheap"][r] for r in rows]
    optimum = sum(0.01 if n else 0.001 for n in needed_large)
    assert best.success and best.cost_usd >= optimum - 1e-12
    assert best.cost_usd == pytest.approx(optimum)  # 40 samples find it on 3 queries
    assert best.actions == [int(n) for n in needed_large]


def test_trajectory_messages_are_the_router_conversation():
    env = make_routing_env("synthetic", world={"n_train": 5})
    traj = play_trajectory(env, "train-0", Budget(max_calls={"large": 2}), seed=0, choose=lambda view: 1)
    roles = [m["role"] for m in traj.messages]
    assert roles[:3] == ["system", "user", "assistant"] and roles.count("assistant") == len(traj.actions)
    assert sum(traj.actions) == 2  # large masked after two calls: remapped to small
    assert len(traj.step_prompts) == len(traj.actions)
    for m in traj.messages[2::2]:
        assert parse_strict(m["content"], ["small", "large"]).tier in ("small", "large")


def test_synthesis_is_reproducible_with_the_same_seed():
    env = make_routing_env("synthetic", world={"n_train": 20})
    budgets = [Budget(), Budget(max_calls={"large": 3})]
    a = synthesize(env, env.task_ids, budgets, seed=5, k_boundary=2, n_strata=2, samples=2, progress=False)[0]
    b = synthesize(env, env.task_ids, budgets, seed=5, k_boundary=2, n_strata=2, samples=2, progress=False)[0]
    c = synthesize(env, env.task_ids, budgets, seed=6, k_boundary=2, n_strata=2, samples=2, progress=False)[0]
    assert a.to_list() == b.to_list()
    assert a.to_list() != c.to_list()


def test_synthesized_dataset_carries_taxonomy_and_boundary_stats():
    env = make_routing_env("synthetic", world={"n_train": 30})
    ds, stats, labels, report = synthesize(env, env.task_ids, [Budget()], seed=0, k_boundary=2, n_strata=2,
                                           samples=2, progress=False)
    for row in ds:
        assert row["taxonomy"] == labels[row["task_id"]]
        assert row["s_small"] == stats[row["task_id"]].s_small
        if row["taxonomy"] in ("easy", "intractable"):
            assert row["large_calls"] == 0  # always-small trajectories
        else:
            assert row["success"]
    assert report["examples"] + len(report["skipped_hard_without_success"]) == 30


def test_hard_seeds_add_fresh_draws_of_each_hard_task():
    env = make_routing_env("synthetic", world={"n_train": 30})
    kwargs = dict(seed=0, k_boundary=2, n_strata=2, samples=2, progress=False)
    one, _, labels, _ = synthesize(env, env.task_ids, [Budget()], **kwargs)
    three, _, _, report = synthesize(env, env.task_ids, [Budget()], hard_seeds=3, **kwargs)
    hard = [t for t in env.task_ids if labels[t] == "hard"]
    assert hard and report["hard_seeds"] == 3
    # every task: one draw if easy or intractable, three if hard; a draw without success is counted
    assert report["examples"] + len(report["skipped_hard_without_success"]) == 30 + 2 * len(hard)
    rows = three.to_list()
    # draw 0 is seeded as a single draw: the hard_seeds = 1 dataset is part of it, in order
    single = one.to_list()
    assert [r for r in rows if r in single] == single
    # the other draws are other episodes: the hard rows of one task are not copies
    by_task = {}
    for r in rows:
        by_task.setdefault(r["task_id"], []).append(r["messages"])
    repeated = [m for t, m in by_task.items() if len(m) > 1]
    assert repeated and all(t in hard for t, m in by_task.items() if len(m) > 1)
    assert any(m[0] != m[1] for m in repeated)


def test_hindsight_routes_each_step_to_the_cheapest_tier_that_does_what_the_priciest_does():
    from rlrouter.boundary.synthesis import hindsight_trajectory

    env = make_routing_env("synthetic", world={"n_train": 12})
    checked = {0: 0, 1: 0}
    for index, task_id in enumerate(env.task_ids):
        traj = hindsight_trajectory(env, task_id, Budget(), seed=100 + index)
        # an independent check by copying the state before each step (no replays): large
        # exactly where small fails and large succeeds (the synthetic step's outcome)
        env.reset(seed=100 + index, options={"task_id": task_id, "budget": Budget()})
        for action in traj.actions:
            snapshot, ok = env.snapshot(), []
            for tier in range(len(env.pool)):
                env.restore(snapshot)
                ok.append(env.step(tier)[4]["step_ok"])
            assert action == int(ok[1] and not ok[0])
            checked[action] += 1
            env.restore(snapshot)
            _, _, terminated, truncated, info = env.step(action)
        assert terminated or truncated
        assert info["success"] == traj.success and info["cost_usd"] == pytest.approx(traj.cost_usd)
    assert checked[0] and checked[1]  # both tiers are labelled somewhere


def redraws_where_small_fails(env, draws: int) -> int:
    """Of ``draws`` draws of the next step (the episode's own, then redraws), how many have
    small fail where large succeeds: counted by state copies, no replays; the episode is
    left where it was."""
    snapshot, differ = env.snapshot(), 0
    for r in range(draws):
        ok = []
        for tier in range(len(env.pool)):
            env.restore(snapshot)
            env.redraw(r)
            ok.append(env.step(tier)[4]["step_ok"])
        differ += int(ok[1] and not ok[0])
    env.restore(snapshot)
    return differ


def written_tiers(messages: list[dict], names: list[str]) -> list[str]:
    """The tier each route turn of a synthesized conversation writes."""
    return [parse_tolerant(m["content"], names, names[0]).tier for m in messages if m["role"] == "assistant"]


def test_averaged_hindsight_labels_count_the_redraws_where_small_does_otherwise():
    from rlrouter.boundary.synthesis import hindsight_trajectory

    env = make_routing_env("synthetic", world={"n_train": 10})
    draws, tolerance, checked = 32, 0.25, {0: 0, 1: 0}
    gains = []
    for index, task_id in enumerate(env.task_ids):
        traj = hindsight_trajectory(env, task_id, Budget(), seed=200 + index, draws=draws, tolerance=tolerance)
        # independent check with state copies: at each step of the route, count the redraws
        # in which small fails where large succeeds (the step's uniform is shared by tiers)
        env.reset(seed=200 + index, options={"task_id": task_id, "budget": Budget()})
        for action in traj.actions:
            differ = redraws_where_small_fails(env, draws)
            state = env._state
            gains.append((env.world.success_probability(state, "large")
                          - env.world.success_probability(state, "small"), action))
            assert action == int(differ > tolerance * draws)
            checked[action] += 1
            _, _, terminated, truncated, info = env.step(action)  # the episode's own draw
        assert terminated or truncated
        assert info["success"] == traj.success and info["cost_usd"] == pytest.approx(traj.cost_usd)
    assert checked[0] and checked[1]
    # the label follows the step's gain: large where it is well above the tolerance, small
    # where it is well below
    assert all(a == 1 for g, a in gains if g > tolerance + 0.25) and any(g > tolerance + 0.25 for g, _ in gains)
    assert all(a == 0 for g, a in gains if g < tolerance - 0.2)
    with pytest.raises(ValueError, match="draws must be an integer"):
        hindsight_trajectory(env, env.task_ids[0], Budget(), seed=0, draws=0)
    with pytest.raises(ValueError, match="tolerance must be in"):
        hindsight_trajectory(env, env.task_ids[0], Budget(), seed=0, draws=2, tolerance=1.0)


def test_one_draw_hindsight_is_the_same_for_any_tolerance():
    from rlrouter.boundary.synthesis import hindsight_trajectory

    env = make_routing_env("synthetic", world={"n_train": 6})
    for index, task_id in enumerate(env.task_ids):
        routes = {tol: hindsight_trajectory(env, task_id, Budget(), seed=7 + index, tolerance=tol).actions
                  for tol in (0.0, 0.5, 0.9)}
        assert routes[0.0] == routes[0.5] == routes[0.9]


def test_synthetic_redraw_changes_only_the_next_steps_draw():
    env = make_routing_env("synthetic", world={"n_train": 4})
    env.reset(seed=11, options={"task_id": env.task_ids[0], "budget": Budget()})
    world, state = env.world, env._state
    assert env.redraw(0) and state.redraw == 0
    assert env.redraw(3) and state.redraw == 3
    # the step's uniform is the salted draw: computed here from numpy, not from the world
    u = np.random.default_rng([11, state.position, state.attempt, 1, 3]).random(2)[0]
    p = world.success_probability(state, "small")
    ok = env.step(0)[4]["step_ok"]
    assert ok == bool(u < p)
    assert state.redraw == 0  # the step after it draws the episode's own numbers


def test_hindsight_labels_in_synthesis_keep_only_successes():
    env = make_routing_env("synthetic", world={"n_train": 20})
    kwargs = dict(seed=0, k_boundary=2, n_strata=2, samples=2, progress=False)
    ds, _, labels, report = synthesize(env, env.task_ids, [Budget()], hard_labels="hindsight", **kwargs)
    assert report["hard_labels"] == "hindsight"
    hard_rows = [r for r in ds.to_list() if r["taxonomy"] == "hard"]
    assert hard_rows and all(r["success"] for r in hard_rows)
    with pytest.raises(ValueError, match="hard_labels"):
        synthesize(env, env.task_ids, [Budget()], hard_labels="oracle", **kwargs)


def test_relabeled_states_carry_the_hindsight_labels_of_a_random_route():
    from rlrouter.boundary.synthesis import hindsight_label, relabeled_trajectory

    env = make_routing_env("synthetic", world={"n_train": 8})
    draws, tolerance, p = 16, 0.25, 0.5
    written, played_large, relabelled = {0: 0, 1: 0}, 0, 0
    for index, task_id in enumerate(env.task_ids):
        seed = 300 + index
        traj = relabeled_trajectory(env, task_id, Budget(), seed, p, draws=draws, tolerance=tolerance)
        routes = written_tiers(traj.messages, env.pool.names)
        # independent check: the behaviour route drawn here from numpy, and at each of its
        # states the redraws in which small fails where large succeeds, by state copies
        behaviour = np.random.default_rng([seed, 23])
        env.reset(seed=seed, options={"task_id": task_id, "budget": Budget()})
        for step, action in enumerate(traj.actions):
            assert action == int(behaviour.random() < p)
            label = int(redraws_where_small_fails(env, draws) > tolerance * draws)
            assert traj.labels[step] == label and routes[step] == env.pool.names[label]
            written[label] += 1
            played_large += action
            _, _, terminated, truncated, info = env.step(action)
        assert terminated or truncated
        assert info["success"] == traj.success and info["cost_usd"] == pytest.approx(traj.cost_usd)
        relabelled += traj.labels != traj.actions
    assert written[0] and written[1] and played_large
    assert relabelled  # the labels are not the played route
    # in synthesis: hard tasks' rows keep failed episodes, count the written tiers and
    # record the played ones
    env = make_routing_env("synthetic", world={"n_train": 20})
    ds, _, labels, report = synthesize(env, env.task_ids, [Budget()], seed=0, k_boundary=2, n_strata=2, samples=2,
                                       hard_labels="relabel", hindsight_draws=4, relabel_p=0.5, progress=False)
    assert report["hard_labels"] == "relabel" and report["relabel_p"] == 0.5
    hard_rows = [r for r in ds.to_list() if r["taxonomy"] == "hard"]
    assert len(hard_rows) == sum(v == "hard" for v in labels.values())  # none left out
    written_rows = [[env.pool.names.index(t) for t in written_tiers(r["messages"], env.pool.names)] for r in hard_rows]
    for r, written_row in zip(hard_rows, written_rows):
        assert r["large_calls"] == written_row.count(1) and len(r["played"]) == r["steps"] == len(written_row)
    assert any(not r["success"] for r in hard_rows)
    assert any(r["played"] != written_row for r, written_row in zip(hard_rows, written_rows))
    with pytest.raises(ValueError, match="p must be a probability"):
        relabeled_trajectory(env, env.task_ids[0], Budget(), 0, 1.5)
    with pytest.raises(ValueError, match="draws must be an integer >= 1, got 0"):  # not "every state cheapest"
        relabeled_trajectory(env, env.task_ids[0], Budget(), 0, 0.5, draws=0)
    with pytest.raises(ValueError, match=r"tolerance must be in \[0, 1\), got 1.0"):
        hindsight_label(env, env.task_ids[0], Budget(), 0, [], draws=2, tolerance=1.0)


def test_step_examples_make_one_chat_per_decision():
    from rlrouter.boundary.synthesis import step_examples

    env = make_routing_env("synthetic", world={"n_train": 6})
    ds = synthesize(env, env.task_ids, [Budget()], seed=0, k_boundary=1, n_strata=1, samples=1, progress=False)[0]
    steps = step_examples(ds)
    assert len(steps) == sum(ds["steps"])
    first = ds[0]
    routes = [m for m in first["messages"] if m["role"] == "assistant"]
    for k, example in enumerate(steps.select(range(first["steps"]))):
        assert [m["role"] for m in example["messages"]] == ["system", "user", "assistant"]
        assert example["messages"][1]["content"] == first["step_prompts"][k]
        assert example["messages"][2] == routes[k]


def test_route_constraint_keeps_the_turn_in_the_strict_format_with_allowed_tiers():
    vocab = ["<|im_end|>", "<think>", "a", "</think>", "b", "<route>", "</route>", "small", "la", "rge", "x<y"]

    tok = ListTokenizer(vocab, {"small": [7], "large": [8, 9]})
    proc = RouteConstraint(tok, [["small"], ["small", "large"]], prompt_length=1, route_bias=3.0)
    ids = torch.tensor([[1, 4, 5], [1, 4, 5]])
    scores = proc(ids, torch.zeros(2, len(vocab)))
    assert torch.isfinite(scores[0]).nonzero().flatten().tolist() == [7]
    # equal logits: P(small) = 0.5 < sigmoid(3) = 0.95, so the bias escalates to large
    assert torch.isfinite(scores[1]).nonzero().flatten().tolist() == [8]
    assert proc.allowed_next(1, [1, 5, 8]) == [9]
    assert proc.allowed_next(1, [1, 5, 8, 9, 6]) == [0]  # after </route>: end the turn
    assert proc.allowed_next(0, []) == [1]  # a turn opens with <think>
    assert proc.allowed_next(0, [1, 2]) is None  # think text: free, within limits
    assert proc.allowed_next(0, [1, 2, 3]) == [5]  # </think> is followed by <route>
    free = proc(torch.tensor([[1, 1, 2]]), torch.zeros(1, len(vocab)))
    # think text may not end the turn, nor contain '<' (other than </think>)
    assert torch.isinf(free[0]).nonzero().flatten().tolist() == [0, 1, 5, 6, 10]


def test_route_bias_takes_the_cheapest_tier_whose_cumulative_probability_reaches_sigmoid_bias():
    vocab = ["<|im_end|>", "<think>", "</think>", "<route>", "</route>", "small", "medium", "large"]
    tok = ListTokenizer(vocab, {"small": [5], "medium": [6], "large": [7]})
    tiers = [["small", "medium", "large"], ["small", "large"], ["small", "medium"]]
    probs = torch.tensor([0.75, 0.20, 0.05])  # small / medium / large at the tier token
    logits = torch.full((len(vocab),), -30.0)
    logits[5:8] = probs.log()

    def routed(bias: float) -> list[str]:
        proc = RouteConstraint(tok, tiers, prompt_length=1, route_bias=bias, turn_format="route")
        out = proc(torch.tensor([[0, 3]] * 3), logits.repeat(3, 1))
        return [vocab[int(row.argmax())] for row in out]

    # Row 0 by hand: cumulative (0.75, 0.95, 1.0). Row 1 renormalizes over its allowed tiers:
    # small 0.75 / 0.80 = 0.9375. Row 2: small 0.75 / 0.95 = 0.789.
    assert routed(0.0) == ["small", "small", "small"]  # plain greedy
    assert routed(-2.0) == ["small", "small", "small"]
    assert routed(math.log(0.8 / 0.2)) == ["medium", "small", "medium"]  # sigmoid = 0.80
    assert routed(math.log(0.94 / 0.06)) == ["medium", "large", "medium"]  # sigmoid = 0.94
    assert routed(math.log(0.97 / 0.03)) == ["large", "large", "medium"]  # sigmoid = 0.97


def test_route_bias_with_two_tiers_equals_adding_it_to_the_priciest_tiers_logit():
    vocab = ["<|im_end|>", "<think>", "</think>", "<route>", "</route>", "small", "large"]
    tok = ListTokenizer(vocab, {"small": [5], "large": [6]})
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(64, len(vocab), generator=generator) * 3
    for bias in (-2.5, -0.7, 0.4, 1.9, 4.0):
        proc = RouteConstraint(tok, [["small", "large"]] * 64, prompt_length=1, route_bias=bias, turn_format="route")
        out = proc(torch.tensor([[0, 3]] * 64), logits.clone())
        added = logits[:, 5:7].clone()
        added[:, 1] += bias
        assert out.argmax(-1).tolist() == (5 + added.argmax(-1)).tolist()
