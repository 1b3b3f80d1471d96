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
