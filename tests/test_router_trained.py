"""Router LLM on the session's trained tiny router (slow): batched prompts, checkpoints,
constrained decoding, budgeted episodes, vLLM, evaluation beside the baselines, SFT resume
and LoRA."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from envs import Budget, make_routing_env
from rlrouter.evaluate.router_policy import RouterPolicy
from rlrouter.router.checkpoint import CheckpointError, load_checkpoint, read_meta, save_checkpoint
from rlrouter.router.prompt import batch_prompt_token_ids, first_user_message, system_message
from conftest import TINY, greedy_turns

ROOT = Path(__file__).resolve().parents[1]


def first_turns(n: int) -> list[list[dict]]:
    """The router's first chat of test tasks 0..n-1 (system + first user turn)."""
    env = make_routing_env("synthetic", world={"n_test": 10}, split="test")
    convs = []
    for i in range(n):
        env.reset(seed=i, options={"task_id": f"test-{i}"})
        convs.append([{"role": "system", "content": system_message(env.pool.describe())},
                      {"role": "user", "content": first_user_message(env.view())}])
    return convs



@pytest.mark.slow
def test_batched_prompt_ids_equal_each_prompt_tokenized_alone(trained):
    _, path = trained
    _, tokenizer, _ = load_checkpoint(path)
    convs = first_turns(5)
    convs[2] = [convs[2][0], {"role": "user", "content": "short"}]  # rows of different lengths: no padding
    alone = [tokenizer(tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False),
                       add_special_tokens=False)["input_ids"] for c in convs]
    assert batch_prompt_token_ids(tokenizer, convs) == alone
    assert len({len(ids) for ids in alone}) > 1
    assert batch_prompt_token_ids(tokenizer, []) == []


@pytest.mark.slow
def test_checkpoint_round_trip_gives_identical_generations(trained, tmp_path):
    recipe, path = trained
    model, tokenizer, meta = load_checkpoint(path, recipe.pool.names)
    assert meta["pool"][1]["name"] == "large" and meta["training"]["stage"] == "sft"
    assert (path / "trainer_state" / "optimizer.pt").is_file()
    copy = save_checkpoint(model, tokenizer, tmp_path / "copy", {"pool": meta["pool"], "training": meta["training"]})
    model2, tokenizer2, _ = load_checkpoint(copy)
    convs = first_turns(4)
    masks = [np.array([1, 1], dtype=np.int8)] * 4
    a = greedy_turns(model, tokenizer, recipe.pool.names, convs, masks)
    b = greedy_turns(model2, tokenizer2, recipe.pool.names, convs, masks)
    assert a == b


@pytest.mark.slow
def test_constrained_decoding_never_generates_a_masked_tier(trained):
    recipe, path = trained
    model, tokenizer, _ = load_checkpoint(path)
    conv = first_turns(1)[0]
    def eager(mask):  # wants large at any price
        return greedy_turns(model, tokenizer, recipe.pool.names, [conv] * 3, [np.array(mask, dtype=np.int8)] * 3,
                            route_bias=50.0)

    assert [tier for _, tier in eager([1, 1])] == ["large"] * 3
    assert [tier for _, tier in eager([1, 0])] == ["small"] * 3
    assert all("<route>small</route>" in text for text, _ in eager([1, 0]))


