"""RL stage, the parts that train nothing: rewards, the estimator table, the losses, the
config, packing and the feedback tokens (the training runs are in test_rl_training.py)."""

import math

import numpy as np
import pytest
import torch

from rlrouter.rl.advantages import (ESTIMATORS, Episodes, bopo_advantages, explained_variance, gae,
                                    grpo_advantages, tree_advantages)
from rlrouter.rl.config import RLConfig
from rlrouter.rl.loss import clipped_policy_loss, clipped_value_loss, token_logprobs
from rlrouter.rl.rewards import RewardSpec, TaskBoundary, episode_reward, normalized_cost, reference_rewards
from rlrouter.router.episodes import feedback_ids

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


# -- the estimator table: one signature, (Episodes, config) -> (advantages, returns) ------
def two_groups(values=None) -> Episodes:
    # group 0: three rollouts of a task, group 1: two of another (routes: tier per turn)
    return Episodes(rewards=np.array([1.0, 0.0, 0.5, 0.2, 0.6]), group=np.array([0, 0, 0, 1, 1]),
                    routes=[[0, 1], [0, 0, 0], [1], [0, 0], [0, 1]],
                    references=np.array([[0.1, 0.9]] * 3 + [[0.0, 1.0]] * 2), values=values)


def test_every_algorithm_is_an_entry_of_one_estimator_table():
    assert set(ESTIMATORS) == {"grpo", "bopo", "ppo"}
    values = [np.array([0.2, 0.1]), np.zeros(3), np.array([0.4]), np.array([0.3, 0.2]), np.array([0.1, 0.5])]
    for name, estimate in ESTIMATORS.items():
        advantages, returns = estimate(two_groups(values), RLConfig(algorithm=name))
        assert [len(a) for a in advantages] == [2, 3, 1, 2, 2] == [len(r) for r in returns]


def test_grpo_and_bopo_estimators_normalize_within_each_group():
    grpo, _ = ESTIMATORS["grpo"](two_groups(), RLConfig(algorithm="grpo"))
    want = list(grpo_advantages([1.0, 0.0, 0.5])) + list(grpo_advantages([0.2, 0.6]))
    np.testing.assert_allclose([a[0] for a in grpo], want)
    assert all(np.all(a == a[0]) for a in grpo)  # episode credit: every turn the same
    bopo, _ = ESTIMATORS["bopo"](two_groups(), RLConfig(algorithm="bopo", ref_weight_small=0.25,
                                                        ref_weight_large=0.25))
    want = list(bopo_advantages([1.0, 0.0, 0.5], 0.1, 0.9)) + list(bopo_advantages([0.2, 0.6], 0.0, 1.0))
    np.testing.assert_allclose([a[0] for a in bopo], want)


def test_tree_credit_through_the_table_is_tree_advantages_with_each_groups_baseline():
    tree, _ = ESTIMATORS["grpo"](two_groups(), RLConfig(algorithm="grpo", credit="tree"))
    # group 0: root baseline mean 0.5, scale std([1, 0, 0.5]); turn 0: {0, 1} chose small (mean 0.5)
    scale = np.std([1.0, 0.0, 0.5]) + 1e-6
    np.testing.assert_allclose(tree[0], [0.0, 0.5 / scale], atol=1e-9)  # turn 1: node {0, 1}, mean 0.5
    np.testing.assert_allclose(tree[2], [0.0], atol=1e-9)
    want = tree_advantages([[0, 0], [0, 1]], np.array([0.2, 0.6]), 0.4, 0.2)
    np.testing.assert_allclose(tree[3], want[0])
    np.testing.assert_allclose(tree[4], want[1])


