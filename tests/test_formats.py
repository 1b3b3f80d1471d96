"""Router formats (``RouterFormat``: the route-only turn, the prompt cut), synthesis over
more than two tiers, and the layer freeze, on the tiny router's parts."""

import json
import math

import numpy as np
import pytest
import torch

from envs import Budget, make_routing_env
from rlrouter.boundary.synthesis import cheapest_successful, draw_tier, strata, tier_shares
from rlrouter.config import RecipeError, recipe_from_dict
from rlrouter.router.prompt import (CUT_MARKER, REPLY_LINES, RouteFormatError, RouterFormat, cut_middle,
                                    parse_strict, prompt_token_ids)
from conftest import ListTokenizer, random_policy_views

WORDS = [f"w{i}" for i in range(400)]


@pytest.fixture(scope="module")
def tokenizer():
    from rlrouter.router.model import train_tokenizer

    texts = [" ".join(WORDS[i:i + 40]) for i in range(0, 400, 10)] * 3
    texts += ["<think>ok</think><route>small</route> <route>large</route> Pool: Reply Task: Step 1/3"] * 5
    return train_tokenizer(texts, vocab_size=600)


def test_route_only_turns_parse_strictly_and_match_the_regex():
    import re

    fmt = RouterFormat("route")
    assert fmt.route("large", "ignored") == "<route>large</route>"
    assert fmt.parse("<route>large</route>", ["small", "large"], "small") == (parse_strict(
        "<route>large</route>", ["small", "large"], "route"), True)
    route, ok = fmt.parse("<think>x</think><route>large</route>", ["small", "large"], "small")
    assert not ok and route.tier == "large"  # the think_route shape is a format error here, read tolerantly
    with pytest.raises(RouteFormatError, match="<route>TIER</route>"):
        parse_strict("<think>x</think><route>large</route>", ["small", "large"], "route")
    assert re.fullmatch(fmt.regex(["small", "medium"]), "<route>medium</route>")
    assert not re.fullmatch(fmt.regex(["small"]), "<route>large</route>")
    assert fmt.system([{"name": "small", "usd_per_1m_input": 1, "usd_per_1m_output": 2}]).endswith(REPLY_LINES["route"])


def test_vllm_route_processor_allows_what_the_route_constraint_allows():
    """vLLM's logits processor masks each request as ``RouteConstraint.allowed_next`` does on
    the tokens generated so far: only the canonical spelling of an allowed tier ("medium" is
    8 + 9; "l" + "arge" never), no ``<`` in think text, the route bias at the tier token, and
    requests that did not ask for it untouched; rows follow vLLM's batch moves."""
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

    from rlrouter.router.generation import route_args
    from rlrouter.router.vllm_route import RouteLogitsProcessor

    vocab = ["<|im_end|>", "<think>", "</think>", "<route>", "</route>", "small", "medium", "large", "med", "ium",
             "l", "arge", "<x", "ok"]
    proc = RouteLogitsProcessor(None, torch.device("cpu"), False, tokenizer=ListTokenizer(vocab, {"medium": [8, 9]}))

    def finite(logits, row):
        return torch.isfinite(logits[row]).nonzero().flatten().tolist()

    route_only, think, biased, same_rule = [3], [1, 13], [3], [3, 8]  # the requests' live output ids
    proc.update_state(BatchUpdate(batch_size=5, removed=[], moved=[], added=[
        (0, SamplingParams(extra_args=route_args(["small", "medium"], "route")), None, route_only),
        (1, SamplingParams(extra_args=route_args(["small", "large"], "think_route")), None, think),
        (2, SamplingParams(), None, [5]),
        (3, SamplingParams(extra_args=route_args(["small", "large"], "route", route_bias=3.0)), None, biased),
        (4, SamplingParams(extra_args=route_args(["small", "medium"], "route")), None, same_rule)]))
    assert len(proc.rules) == 3  # requests 0 and 4 share one rule: one batched mask call for both
    logits = torch.zeros(5, len(vocab))
    logits[3, 5], logits[3, 7] = math.log(0.8), math.log(0.2)  # P(small) = 0.8 < sigmoid(3) = 0.95
    out = proc.apply(logits.clone())
    assert finite(out, 0) == [5, 8]  # small, or med(ium); not "medium" as one token, not "l"
    assert finite(out, 1) == [2, 5, 6, 7, 8, 9, 10, 11, 13]  # think text: no "<" but </think>, no end of turn
    assert finite(out, 2) == list(range(len(vocab)))
    assert finite(out, 3) == [7]  # the bias escalates to large
    assert finite(out, 4) == [9]  # after "med", only "ium"
    proc.update_state(BatchUpdate(batch_size=4, removed=[4], moved=[], added=[]))
    route_only.append(8)
    think += [2]
    assert finite(proc.apply(torch.zeros(4, len(vocab))), 0) == [9]
    assert finite(proc.apply(torch.zeros(4, len(vocab))), 1) == [3]
    think.append(3)
    assert finite(proc.apply(torch.zeros(4, len(vocab))), 1) == [5, 7]
    proc.update_state(BatchUpdate(batch_size=3, removed=[2], added=[],
                                  moved=[(0, 1, MoveDirectionality.SWAP)]))
    out = proc.apply(torch.zeros(4, len(vocab)))
    assert finite(out, 1) == [9] and finite(out, 0) == [5, 7] and finite(out, 2) == list(range(len(vocab)))
    with pytest.raises(ValueError, match="rlrouter_route"):
        RouteLogitsProcessor.validate_params(SamplingParams(extra_args={"rlrouter_route": {"allowed": []}}))


