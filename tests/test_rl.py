"""RL stage: rewards, advantages, the clipped loss and its masks, token-in/token-out
rollouts, and (slow) training runs: reward goes up, resume after SIGKILL, vLLM rollouts."""

import copy
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from envs import Budget
from rlrouter.rl.advantages import bopo_advantages, explained_variance, gae, grpo_advantages, tree_advantages
from rlrouter.rl.loss import clipped_policy_loss, token_logprobs
from rlrouter.rl.rewards import RewardSpec, TaskBoundary, episode_reward, normalized_cost, reference_rewards
from rlrouter.rl.rollout import (EpisodeSpec, HFEngine, constraint_masks, feedback_ids, play_episodes,
                                 training_sequences)
from rlrouter.router.policy import think_banned_ids
from rlrouter.rl.trainer import RLSettings

ROOT = Path(__file__).resolve().parents[1]
HARD = TaskBoundary(s_small=0.2, s_large=0.8, c_small=0.01, c_large=0.05, taxonomy="hard")


# -- rewards ------------------------------------------------------------------------------
def test_bopo_reward_is_boundary_relative_with_the_difficulty_bonus_and_format_penalty():
    spec = RewardSpec("bopo", hard_bonus=0.5, cost_clip=2.0, format_penalty=0.5)
    # C_norm = (0.03 - 0.01) / (0.05 - 0.01) = 0.5; R = 1 + 0.5 - 0.4 * 0.5 - 0.5 * 0.5
    assert episode_reward(spec, True, 0.03, 0.5, 0.4, HARD) == pytest.approx(1.05)
    assert episode_reward(spec, False, 0.03, 0.0, 0.4, HARD) == pytest.approx(-0.2)
    easy = TaskBoundary(0.9, 1.0, 0.01, 0.05, "easy")  # no bonus off hard tasks
    assert episode_reward(spec, True, 0.01, 0.0, 0.4, easy) == pytest.approx(1.0)


def test_normalized_cost_is_zero_at_always_small_one_at_always_large_and_clipped():
    assert normalized_cost(0.01, HARD, 2.0) == 0.0
    assert normalized_cost(0.05, HARD, 2.0) == pytest.approx(1.0)
    assert normalized_cost(0.5, HARD, 2.0) == 2.0
    assert normalized_cost(0.001, HARD, 2.0) == 0.0
    assert normalized_cost(0.03, TaskBoundary(0.5, 0.5, 0.02, 0.02, "easy"), 2.0) == 0.0  # c_L = c_S


def test_cost_reward_charges_dollars_and_needs_no_boundary():
    assert episode_reward(RewardSpec("cost", format_penalty=0.0), True, 0.03, 0.0, 10.0) == pytest.approx(0.7)


def test_reference_rewards_are_the_boundary_policies_expected_rewards():
    small, large = reference_rewards(RewardSpec("bopo", hard_bonus=0.5), HARD, cost_lambda=0.4)
    assert small == pytest.approx(0.2 + 0.5 * 0.2)  # s_S (1 + β), no normalized cost
    assert large == pytest.approx(0.8 + 0.5 * 0.8 - 0.4)  # s_L (1 + β) − λ · 1


def test_bopo_reward_without_boundary_statistics_says_what_to_run():
    with pytest.raises(ValueError, match="synth"):
        episode_reward(RewardSpec("bopo"), True, 0.01, 0.0, 0.5, None)


# -- advantages ---------------------------------------------------------------------------
def test_grpo_advantages_are_group_normalized():
    np.testing.assert_allclose(grpo_advantages([1.0, 0.0, 0.0, 1.0]), [1, -1, -1, 1], atol=1e-5)
    np.testing.assert_allclose(grpo_advantages([0.3, 0.3]), [0, 0])


def test_bopo_advantage_stays_negative_for_a_group_that_collapsed_to_cheap_failure():
    rewards = [0.0, 0.0, 0.0, 0.0]
    # b = 0.5·0 + 0.25·0 + 0.25·1 = 0.25; σ = std([0, 0, 0, 0, 0, 1]) = sqrt(5/36)
    expected = -0.25 / math.sqrt(5 / 36)
    np.testing.assert_allclose(bopo_advantages(rewards, 0.0, 1.0, 0.25, 0.25), [expected] * 4, rtol=1e-5)
    np.testing.assert_allclose(grpo_advantages(rewards), [0, 0, 0, 0])  # GRPO learns nothing here