def test_ppo_estimator_is_gae_per_episode_then_normalized_over_the_batch():
    values = [np.array([0.2, 0.5, 0.7])]
    episodes = Episodes(np.array([1.0]), np.array([0]), [[0, 0, 1]], values=values)
    advantages, returns = ESTIMATORS["ppo"](episodes, RLConfig(algorithm="ppo", gamma=1.0, gae_lambda=0.5))
    raw = np.array([0.475, 0.35, 0.3])  # test_gae_over_router_turns_matches_the_hand_computation
    np.testing.assert_allclose(advantages[0], (raw - raw.mean()) / (raw.std() + 1e-8))
    np.testing.assert_allclose(returns[0], [0.675, 0.85, 1.0])


def test_clipped_value_loss_matches_the_hand_computation():
    values, old = torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5])
    returns = torch.tensor([0.0, 1.0])
    # value 0: clipped to 0.7: max(1.0, 0.49) = 1.0; value 1: clipped to 0.3: max(1.0, 0.49) = 1.0
    assert float(clipped_value_loss(values, old, returns, 0.2, n_values=4.0)) == pytest.approx(0.5 * 2.0 / 4)
    # inside the clip range the plain squared error counts
    assert float(clipped_value_loss(torch.tensor([0.6]), torch.tensor([0.5]), torch.tensor([1.0]), 0.2, 1.0)) \
        == pytest.approx(0.5 * 0.16)

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
    ("credit", "tree_tail", "rl.credit"),
    ("loss_tokens", "think", "rl.loss_tokens"),
    ("budgets", ["usd=lots"], r"rl.budgets\[0\]"),
])
def test_rl_config_names_the_bad_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        RLConfig(**{field: value})


def test_ppo_takes_episode_credit_only():
    with pytest.raises(ValueError, match="rl.credit: episode"):
        RLConfig(algorithm="ppo", credit="tree")
    assert RLConfig(algorithm="ppo").credit == "episode"


@pytest.mark.parametrize("section,field,where", [
    ("rl", "branches", "λ curve"),
    ("rl", "prompt_cost_weight", "no longer conditioned"),
    ("rl", "eval_every", "rlrouter eval"),
    ("env", "cost_lambda", "rl.cost_lambda"),
])
def test_removed_recipe_fields_say_where_their_meaning_went(section, field, where):
    from rlrouter.config import RecipeError, recipe_from_dict

    with pytest.raises(RecipeError, match=f"{section}: {field} was removed: .*{where}"):
        recipe_from_dict({"name": "x", section: {field: 1}})


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




# -- packing --------------------------------------------------------------------------------
def test_packed_forward_equals_one_plain_forward_per_row(tokenizer):
    from rlrouter.rl.packing import MIN_SHARED_PREFIX, packed_forward
    from rlrouter.router.model import TinyRouterConfig, build_tiny_router

    model = build_tiny_router(tokenizer, TinyRouterConfig(), seed=0).eval()
    prefix = tokenizer("Task: fix the cache layer. Budget: none. Step 1/4. Next: open the file")["input_ids"]
    assert len(prefix) >= MIN_SHARED_PREFIX  # the shared prefix runs once, through the KV cache
    rows = [prefix + tokenizer(text)["input_ids"] for text in ("small large", "ok: done small", "large")]
    keep = 4
    with torch.no_grad():
        logp, entropy, _, _ = packed_forward(model, tokenizer, rows, keep, 1.0, torch.device("cpu"))
        for r, ids in enumerate(rows):
            plain, plain_entropy = token_logprobs(model(input_ids=torch.tensor([ids])).logits, torch.tensor([ids]))
            torch.testing.assert_close(logp[r], plain[0, -(keep - 1):], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(entropy[r], plain_entropy[0, -(keep - 1):], atol=1e-4, rtol=1e-4)


def test_only_sequences_with_a_nonzero_advantage_on_a_loss_token_are_learnable():
    from rlrouter.rl.packing import Batch, learnable

    batch = Batch(loss_mask=[np.array([0, 1, 1.0]), np.array([0, 1, 1.0]), np.array([1, 0, 0.0])])
    batch.advantages = [np.array([0, 0, 0.0]), np.array([0, 0.5, 0.5]), np.array([0, 2.0, 0])]
    assert learnable(batch).tolist() == [False, True, False]  # the third's advantage sits off its loss token