def test_route_only_constraint_opens_with_the_route_tag():
    from rlrouter.router.generation import RouteConstraint

    vocab = ["<|im_end|>", "<think>", "</think>", "<route>", "</route>", "small", "medium", "large"]

    proc = RouteConstraint(ListTokenizer(vocab), [["small", "medium"]], prompt_length=1, turn_format="route")
    assert proc.allowed_next(0, []) == [3]
    assert sorted(proc.allowed_next(0, [3])) == [5, 6]  # large is not allowed on this row
    assert proc.allowed_next(0, [3, 6]) == [4]
    assert proc.allowed_next(0, [3, 6, 4]) == [0]


def test_cut_middle_keeps_the_head_and_the_tail_with_a_marker(tokenizer):
    text = " ".join(WORDS[:100])
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    cut = cut_middle(tokenizer, text, drop=60, head_share=0.25)
    keep = len(ids) - 60
    head, tail = tokenizer.decode(ids[:round(keep * 0.25)]), tokenizer.decode(ids[len(ids) - (keep - round(keep * 0.25)):])
    assert cut == head + CUT_MARKER.format(n=60) + tail
    assert cut.startswith("w0 w1") and cut.endswith("w98 w99") and " w30 " not in cut


def test_fit_cuts_the_last_user_message_to_the_limit_and_refuses_a_limit_too_small(tokenizer):
    system = {"role": "system", "content": "Pool: small, large. " + REPLY_LINES["route"]}
    user = {"role": "user", "content": "Task: " + " ".join(WORDS[:300])}
    whole = len(prompt_token_ids(tokenizer, [system, user]))
    fmt = RouterFormat("route", max_prompt_tokens=120, cut_head_share=0.5)
    fitted = fmt.fit(tokenizer, [system, user])
    assert whole > 120 and len(prompt_token_ids(tokenizer, fitted)) <= 120
    assert fitted[0] == system and fitted[1]["content"].startswith("Task: w0") and "tokens cut" in fitted[1]["content"]
    assert fitted[1]["content"].endswith("w299")
    assert fmt.prompt_ids(tokenizer, [[system, user]]) == [prompt_token_ids(tokenizer, fitted)]
    assert RouterFormat("route").fit(tokenizer, [system, user]) == [system, user]  # no limit: unchanged
    long_system = {"role": "system", "content": " ".join(WORDS[:200])}
    with pytest.raises(ValueError, match="max_prompt_tokens = 40 is too small"):
        RouterFormat("route", max_prompt_tokens=40).fit(tokenizer, [long_system, user])


def test_a_synthesized_conversation_becomes_a_route_only_training_example(tokenizer):
    example = [{"role": "system", "content": "Pool: x. " + REPLY_LINES["think_route"]},
               {"role": "user", "content": "Task: " + " ".join(WORDS[:300])},
               {"role": "assistant", "content": "<think>ok; large 2</think><route>large</route>"}]
    out = RouterFormat("route", max_prompt_tokens=100).as_training_example(tokenizer, example)
    assert out[0]["content"] == "Pool: x. " + REPLY_LINES["route"]
    assert out[2] == {"role": "assistant", "content": "<route>large</route>"}
    assert len(prompt_token_ids(tokenizer, out[:2])) <= 100
    assert RouterFormat().as_training_example(tokenizer, example) == example