def test_bopo_without_reference_weights_uses_the_group_mean_as_baseline():
    a = bopo_advantages([1.0, 0.0], 0.0, 1.0, 0.0, 0.0)
    scale = np.std([1.0, 0.0, 0.0, 1.0])
    np.testing.assert_allclose(a, [0.5 / scale, -0.5 / scale], rtol=1e-5)
    with pytest.raises(ValueError, match="sum to <= 1"):
        bopo_advantages([1.0], 0.0, 1.0, 0.7, 0.7)


def test_tree_credit_goes_only_to_the_turns_where_the_group_chose_differently():
    routes = [[0, 0, 1], [0, 1], [0, 0, 0], [1]]
    rewards = np.array([1.0, 0.0, 0.5, 0.2])
    a = tree_advantages(routes, rewards, root_baseline=0.4, scale=1.0)
    # turn 0: child {0,1,2} mean 0.5 vs root 0.4; rollout 3's child {3}: 0.2 − 0.4
    # turn 1 (node {0,1,2}, mean 0.5): rollouts 0 and 2 chose small (mean 0.75), rollout 1 large (0)
    # turn 2 (node {0,2}, mean 0.75): rollout 0 → 1.0, rollout 2 → 0.5
    expected = [[0.1, 0.25, 0.25], [0.1, -0.5], [0.1, 0.25, -0.25], [-0.2]]
    for got, want in zip(a, expected):
        np.testing.assert_allclose(got, want, atol=1e-5)
    same = tree_advantages([[0, 0], [0, 0]], np.array([1.0, 0.0]), root_baseline=0.5, scale=0.5)
    np.testing.assert_allclose(same, [[0, 0], [0, 0]], atol=1e-5)  # no divergence: no credit


def test_tree_tail_credit_gives_turns_after_the_last_split_the_reward_against_that_node():
    routes = [[0, 0, 1, 0], [0, 1, 1], [0, 0, 0], [1, 0]]
    rewards = np.array([1.0, 0.0, 0.5, 0.2])
    plain = tree_advantages(routes, rewards, root_baseline=0.4, scale=1.0)
    tail = tree_advantages(routes, rewards, root_baseline=0.4, scale=1.0, tail=True)
    # rollout 0 is alone from turn 3 (last shared node {0,2}, mean 0.75): 1.0 − 0.75;
    # rollout 1 alone from turn 2 (last shared {0,1,2}, mean 0.5): 0 − 0.5;
    # rollout 3 alone from turn 1 (it only shared the root, baseline 0.4): 0.2 − 0.4
    expected = [[0.1, 0.25, 0.25, 0.25], [0.1, -0.5, -0.5], [0.1, 0.25, -0.25], [-0.2, -0.2]]
    for got, want in zip(tail, expected):
        np.testing.assert_allclose(got, want, atol=1e-5)
    for got, want in zip(plain, [[0.1, 0.25, 0.25, 0], [0.1, -0.5, 0], [0.1, 0.25, -0.25], [-0.2, 0]]):
        np.testing.assert_allclose(got, want, atol=1e-5)  # plain tree credit: nothing after the split