@pytest.mark.slow
def test_damaged_checkpoints_give_clear_errors(trained, tmp_path):
    recipe, path = trained
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    (broken / "rlrouter.json").unlink()
    with pytest.raises(CheckpointError, match="rlrouter.json is missing"):
        read_meta(broken)
    (broken / "rlrouter.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_meta(broken)
    (broken / "rlrouter.json").write_text(json.dumps({"prompt_format_version": 99, "pool": [{"name": "a"}]}))
    with pytest.raises(CheckpointError, match="prompt format version 99"):
        read_meta(broken)
    with pytest.raises(CheckpointError, match="routes to tiers"):
        load_checkpoint(path, ["cheap", "pricey"])
    (broken / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        read_meta(broken)


@pytest.mark.slow
def test_router_plays_budgeted_episodes_without_violations(trained):
    recipe, path = trained
    model, tokenizer, _ = load_checkpoint(path)
    world = recipe.build_world()
    policy = RouterPolicy(model, tokenizer, recipe.pool.names, batch_size=16, route_bias=2.0)
    budgets = [Budget(max_calls={"large": 1}), Budget(usd=0.01)]
    records = policy.evaluate(lambda: recipe.make_env("test", world=world), [f"test-{i}" for i in range(8)],
                              budgets, seed=0, progress=False)
    assert len(records) == 16
    assert not any(r.violation for r in records)
    assert all(r.calls.get("large", 0) <= 1 for r in records if r.budget == "large_calls=1")
    assert all(r.cost_usd <= 0.01 for r in records if r.budget == "usd=0.01")


@pytest.mark.slow
def test_vllm_engine_gives_the_same_greedy_routes_as_transformers(trained, vllm_openai_server):
    import httpx

    recipe, path = trained
    model, tokenizer, _ = load_checkpoint(path)
    convs = first_turns(8)
    prompts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in convs]
    hf = greedy_turns(model, tokenizer, recipe.pool.names, convs, [np.array([1, 1], dtype=np.int8)] * len(convs),
                      constrain=False)
    reply = httpx.post(f"{vllm_openai_server['base_url']}/completions", timeout=300,
                       headers={"Authorization": f"Bearer {vllm_openai_server['api_key']}"},
                       json={"model": vllm_openai_server["model"], "prompt": prompts, "max_tokens": 32,
                             "temperature": 0.0})
    assert reply.status_code == 200, reply.text
    texts = [c["text"] for c in sorted(reply.json()["choices"], key=lambda c: c["index"])]
    from rlrouter.router.prompt import parse_tolerant

    vllm_routes = [parse_tolerant(t, recipe.pool.names, "none").tier for t in texts]
    assert vllm_routes == [tier for _, tier in hf]
    assert sum(t == text for t, (text, _) in zip(texts, hf)) >= len(hf) - 1  # same text, allowing one fp tie


@pytest.mark.slow
def test_eval_with_a_checkpoint_reports_the_router_beside_the_baselines(trained, tmp_path):
    from rlrouter.evaluate.job import eval_recipe

    recipe, path = copy.deepcopy(trained[0]), trained[1]
    recipe.eval.router_bias = [0.0, 2.0]
    result = eval_recipe(recipe, budgets=[Budget(max_calls={"large": 1})], tasks=4, out_dir=tmp_path,
                         policies=["always-small", "oracle"], checkpoint=path, progress=False)
    rows = {(r["policy"], r["budget"]): r for r in result["rows"]}
    for name in ("router", "router(bias=2)"):
        row = rows[(name, "large_calls=1")]
        assert row["episodes"] == 4 and row["budget_violations"] == 0
        assert 0.0 <= row["well_formed"] <= 1.0
    assert "| large_calls=1 | router(bias=2) |" in (tmp_path / "results.md").read_text()


@pytest.mark.slow
def test_eval_on_vllm_refuses_a_checkpoint_vllm_cannot_load_before_any_episode(trained, tmp_path, monkeypatch):
    """``eval.engine: vllm`` checks vLLM and every checkpoint's architecture before the first
    episode (the engines start one at a time, after the baselines): the errors name the field,
    the checkpoint and the fix, and nothing is written."""
    import shutil
    import sys

    from rlrouter.evaluate.job import eval_recipe

    recipe = copy.deepcopy(trained[0])
    recipe.eval.engine = "vllm"
    odd = tmp_path / "odd"
    shutil.copytree(trained[1], odd)
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchRouterForCausalLM"]}))
    with pytest.raises(ValueError, match=r"eval.engine is 'vllm' but vLLM has no model for checkpoint 'bopo' "
                                         r".*NoSuchRouterForCausalLM.*set eval.engine: hf"):
        eval_recipe(recipe, tasks=2, out_dir=tmp_path / "out", policies=["always-small"],
                    checkpoint={"sft": trained[1], "bopo": odd}, progress=False)
    monkeypatch.setitem(sys.modules, "vllm.model_executor.models", None)  # as if vLLM were not installed
    with pytest.raises(ValueError, match="vLLM is not installed: install it .* or set eval.engine: hf"):
        eval_recipe(recipe, tasks=2, out_dir=tmp_path / "out", policies=["always-small"], checkpoint=trained[1],
                    progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_sft_resumes_from_the_checkpoint_trainer_state(trained, tmp_path):
    import shutil

    from rlrouter.pipeline import run_sft_stage

    recipe, path = copy.deepcopy(trained[0]), trained[1]
    resumed = tmp_path / "sft"
    shutil.copytree(path, resumed)
    before = json.loads((resumed / "rlrouter.json").read_text())["training"]["global_step"]
    recipe.sft.epochs = TINY["sft"]["epochs"] + 1  # one more epoch than was trained
    out = run_sft_stage(recipe, out_dir=resumed, resume=True, progress=False)
    after = json.loads((out / "rlrouter.json").read_text())["training"]["global_step"]
    steps_per_epoch = before // TINY["sft"]["epochs"]
    assert after == before + steps_per_epoch  # continued, not restarted


@pytest.mark.slow
def test_lora_sft_saves_a_merged_model_that_loads_as_is(trained, tmp_path):
    from rlrouter.pipeline import run_sft_stage

    recipe = copy.deepcopy(trained[0])
    recipe.sft.lora, recipe.sft.epochs = True, 1
    out = run_sft_stage(recipe, out_dir=tmp_path / "lora", progress=False)
    model, _, _ = load_checkpoint(out)
    assert not any("lora" in name for name, _ in model.named_parameters())