def test_the_cut_report_counts_the_prompts_cut_and_what_is_left_of_their_step_text(tokenizer):
    system = {"role": "system", "content": "Pool: x. " + REPLY_LINES["think_route"]}
    route = {"role": "assistant", "content": "<think>ok; large 2</think><route>large</route>"}
    long_text, short_text = "Task: " + " ".join(WORDS[:300]), "Task: " + " ".join(WORDS[:5])
    fmt = RouterFormat("route", max_prompt_tokens=100)
    examples = [fmt.as_training_example(tokenizer, [system, {"role": "user", "content": text}, route])
                for text in (long_text, short_text, long_text)]
    report = fmt.cut_report(tokenizer, examples)
    cut_text = examples[0][1]["content"]
    n_cut = int(cut_text.split("[… ")[1].split(" tokens cut")[0])  # the marker's own count
    head, tail = cut_text.split(CUT_MARKER.format(n=n_cut))
    kept = len(tokenizer(head + tail, add_special_tokens=False)["input_ids"])
    assert report == {"max_prompt_tokens": 100, "prompts": 3, "cut": 2, "median_tokens_cut": n_cut,
                      "median_user_tokens_kept": kept}
    # the tokens kept and the tokens cut are the long text's (up to a merge at each seam)
    assert abs(len(tokenizer(long_text, add_special_tokens=False)["input_ids"]) - (kept + n_cut)) <= 2
    assert head.startswith("Task: w0") and tail.endswith("w299") and kept < 100
    assert RouterFormat("route", max_prompt_tokens=400).cut_report(tokenizer, examples[1:2])["cut"] == 0


def test_router_format_round_trips_through_checkpoint_meta_and_rejects_bad_values():
    fmt = RouterFormat("route", 512, 0.3)
    assert RouterFormat.from_meta({"router": {"format": fmt.to_dict()}}) == fmt
    assert RouterFormat.from_meta({"router": {}}) == RouterFormat()  # checkpoints from before formats
    with pytest.raises(ValueError, match="turn_format"):
        RouterFormat("answer")
    with pytest.raises(ValueError, match=">= 32"):
        RouterFormat(max_prompt_tokens=8)


@pytest.mark.parametrize("router, message", [
    ({"turn_format": "json"}, "router.turn_format must be one of"),
    ({"max_prompt_tokens": 256, "prompt_mode": "episode"}, "set router.prompt_mode: step"),
    ({"train_layers": 0}, "router.train_layers must be an integer >= 1"),
    ({"base": "smollm2-135m", "base_layers": 0}, "router.base_layers must be an integer >= 1"),
    ({"base_layers": 2}, "router.base_layers cuts a pretrained base"),
    ({"base": "smollm2-135m", "base_layers": 8, "train_layers": 10}, r"router.train_layers \(10\) exceeds router.base_layers"),
    ({"cut_head_share": 1.5}, "cut_head_share must be in"),
])
def test_recipe_errors_name_the_router_field(router, message):
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict({"name": "x", "router": router})


@pytest.mark.parametrize("synth, message", [
    ({"hard_seeds": 0}, "synth.hard_seeds must be an integer >= 1"),
    ({"hard_repeat": 1.5}, "synth.hard_repeat must be an integer >= 1"),
    ({"hard_labels": "oracle"}, r"synth.hard_labels must be one of \['search', 'hindsight', 'relabel'\]"),
    ({"hard_labels": "hindsight", "hindsight_draws": 0}, "synth.hindsight_draws must be an integer >= 1"),
    ({"hard_labels": "hindsight", "hindsight_tolerance": 1.0}, r"synth.hindsight_tolerance must be a number in \[0, 1\)"),
    ({"hindsight_draws": 4}, "needs synth.hard_labels: hindsight or relabel"),
    ({"hard_labels": "relabel", "relabel_p": 1.5}, r"synth.relabel_p must be a probability in \[0, 1\]"),
])
def test_recipe_errors_name_the_synth_field(synth, message):
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict({"name": "x", "synth": synth})
    ok = recipe_from_dict({"name": "x", "synth": {"hard_seeds": 3}})
    assert (ok.name, ok.synth.hard_seeds, ok.synth.hard_repeat) == ("x", 3, 1)


def test_train_layers_and_lora_exclude_each_other():
    with pytest.raises(RecipeError, match="exclude each other"):
        recipe_from_dict({"name": "x", "router": {"train_layers": 2}, "sft": {"lora": True}})