def test_tree_credit_with_a_branch_episode_compares_the_two_tiers_at_the_branched_turn():
    # rollout 0 went small, small, large; the branch replayed small, small and took small at turn 2
    routes = [[0, 0, 1], [1, 0], [0, 0, 0, 0]]
    rewards = np.array([1.0, 0.0, 0.5])
    a = tree_advantages(routes, rewards, root_baseline=0.4, scale=1.0, starts=[0, 0, 2])
    # turn 0: the branch is not in the root node (it joins at turn 2): 1.0 − 0.4 and 0 − 0.4;
    # turn 1: rollout 0 alone (prefix [0]); turn 2: node {0, branch}, mean 0.75
    expected = [[0.6, 0, 0.25], [-0.4, 0], [0, 0, -0.25, 0]]
    for got, want in zip(a, expected):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_branches_are_chosen_where_the_whole_node_chose_alike_and_the_other_tier_is_allowed():
    from rlrouter.rl.rollout import Rollout, RouterTurn
    from rlrouter.rl.trainer import choose_branches

    def rollout(tiers, allowed, failed=()):
        ro = Rollout(EpisodeSpec("train-0", Budget(), seed=7))
        ro.turns = [RouterTurn([], [], None, t, True, a, after_failure=k in failed)
                    for k, (t, a) in enumerate(zip(tiers, allowed))]
        return ro

    both, small = ["small", "large"], ["small"]
    played = [rollout(["small", "small", "large", "small"], [both, both, both, both]),
              rollout(["small", "small", "small", "small"], [both, both, both, small])]
    specs = choose_branches(played, 10, np.random.default_rng(0))
    # turn 0: never (its credit is against the root's baseline); turn 1: both chose small in
    # the same state -> one candidate; turn 2: they differ -> none; turn 3: each is alone,
    # rollout 0 can take large, rollout 1's budget allowed only small -> one candidate
    assert sorted(s.forced for s in specs) == [("small", "large"), ("small", "small", "large", "large")]
    assert all(s.seed == 7 and s.task_id == "train-0" for s in specs)
    assert len(choose_branches(played, 1, np.random.default_rng(0))) == 1
    # branch_on failure: only the turns right after a failed step (rollout 0: turns 2 and 3;
    # at turn 2 the node already compares tiers)
    played[0].turns = rollout(["small", "small", "large", "small"], [both] * 4, failed={2, 3}).turns
    specs = choose_branches(played, 10, np.random.default_rng(0), on="failure")
    assert [s.forced for s in specs] == [("small", "small", "large", "large")]


def test_gae_over_router_turns_matches_the_hand_computation():
    advantages, returns = gae([0.0, 0.0, 1.0], [0.2, 0.5, 0.7], gamma=1.0, lam=0.5)
    # δ = [0.3, 0.2, 0.3]; A2 = 0.3, A1 = 0.2 + 0.5·0.3, A0 = 0.3 + 0.5·0.35
    np.testing.assert_allclose(advantages, [0.475, 0.35, 0.3])
    np.testing.assert_allclose(returns, [0.675, 0.85, 1.0])
    np.testing.assert_allclose(gae([1.0], [0.4], 0.9, 0.95)[0], [0.6])  # one turn: r − V


def test_explained_variance():
    assert explained_variance(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0])) == 1.0
    assert explained_variance(np.array([2.0, 2.0, 2.0]), np.array([1.0, 2.0, 3.0])) == 0.0
    assert math.isnan(explained_variance(np.array([1.0]), np.array([1.0])))


# -- loss ---------------------------------------------------------------------------------
def test_clipped_loss_matches_the_hand_computation_and_ignores_masked_tokens():
    logp = torch.tensor([[0.0, 0.0, 0.0]])
    old = torch.tensor([[-0.5, 0.5, 3.0]])  # ratios e^0.5, e^-0.5, e^-3 (masked)
    adv = torch.tensor([[1.0, 1.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, stats = clipped_policy_loss(logp, old, adv, mask, clip_eps=0.2, n_tokens=2.0)
    # token 1: min(1.6487, 1.2) = 1.2; token 2: min(0.6065, 0.8) = 0.6065
    assert float(loss) == pytest.approx(-(1.2 + math.exp(-0.5)) / 2, rel=1e-5)
    assert stats["clipfrac"] == 2.0
    negative, _ = clipped_policy_loss(logp, old, -adv, mask, clip_eps=0.2, n_tokens=2.0)
    # A < 0: min(−1.6487, −1.2) = −1.6487; min(−0.6065, −0.8) = −0.8
    assert float(negative) == pytest.approx((math.exp(0.5) + 0.8) / 2, rel=1e-5)


def test_environment_tokens_get_no_gradient():
    torch.manual_seed(0)
    logits = torch.randn(1, 6, 11, requires_grad=True)
    ids = torch.randint(0, 11, (1, 6))
    logp, entropy = token_logprobs(logits, ids)
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0, 1.0]])  # positions 0 and 3 score prompt/env tokens
    loss, _ = clipped_policy_loss(logp, logp.detach(), torch.ones_like(logp), mask, 0.2, 3.0, entropy=entropy)
    loss.backward()
    grad_rows = logits.grad[0].abs().sum(-1)
    assert grad_rows[0] == 0 and grad_rows[3] == 0 and grad_rows[5] == 0  # last position scores nothing
    assert (grad_rows[[1, 2, 4]] > 0).all()