def test_strata_are_the_simplex_grid_cheapest_first():
    two = strata(2, 4)
    assert [list(s) for s in two] == [[1, 0], [0.75, 0.25], [0.5, 0.5], [0.25, 0.75], [0, 1]]  # BoPO's k/N
    three = strata(3, 2)
    # (N + n - 1 choose n - 1) = 6 points; shares sum to one; the all-cheapest first
    assert len(three) == 6 and all(s.sum() == pytest.approx(1) for s in three)
    assert [list(s) for s in three] == [[1, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 1, 0], [0, 0.5, 0.5], [0, 0, 1]]


def test_draw_tier_gives_the_priciest_tier_the_first_interval():
    shares = np.array([0.5, 0.3, 0.2])
    assert [draw_tier(u, shares) for u in (0.0, 0.19, 0.2, 0.49, 0.5, 0.99)] == [2, 2, 1, 1, 0, 0]
    assert draw_tier(0.3, np.array([0.75, 0.25])) == 0 and draw_tier(0.2, np.array([0.75, 0.25])) == 1


def three_tier_env(tmp_path, best_tier):
    """A replay table where query i is answered by tier ``best_tier[i]`` and every pricier one."""
    path = tmp_path / "t3.jsonl"
    rows = [{"prompt": f"q{i}", "a": best_tier[i % len(best_tier)] <= 0, "b": best_tier[i % len(best_tier)] <= 1,
             "c": True, "a_cost": 0.001, "b_cost": 0.004, "c_cost": 0.02} for i in range(30)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pool = [{"name": n, "usd_per_1m_input": p, "usd_per_1m_output": p, "executor": {"model": m}}
            for n, p, m in (("small", 1, "a"), ("medium", 4, "b"), ("large", 20, "c"))]
    return make_routing_env("replay", pool=pool, world={"source": "table", "table": str(path), "episode_length": 3,
                                                        "success_fraction": 1.0})


def test_three_tier_search_uses_the_middle_tier_where_it_suffices(tmp_path):
    env = three_tier_env(tmp_path, [1, 0, 2, 1, 0])
    for task in ("train-0", "train-1", "train-2"):
        best = cheapest_successful(env, task, Budget(), seed=3, n_strata=3, samples=6)
        # independent reference: each query needs its cheapest correct tier
        rows = env.world.rows_of(task)
        needed = [0 if env.world.table.correct["a"][r] else 1 if env.world.table.correct["b"][r] else 2 for r in rows]
        assert best.success and best.actions == needed, task
        assert best.cost_usd == pytest.approx(sum((0.001, 0.004, 0.02)[t] for t in needed))
    assert tier_shares([{"tier_calls": [1, 2, 0]}, {"tier_calls": [0, 0, 1]}], ["small", "medium", "large"]) == {
        "small": 0.25, "medium": 0.5, "large": 0.25}


def test_freeze_below_trains_only_the_top_layers(tokenizer):
    from rlrouter.router.model import TinyRouterConfig, build_tiny_router, freeze_below

    model = build_tiny_router(tokenizer, TinyRouterConfig(vocab_size=len(tokenizer), num_hidden_layers=3), seed=0)
    total = sum(p.numel() for p in model.parameters())
    assert freeze_below(model, None) == total
    trainable = freeze_below(model, 1)
    top = model.model.layers[2]
    assert trainable == sum(p.numel() for p in top.parameters()) + sum(p.numel() for p in model.model.norm.parameters()) \
        + (0 if model.config.tie_word_embeddings else model.lm_head.weight.numel())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ids = torch.tensor([tokenizer("w1 w2 w3 w4")["input_ids"]])
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith(("model.layers.2.", "model.norm", "lm_head")) for n in changed)
    assert any(n.startswith("model.layers.2.") for n in changed)
    with pytest.raises(ValueError, match="router has 3 layers"):
        freeze_below(model, 4)


def test_sft_trains_in_full_precision_without_recomputation_on_cpu(tmp_path):
    """TRL's own defaults are bf16 autocast and gradient checkpointing; on a CPU the SFT stage
    turns both off (3.8x faster SmolLM2 steps on 2 cores, and the precision the router routes in)."""
    from trl import SFTConfig

    from rlrouter.sft.train import SFTSettings, sft_config

    trl_default = SFTConfig(output_dir=str(tmp_path), use_cpu=True)
    assert trl_default.bf16 and trl_default.gradient_checkpointing  # what the stage must not inherit
    args = sft_config(SFTSettings(epochs=2, batch_size=4), tmp_path, seed=3)
    assert (args.bf16, args.fp16, args.gradient_checkpointing, args.use_cpu) == (False, False, False, True)
    assert (args.num_train_epochs, args.per_device_train_batch_size, args.seed, args.assistant_only_loss) == (2, 4, 3, True)
    assert sft_config(SFTSettings(gradient_checkpointing=True), tmp_path).gradient_checkpointing
    recipe = recipe_from_dict({"name": "x", "sft": {"gradient_checkpointing": True}})
    assert recipe.sft.gradient_checkpointing