def test_token_logprobs_match_log_softmax():
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 7)
    ids = torch.randint(0, 7, (2, 4))
    logp, entropy = token_logprobs(logits, ids)
    ref = torch.log_softmax(logits, -1)
    assert torch.allclose(logp[1, 2], ref[1, 2, ids[1, 3]])
    p = ref[0, 0].exp()
    assert torch.allclose(entropy[0, 0], -(p * ref[0, 0]).sum())


# -- settings -----------------------------------------------------------------------------
@pytest.mark.parametrize("field,value,match", [
    ("algorithm", "dpo", "rl.algorithm"),
    ("reward", "profit", "rl.reward"),
    ("engine", "tgi", "rl.engine"),
    ("group_size", 1, "group_size"),
    ("cost_lambda", [0.9, 0.1], "cost_lambda"),
    ("device", "tpu", "rl.device"),
    ("task_taxonomy", ["medium"], "rl.task_taxonomy"),
    ("task_taxonomy", [], "rl.task_taxonomy"),
    ("branches", -1, "rl.branches"),
    ("branches", 2, "rl.branches gives tree credit"),  # with the default episode credit
    ("branch_on", "success", "rl.branch_on"),
])
def test_rl_settings_name_the_bad_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        RLSettings(**{field: value})


def test_recipe_rl_section_is_validated():
    from rlrouter.config import RecipeError, recipe_from_dict

    with pytest.raises(RecipeError, match="rl: unknown field"):
        recipe_from_dict({"name": "x", "rl": {"algo": "bopo"}})
    with pytest.raises(RecipeError, match="rl.budgets"):
        recipe_from_dict({"name": "x", "rl": {"budgets": ["huge_calls=3"]}})


# -- token-in/token-out -------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    from rlrouter.router.model import train_tokenizer

    texts = ["Task: fix the cache layer. Budget: none. Step 1/4. Next: open the file",
             "<information>ok: done</information> Spent $0.0010. small large"] * 20
    return train_tokenizer(texts, vocab_size=400)


def test_feedback_tokens_are_the_chat_templates_text_between_assistant_turns(tokenizer):
    ids = feedback_ids(tokenizer, "ok, next", turn_ended=True)
    assert tokenizer.decode(ids) == "\n<|im_start|>user\nok, next<|im_end|>\n<|im_start|>assistant\n"
    cut = feedback_ids(tokenizer, "ok, next", turn_ended=False)  # a truncated turn gets its end token here
    assert tokenizer.decode(cut) == "<|im_end|>" + tokenizer.decode(ids)


@pytest.mark.slow
@pytest.mark.parametrize("prompt_mode", ["episode", "step"])
def test_rollout_sequences_mask_exactly_the_generated_tokens(trained, prompt_mode):
    from rlrouter.router.checkpoint import load_checkpoint

    recipe, path = trained
    model, tok, _ = load_checkpoint(path, recipe.pool.names)
    engine = HFEngine(model, tok, recipe.pool.names, max_new_tokens=16)
    torch.manual_seed(0)
    specs = [EpisodeSpec(f"train-{i}", Budget(max_calls={"large": 1}), seed=i) for i in range(3)]
    rollouts = play_episodes(engine, lambda: recipe.make_env("train"), specs, prompt_mode, sample=True,
                             logprobs=True)
    for rollout in rollouts:
        sequences = training_sequences(rollout, prompt_mode)
        assert len(sequences) == (1 if prompt_mode == "episode" else len(rollout.turns))
        generated = [t for turn in rollout.turns for t in turn.completion_ids]
        masked_in = [ids[i] for ids, mask, _ in sequences for i, m in enumerate(mask) if m]
        assert masked_in == generated  # the router's tokens, exactly as generated, and nothing else
        assert rollout.calls.get("large", 0) <= 1  # the budget held under sampling
        if prompt_mode == "episode" and len(rollout.turns) > 1:
            ids, mask, _ = sequences[0]
            first, second = rollout.turns[0], rollout.turns[1]
            env_part = ids[len(first.prompt_ids) + len(first.completion_ids):len(second.prompt_ids)]
            assert tok.decode(env_part).startswith(("\n<|im_start|>user\n<information>",
                                                    "<|im_end|>\n<|im_start|>user\n<information>"))
        # the engine's log-probs are those of the constrained distribution it sampled from:
        # a fresh forward pass with the same constraint masks gives the same values
        ids, mask, _ = sequences[0]
        turns = rollout.turns if prompt_mode == "episode" else rollout.turns[:1]
        positions = np.flatnonzero(mask[1:])
        masks = [m for turn in turns for m in constraint_masks(tok, turn)]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0]
        for pos, allowed in zip(positions, masks):
            banned = torch.zeros(logits.shape[-1], dtype=torch.bool)
            if allowed is None:
                banned[think_banned_ids(tok)] = True
            else:
                banned[:] = True
                banned[allowed] = False
            logits[pos] = logits[pos].masked_fill(banned, float("-inf"))
        logp, _ = token_logprobs(logits[None], torch.tensor([ids]))
        engine_lp = [lp for turn in turns for lp in turn.logprobs]
        np.testing.assert_allclose(logp[0, positions].numpy(), engine_lp, atol=1e-4)
        assert all(turn.completion_ids[0] == tok.convert_tokens_to_ids("<think>") for turn in rollout.turns)


@pytest.mark.slow
def test_forced_tiers_replay_the_episode_and_the_router_takes_over_in_the_same_state(trained):
    from rlrouter.router.checkpoint import load_checkpoint

    recipe, path = trained
    model, tok, _ = load_checkpoint(path, recipe.pool.names)
    engine = HFEngine(model, tok, recipe.pool.names, max_new_tokens=16)
    make_env = lambda: recipe.make_env("train")  # noqa: E731
    specs = [EpisodeSpec(f"train-{i}", Budget(), seed=100 + i) for i in range(8)]
    played = [ro for ro in play_episodes(engine, make_env, specs) if len(ro.turns) >= 3]
    assert played
    replays = play_episodes(engine, make_env, [EpisodeSpec(ro.spec.task_id, ro.spec.budget, ro.spec.seed,
                                                           forced=tuple(ro.routes[:2])) for ro in played])
    for ro, again in zip(played, replays):  # greedy: the same episode, two steps taken without the router
        assert again.routes == ro.routes and again.cost_usd == ro.cost_usd and again.success == ro.success
        assert again.turns[0].prompt_ids == ro.turns[2].prompt_ids
    for ro, again in zip(played, replays):  # each turn knows whether the step before it failed
        env = make_env()
        env.reset(seed=ro.spec.seed, options={"task_id": ro.spec.task_id, "budget": ro.spec.budget})
        failed = [False] + [not env.step(recipe.pool.names.index(t))[4]["step_ok"] for t in ro.routes[:-1]]
        assert [t.after_failure for t in ro.turns] == failed
        assert [t.after_failure for t in again.turns] == failed[2:]
    assert any(t.after_failure for ro in played for t in ro.turns)
    other = {"small": "large", "large": "small"}
    flipped = play_episodes(engine, make_env, [EpisodeSpec(ro.spec.task_id, ro.spec.budget, ro.spec.seed,
                                                           forced=(ro.routes[0], other[ro.routes[1]]))
                                               for ro in played])
    for ro, branch in zip(played, flipped):
        assert branch.routes[:2] == [ro.routes[0], other[ro.routes[1]]]
        assert len(branch.turns) == len(branch.routes) - 2
    capped = EpisodeSpec("train-0", Budget(max_calls={"large": 0}), seed=1, forced=("large",))
    with pytest.raises(ValueError, match="forced tier 'large' at step 0"):
        play_episodes(engine, make_env, [capped])
    with pytest.raises(ValueError, match="prompt_mode: step"):
        play_episodes(engine, make_env, [EpisodeSpec("train-0", Budget(), 1, forced=("small",))], "episode")