def test_keep_first_layers_reads_the_kept_layers_output_and_saves_a_shallower_model(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from rlrouter.router.model import TinyRouterConfig, build_tiny_router, keep_first_layers

    model = build_tiny_router(tokenizer, TinyRouterConfig(vocab_size=len(tokenizer), num_hidden_layers=3), seed=0)
    ids = torch.tensor([tokenizer("w1 w2 w3 w4")["input_ids"]])
    with torch.no_grad():  # the reference: the full model's layer-2 output through its own final norm and head
        hidden = model(ids, output_hidden_states=True).hidden_states[2]
        expected = model.lm_head(model.model.norm(hidden))
    assert keep_first_layers(model, None) is model and len(model.model.layers) == 3
    with pytest.raises(ValueError, match="router.base_layers = 4, but the base has 3 layers"):
        keep_first_layers(model, 4)
    keep_first_layers(model, 2)
    assert len(model.model.layers) == model.config.num_hidden_layers == 2
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, expected, atol=1e-6)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.num_hidden_layers == 2 and len(loaded.config.layer_types) == 2
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, expected, atol=1e-6)


def test_always_tier_names_any_tier_of_a_three_tier_pool():
    from rlrouter.evaluate.baselines import make_baselines

    tiers = [{"name": n, "usd_per_1m_input": p, "usd_per_1m_output": p,
              "executor": {"kind": "simulated", "skill": skill, "output_tokens_mean": 100}}
             for n, p, skill in (("small", 1, 0.5), ("medium", 2, 0.7), ("large", 4, 0.9))]
    recipe = recipe_from_dict({"name": "x", "pool": {"tiers": tiers},
                               "eval": {"policies": ["always-small", "always-medium", "always-large"]}})
    policies = make_baselines(recipe.eval.policies, 3, tiers=recipe.pool.names)
    assert [(p.name, p.tier_index) for p in policies] == [("always-small", 0), ("always-medium", 1),
                                                          ("always-large", 2)]
    with pytest.raises(RecipeError, match="always-TIER with TIER one of"):
        recipe_from_dict({"name": "x", "pool": {"tiers": tiers}, "eval": {"policies": ["always-xl"]}})