@pytest.mark.slow
def test_route_only_loss_trains_the_decision_and_not_the_think_text(trained):
    from rlrouter.rl.trainer import RLTrainer
    from rlrouter.router.checkpoint import load_checkpoint

    recipe, path = trained
    model, tok, _ = load_checkpoint(path, recipe.pool.names)
    torch.manual_seed(0)
    specs = [EpisodeSpec(f"train-{i}", Budget(), seed=i) for i in range(3)]
    rollouts = play_episodes(HFEngine(model, tok, recipe.pool.names, max_new_tokens=32),
                             lambda: recipe.make_env("train"), specs, "step", sample=True, logprobs=True)
    trainer = RLTrainer.__new__(RLTrainer)  # build_batch needs only the settings and the tokenizer
    trainer.settings, trainer.tokenizer, trainer.prompt_mode = RLSettings(loss_tokens="route"), tok, "step"
    batch = trainer.build_batch(rollouts)
    turns = [turn for rollout in rollouts for turn in rollout.turns]
    assert len(batch.input_ids) == len(turns)
    for ids, mask, turn in zip(batch.input_ids, batch.loss_mask, turns):
        trained_tokens = [tok.decode([ids[1:][p]]) for p in np.flatnonzero(mask)]
        text = tok.decode(turn.completion_ids)
        tier = text.split("<route>")[1].split("</route>")[0]
        # forced tokens (log-prob 0) and the tier; the think text and </think> get no gradient
        # the route's tier may be several tokens (the test tokenizer's vocabulary is small)
        assert trained_tokens[:2] == ["<think>", "<route>"], (trained_tokens, text)
        assert trained_tokens[-2:] == ["</route>", tok.eos_token], (trained_tokens, text)
        assert "".join(trained_tokens[2:-2]) == tier, (trained_tokens, text)


# -- training runs ------------------------------------------------------------------------
def rl_recipe(trained, tmp_path, **rl):
    recipe = copy.deepcopy(trained[0])
    settings = {"algorithm": "bopo", "iterations": 3, "tasks_per_iteration": 8, "group_size": 4,
                "tasks": 40, "budgets": ["none", "large_calls=2"], "learning_rate": 1e-3, "save_every": 1,
                "micro_batch_size": 64, "out_dir": str(tmp_path / "rl"), **rl}
    recipe.rl = RLSettings(**settings)
    recipe.sft.out_dir = str(trained[1])
    return recipe


def policy_reward(recipe, checkpoint) -> float:
    """Mean reward of the policy on the 40 training tasks × 4 sampled episodes, with fixed
    episode seeds and sampling seed (the objective RL maximizes, measured the same way
    before and after)."""
    from rlrouter.rl.trainer import load_boundaries
    from rlrouter.router.checkpoint import load_checkpoint

    model, tok, _ = load_checkpoint(checkpoint, recipe.pool.names)
    boundaries = load_boundaries(recipe.synth_dir() / "boundary.json")
    specs = [EpisodeSpec(f"train-{i}", Budget(), seed=1000 + i) for i in range(40) for _ in range(4)]
    torch.manual_seed(1234)
    played = play_episodes(HFEngine(model, tok, recipe.pool.names, 32), lambda: recipe.make_env("train"), specs,
                           sample=True)
    spec = recipe.rl.reward_spec()
    low, _ = recipe.rl.lambda_range()
    return float(np.mean([episode_reward(spec, r.success, r.cost_usd, r.malformed_fraction, low,
                                         boundaries[r.spec.task_id]) for r in played]))


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["bopo", "grpo", "ppo"])
def test_a_seeded_short_run_raises_the_mean_reward(trained, tmp_path, algorithm):
    from rlrouter.pipeline import run_rl_stage

    # λ = 200 $⁻¹ makes every large call expensive: the SFT router's occasional large calls
    # are the clear thing to unlearn in 8 iterations of 32 episodes. BoPO runs with the
    # quickstart's tree credit: with episode credit its reward fell here (−0.38 → −0.62),
    # with tree credit it rises (−0.38 → −0.13)
    credit = "tree" if algorithm == "bopo" else "episode"
    recipe = rl_recipe(trained, tmp_path, algorithm=algorithm, iterations=8, save_every=8,
                       reward="cost", cost_lambda=200.0, learning_rate=2e-3, credit=credit)
    before = policy_reward(recipe, trained[1])
    path = run_rl_stage(recipe, progress=False)
    after = policy_reward(recipe, path)
    history = json.loads((path / "trainer_state" / "state.json").read_text())["history"]
    assert len(history) == 8 and all(np.isfinite(h["approx_kl"]) for h in history)
    assert after > before + 0.05, (before, after)


@pytest.mark.slow
def test_sequences_without_advantage_skip_the_update_and_the_gradient_is_the_same(trained, tmp_path):
    from rlrouter.pipeline import build_rl_trainer

    recipe = rl_recipe(trained, tmp_path, credit="tree", tasks_per_iteration=4)
    trainer = build_rl_trainer(recipe, trained[1], tmp_path / "rl")
    groups, played, _, _ = trainer.collect(np.random.default_rng(0))
    _, advantages = trainer.score(groups, played)
    batch = trainer.build_batch([ro for group in played for ro in group])
    batch.set_advantages([a for group in advantages for a in group])
    start = copy.deepcopy((trainer.model.state_dict(), trainer.optimizer.state_dict()))
    results = {}
    for skip in (True, False):
        trainer.model.load_state_dict(start[0])
        trainer.optimizer.load_state_dict(copy.deepcopy(start[1]))
        trainer.skip_zero_advantage = skip
        stats = trainer.update(batch, np.random.default_rng(1))
        results[skip] = (stats["trained_fraction"], {k: v.clone() for k, v in trainer.model.state_dict().items()})
    assert 0 < results[True][0] < 1 and results[False][0] == 1.0  # tree credit left some turns at 0
    moved = [k for k, v in results[False][1].items() if not torch.equal(v, start[0][k])]
    assert moved
    for key in moved:
        torch.testing.assert_close(results[True][1][key], results[False][1][key], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_branch_episodes_are_played_scored_and_trained_on(trained, tmp_path):
    from rlrouter.pipeline import build_rl_trainer

    recipe = rl_recipe(trained, tmp_path, credit="tree", branches=3, tasks_per_iteration=4)
    trainer = build_rl_trainer(recipe, trained[1], tmp_path / "rl")
    metrics = trainer.iterate()
    assert 0 < metrics["branch_episodes"] <= 3 * 4 and metrics["episodes"] == 4 * recipe.rl.group_size
    assert -1 <= metrics["branch_large_success_gain"] <= 1
    groups, played, branched, _ = trainer.collect(np.random.default_rng(0))
    assert sum(map(len, branched)) and all(len(b) <= 3 for b in branched)
    rewards, advantages = trainer.score(groups, played, branched)
    assert [len(r) for r in rewards] == [4] * len(groups)  # the group's own rollouts only
    checked = 0
    for group, extra, adv, r, ((spec, cost_lambda), *_) in zip(played, branched, advantages, rewards, groups):
        assert len(adv) == len(group) + len(extra)
        assert [len(a) for a in adv] == [len(ro.turns) for ro in group + extra]  # forced turns are not trained
        for b in extra:  # the rollouts it branched from: credit at the branched turn = their mean reward − the branch's
            t = len(b.spec.forced) - 1
            assert t >= 1
            node = [k for k, ro in enumerate(group) if len(ro.routes) > t and ro.routes[:t] == list(b.spec.forced[:t])]
            r_branch = episode_reward(trainer.reward_spec, b.success, b.cost_usd, b.malformed_fraction, cost_lambda,
                                      trainer.boundaries[spec.task_id])
            if len([x for x in extra if x.spec.forced[:t] == b.spec.forced[:t]]) == 1:
                want = np.sign(np.round(np.mean([r[k] for k in node]) - r_branch, 9))
                assert all(np.sign(np.round(adv[k][t], 9)) == want for k in node)
                checked += 1
    assert checked


def _metrics_without_timing(path: Path) -> list[dict]:
    """The logged metrics without wall-clock fields (seconds, rates: every key ending in ``_s``)."""
    return [{k: v for k, v in json.loads(line).items() if not k.endswith("_s")}
            for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_task_taxonomy_keeps_only_training_tasks_of_those_boundary_classes(trained, tmp_path):
    from rlrouter.pipeline import build_rl_trainer
    from rlrouter.rl.trainer import load_boundaries

    boundaries = load_boundaries(trained[0].synth_dir() / "boundary.json")
    hard = [t for t in [f"train-{i}" for i in range(40)] if boundaries[t].taxonomy == "hard"]
    assert 0 < len(hard) < 40
    recipe = rl_recipe(trained, tmp_path, task_taxonomy=["hard"])
    trainer = build_rl_trainer(recipe, trained[1], tmp_path / "rl")
    assert trainer.task_ids == hard
    everything = build_rl_trainer(rl_recipe(trained, tmp_path), trained[1], tmp_path / "rl")
    assert everything.task_ids == [f"train-{i}" for i in range(40)]


@pytest.mark.slow
def test_a_run_killed_with_sigkill_and_resumed_ends_like_an_uninterrupted_one(trained, tmp_path):
    from rlrouter.pipeline import run_rl_stage
    from safetensors.torch import load_file

    reference = rl_recipe(trained, tmp_path / "a", iterations=4)
    run_rl_stage(reference, progress=False)

    recipe = rl_recipe(trained, tmp_path / "b", iterations=4)
    data = {"name": recipe.name, "seed": recipe.seed, "stages": ["rl"], "world": recipe.world,
            "env": {"cost_lambda": recipe.env.cost_lambda}, "router": {"max_new_tokens": 32},
            "synth": {"tasks": 40, "out_dir": str(recipe.synth_dir())}, "sft": {"out_dir": str(trained[1])},
            "rl": {k: v for k, v in vars(recipe.rl).items()}}
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(data))
    out = Path(recipe.rl.out_dir)
    proc = subprocess.Popen([sys.executable, "-m", "rlrouter", "train", str(recipe_path), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    while time.time() < deadline:  # kill once iteration 2 is checkpointed, mid-way through iteration 3
        state = out / "trainer_state" / "state.json"
        if state.is_file() and json.loads(state.read_text())["iteration"] >= 2:
            break
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = json.loads((out / "trainer_state" / "state.json").read_text())["iteration"]
    assert 2 <= done < 4
    resumed = subprocess.run([sys.executable, "-m", "rlrouter", "train", str(recipe_path), "--resume", "--quiet"],
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "iteration 4" in resumed.stdout
    metrics_a = _metrics_without_timing(tmp_path / "a" / "rl-metrics.jsonl")
    metrics_b = _metrics_without_timing(tmp_path / "b" / "rl-metrics.jsonl")
    assert [m["iteration"] for m in metrics_b] == [1, 2, 3, 4]
    assert metrics_b == metrics_a
    weights_a = load_file(tmp_path / "a" / "rl" / "model.safetensors")
    weights_b = load_file(out / "model.safetensors")
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


@pytest.mark.slow
def test_vllm_engine_rollouts_give_the_same_greedy_routes_as_hf_after_a_weight_update(trained, tmp_path):
    recipe, path = trained
    out = tmp_path / "vllm.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "vllm_rl.py"), str(recipe.synth_dir()), str(path),
                           str(tmp_path / "rl"), str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["weights_changed"]  # the update moved the policy
    assert result["vllm_routes"] == result["hf_routes"]
    assert result["routes_changed"]  # ... enough to change greedy routes, so a stale vLLM would differ
    assert result["iteration"]["logprob_gap"] < 1e-3  # vLLM's log-probs are the trainer's


@pytest.mark.slow
def test_report_trains_each_variant_per_seed_and_aggregates_mean_and_spread(trained, tmp_path):
    from rlrouter.evaluate.ablation import run_report

    recipe = rl_recipe(trained, tmp_path, iterations=1, budgets=["none"], tasks_per_iteration=4)
    recipe.eval.budgets = ["none", "large_calls=1"]
    recipe.eval.policies = ["always-small", "always-large"]
    result = run_report(recipe, seeds=[0, 1], variants=["bopo", "grpo+cost"], out_dir=tmp_path / "report", tasks=4,
                        progress=False)
    rows = {(r["policy"], r["budget"]): r for r in result["rows"]}
    for variant in ("bopo", "grpo+cost"):
        row = rows[(variant, "large_calls=1")]
        assert row["seeds"] == 2 and row["budget_violations"] == 0
        assert row["trained_cap"] is False and rows[(variant, "none")]["trained_cap"] is True
        assert row["success_std"] >= 0
    assert ("sft", "none") in rows and ("always-large", "none") in rows
    runs = result["meta"]["runs"]
    assert sorted((r["variant"], r["seed"]) for r in runs) == [("bopo", 0), ("bopo", 1), ("grpo+cost", 0),
                                                               ("grpo+cost", 1)]
    # grpo+cost prices "all large instead of all small" like BoPO's λ, in dollars
    grpo = json.loads((Path(runs[2]["checkpoint"]) / "rlrouter.json").read_text())["rl"]["settings"]
    assert grpo["reward"] == "cost" and grpo["cost_lambda"][0] > recipe.rl.lambda_range()[0]
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| large_calls=1 | bopo | 2 |" in text and (tmp_path / "report" / "report.png").is_file()