@pytest.mark.slow
def test_three_tiers_with_route_only_turns_run_synth_sft_rl_and_evaluation(tmp_path):
    """The whole pipeline on a small three-tier world with route-only turns and a prompt
    cut: the checkpoints carry the format, every turn the router writes is exactly
    ``<route>TIER</route>`` within the cut, and the trained policy acts in Discrete(3)."""
    from conftest import TINY

    from envs import Budget
    from rlrouter.evaluate.router_policy import RouterPolicy
    from rlrouter.pipeline import run_rl_stage, run_sft_stage, run_synth
    from rlrouter.router.checkpoint import load_checkpoint, read_meta

    tiers = [{"name": n, "usd_per_1m_input": p, "usd_per_1m_output": 4 * p,
              "executor": {"kind": "simulated", "skill": skill, "output_tokens_mean": 100}}
             for n, p, skill in (("small", 0.4, 0.55), ("medium", 0.8, 0.74), ("large", 2.0, 0.88))]
    recipe = recipe_from_dict({
        **TINY, "name": "three-route", "pool": {"tiers": tiers},
        "synth": {**TINY["synth"], "out_dir": str(tmp_path / "synth")},
        "sft": {**TINY["sft"], "epochs": 4, "out_dir": str(tmp_path / "sft")},
        "router": {**TINY["router"], "turn_format": "route", "max_prompt_tokens": 200, "max_new_tokens": 8},
        "rl": {"iterations": 2, "tasks": 40, "tasks_per_iteration": 4, "group_size": 4, "save_every": 1,
               "budgets": ["none", "large_calls=2"], "micro_batch_size": 64, "out_dir": str(tmp_path / "rl")},
    })
    report = run_synth(recipe, progress=False)
    shares = json.loads((tmp_path / "synth" / "report.json").read_text())["tier_shares_hard"]
    assert set(shares) == {"small", "medium", "large"} and shares["medium"] > 0, (report, shares)
    sft = run_sft_stage(recipe, progress=False)
    assert read_meta(sft)["router"]["format"] == {"turn_format": "route", "max_prompt_tokens": 200,
                                                  "cut_head_share": 0.5}
    # the cut report in the checkpoint: one entry per decision, cut where the whole prompt was longer
    from datasets import load_from_disk

    from rlrouter.boundary.synthesis import step_examples

    _, sft_tokenizer, _ = load_checkpoint(sft, recipe.pool.names)
    steps = step_examples(load_from_disk(str(tmp_path / "synth" / "dataset")))["messages"]
    system = recipe.router.format().as_training_example(sft_tokenizer, steps[0])[0]
    longer = sum(len(prompt_token_ids(sft_tokenizer, [system, m[1]])) > 200 for m in steps)
    cut = read_meta(sft)["training"]["prompt_cut"]
    assert (cut["max_prompt_tokens"], cut["prompts"], cut["cut"]) == (200, len(steps), longer), cut
    rl = run_rl_stage(recipe, progress=False)
    assert read_meta(rl)["router"]["format"]["turn_format"] == "route"
    model, tokenizer, meta = load_checkpoint(rl, recipe.pool.names)
    policy = RouterPolicy.from_checkpoint(model, tokenizer, meta, recipe, name="rl")
    records = policy.evaluate(lambda: recipe.make_env("test"), recipe.make_env("test").task_ids[:6],
                              [Budget(max_calls={"large": 1})], seed=0, progress=False)
    assert records and not any(r.violation for r in records)
    calls = np.sum([[r.calls.get(t, 0) for t in recipe.pool.names] for r in records], axis=0)
    assert calls.sum() > 0 and calls[2] <= len(records)  # the large cap holds
    assert all(r.extra["well_formed"] == 1.0 for r in records)  # the constraint writes <route>TIER</route>, nothing else

    # served: `rlrouter serve` on the three-tier checkpoint gives transformers' greedy routes
    # for the same env states, and allows exactly the tiers each state's budget can pay for
    import os
    import sys

    import httpx
    import yaml

    from conftest import start_http_server, stop_http_server
    from rlrouter.router.generation import HFEngine
    from rlrouter.router.prompt import step_user_message
    from rlrouter.serve.local_pool import LocalPoolServer, free_port
    from rlrouter.serve.service import route_request

    caps = [{"large": 1}, {"medium": 0}, {"large": 0, "medium": 1}]
    views = random_policy_views(recipe.make_env("test"), [(e, Budget(max_calls=caps[e % 3]), 3) for e in range(6)],
                                seed=3)
    fmt = policy.engine.format
    engine = HFEngine(model, tokenizer, recipe.pool.names, 8, format=fmt)
    system = {"role": "system", "content": fmt.system(recipe.pool.describe())}
    masks = [[t for t, m in zip(recipe.pool.names, v["action_mask"]) if m] for v in views]
    prompts = fmt.prompt_ids(tokenizer, [[system, {"role": "user", "content": step_user_message(v)}] for v in views])
    hf = [fmt.parse(tokenizer.decode(g.ids, skip_special_tokens=True), recipe.pool.names, "small")[0].tier
          for g in engine.generate(prompts, masks)]
    with LocalPoolServer() as pool:
        (tmp_path / "pool.yaml").write_text(yaml.safe_dump({"pool": [
            {"name": t["name"], "base_url": pool.base_url, "model": f"{t['name']}-model",
             "usd_per_1m_input": t["usd_per_1m_input"], "usd_per_1m_output": t["usd_per_1m_output"]} for t in tiers]}))
        port = free_port()
        proc, log = start_http_server([sys.executable, "-m", "rlrouter", "serve", "--checkpoint", str(rl), "--pool",
                                       str(tmp_path / "pool.yaml"), "--port", str(port), "--max-model-len", "1024",
                                       "--enforce-eager"], {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
                                      tmp_path / "serve.log", f"http://127.0.0.1:{port}/health")
        try:
            served = [httpx.post(f"http://127.0.0.1:{port}/v1/route", json=route_request(v), timeout=120).json()
                      for v in views]
        finally:
            stop_http_server(proc, log)
    assert [r["allowed_tiers"] for r in served] == masks
    assert {"small", "medium"} <= {t for m in masks for t in m} and any("large" not in m for m in masks)
    assert [r["tier"] for r in served] == hf
