"""The gateway's task ledger: one budget per agent task, kept across that task's requests.

A task is what an agent does from its first request to its last; each request is one step.
The ledger holds, per task id, the budget, what has been spent (settled), the calls per
tier, the steps taken, and the **reservations** of calls in flight:

1. before a request is forwarded, its worst-case cost is *reserved*: the reservation is
   granted only if settled spend + every open reservation + this one fits the budget (and
   the tier's calls cap counts open reservations too), atomically, so concurrent requests
   of one task can never together pass its budget;
2. after the reply, the reservation is *settled* with the real usage (never more than
   reserved: the call's ``max_tokens`` was capped to what the reservation pays for), or
   *released* when the call failed;
3. a reservation that is neither settled nor released within ``reservation_ttl_s`` (its
   gateway process died mid-request) is dropped by the next reserve, so it cannot block the
   task forever; an idle task is forgotten after ``task_ttl_s``.

Money is kept in integer pico-dollars (1e-12 USD; ``Tier.pico_prices``): sums are exact, the
same in every process and in Redis.

Two stores with one behaviour (the tests run one specification on both):
``MemoryLedger`` for one process, ``RedisLedger`` (``server.task_store: redis://…``) for
several gateway replicas behind a load balancer; its reserve / settle are Lua scripts, which
Redis runs atomically.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field

from envs.budget import Budget

PICO = 10 ** 12  # pico-dollars per dollar


def to_pico(usd: float) -> int:
    return int(round(usd * PICO))


class TaskStoreError(RuntimeError):
    """The task store (Redis) cannot be reached or answered with an error."""


@dataclass
class TaskState:
    """A snapshot of one task: settled spend, open reservations, steps."""

    task_id: str
    budget: Budget
    spent_pico: int = 0
    calls: dict[str, int] = field(default_factory=dict)
    reserved_pico: int = 0
    reserved_calls: dict[str, int] = field(default_factory=dict)
    steps: list[dict] = field(default_factory=list)
    outcome: dict | None = None

    @property
    def spent_usd(self) -> float:
        return self.spent_pico / PICO

    def left_pico(self) -> int | None:
        """Dollars (pico) the task may still commit: budget − spent − reserved; None = no usd cap."""
        if self.budget.usd is None:
            return None
        return to_pico(self.budget.usd) - self.spent_pico - self.reserved_pico

    def calls_left(self, tier: str) -> int | None:
        cap = self.budget.max_calls.get(tier)
        if cap is None:
            return None
        return cap - self.calls.get(tier, 0) - self.reserved_calls.get(tier, 0)

    def to_dict(self) -> dict:
        return {"task_id": self.task_id, "budget": self.budget.to_dict(), "spent_usd": self.spent_usd,
                "calls": dict(self.calls), "reserved_usd": self.reserved_pico / PICO,
                "reserved_calls": dict(self.reserved_calls), "steps": list(self.steps), "outcome": self.outcome}


def new_reservation_id() -> str:
    return uuid.uuid4().hex


def _budget_fields(budget: Budget) -> tuple[int, str]:
    """(usd cap in pico, −1 = none; the calls caps as JSON)."""
    return (-1 if budget.usd is None else to_pico(budget.usd)), json.dumps(dict(budget.max_calls), sort_keys=True)


def same_budget(a: Budget, b: Budget) -> bool:
    """Equal as the ledger keeps them (dollars to the pico-dollar): a budget read back from
    the store is the one a later request restates."""
    return _budget_fields(a) == _budget_fields(b)


def _budget_from_fields(usd_pico: int, caps: str) -> Budget:
    return Budget(usd=None if usd_pico < 0 else usd_pico / PICO, max_calls=json.loads(caps))


class MemoryLedger:
    """The ledger in this process's memory (one gateway process). Every operation runs
    without an ``await`` inside, so on one event loop it is atomic."""

    def __init__(self, task_ttl_s: float = 3600.0, reservation_ttl_s: float = 300.0, clock=time.monotonic):
        self.task_ttl_s, self.reservation_ttl_s, self.clock = task_ttl_s, reservation_ttl_s, clock
        self.tasks: dict[str, dict] = {}

    async def connect(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def _live(self, task_id: str) -> dict | None:
        task = self.tasks.get(task_id)
        now = self.clock()
        if task is not None and now - task["touched"] > self.task_ttl_s:
            del self.tasks[task_id]
            return None
        if task is not None:
            task["touched"] = now
            task["reservations"] = {k: r for k, r in task["reservations"].items() if r["deadline"] > now}
        return task

    async def open(self, task_id: str, budget: Budget) -> tuple[TaskState, bool]:
        """The task (created with ``budget`` if it does not exist): (state, created)."""
        task = self._live(task_id)
        created = task is None
        if created:
            usd, caps = _budget_fields(budget)
            self.tasks[task_id] = {"usd": usd, "caps": caps, "spent": 0, "calls": {}, "steps": [], "outcome": None,
                                   "reservations": {}, "settled": set(), "touched": self.clock()}
        return await self.state(task_id), created

    async def state(self, task_id: str, steps: bool = True) -> TaskState | None:
        """The task's snapshot; ``steps=False`` leaves its trace out (cheaper, for budget checks)."""
        task = self._live(task_id)
        if task is None:
            return None
        reserved_calls: dict[str, int] = {}
        for r in task["reservations"].values():
            reserved_calls[r["tier"]] = reserved_calls.get(r["tier"], 0) + 1
        return TaskState(task_id, _budget_from_fields(task["usd"], task["caps"]), task["spent"], dict(task["calls"]),
                         sum(r["pico"] for r in task["reservations"].values()), reserved_calls,
                         [dict(s) for s in task["steps"]] if steps else [], task["outcome"])

    async def reserve(self, task_id: str, reservation_id: str, tier: str, pico: int) -> str:
        """Reserve ``pico`` and one call of ``tier``: "ok", or why not ("usd", "calls", "unknown_task")."""
        task = self._live(task_id)
        if task is None:
            return "unknown_task"
        reserved = sum(r["pico"] for r in task["reservations"].values())
        cap = json.loads(task["caps"]).get(tier)
        if cap is not None:
            open_calls = sum(1 for r in task["reservations"].values() if r["tier"] == tier)
            if task["calls"].get(tier, 0) + open_calls + 1 > cap:
                return "calls"
        if task["usd"] >= 0 and task["spent"] + reserved + pico > task["usd"]:
            return "usd"
        task["reservations"][reservation_id] = {"tier": tier, "pico": pico,
                                                "deadline": self.clock() + self.reservation_ttl_s}
        return "ok"

    async def settle(self, task_id: str, reservation_id: str, tier: str, pico: int, step: dict) -> bool:
        """Close the reservation and charge ``pico`` for one call of ``tier`` (even when the
        reservation had lapsed: the money was spent), once per reservation id. False when
        the task is gone."""
        task = self._live(task_id)
        if task is None:
            return False
        if reservation_id in task["settled"]:
            return True
        task["settled"].add(reservation_id)
        task["reservations"].pop(reservation_id, None)
        task["spent"] += pico
        task["calls"][tier] = task["calls"].get(tier, 0) + 1
        task["steps"].append(dict(step))
        return True

    async def release(self, task_id: str, reservation_id: str) -> None:
        task = self._live(task_id)
        if task is not None:
            task["reservations"].pop(reservation_id, None)

    async def set_outcome(self, task_id: str, outcome: dict) -> bool:
        task = self._live(task_id)
        if task is None:
            return False
        task["outcome"] = dict(outcome)
        return True


# -- Redis: one hash per task (budget, spend, calls), one hash of reservations, one list of steps
# KEYS[1] task hash, KEYS[2] reservations hash, KEYS[3] steps list. Times are Redis's own clock
# (TIME), so replicas with skewed clocks agree on when a reservation lapses.
_NOW_MS = "local t = redis.call('TIME'); local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"
_TOUCH = ("for i = 1, 3 do if redis.call('EXISTS', KEYS[i]) == 1 then "
          "redis.call('PEXPIRE', KEYS[i], ARGV[#ARGV]) end end\n")

RESERVE_LUA = _NOW_MS + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 'unknown_task' end
local rid, tier, pico, ttl_ms = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local reserved, open_calls = 0, 0
local all = redis.call('HGETALL', KEYS[2])
for i = 1, #all, 2 do
  local r_tier, r_pico, r_deadline = string.match(all[i + 1], '^(%S+) (%d+) (%d+)$')
  if tonumber(r_deadline) <= now then redis.call('HDEL', KEYS[2], all[i])
  else
    reserved = reserved + tonumber(r_pico)
    if r_tier == tier then open_calls = open_calls + 1 end
  end
end
local caps = cjson.decode(redis.call('HGET', KEYS[1], 'caps'))
local cap = caps[tier]
if cap ~= nil then
  local made = tonumber(redis.call('HGET', KEYS[1], 'calls:' .. tier) or '0')
  if made + open_calls + 1 > cap then return 'calls' end
end
local usd = tonumber(redis.call('HGET', KEYS[1], 'usd'))
local spent = tonumber(redis.call('HGET', KEYS[1], 'spent'))
if usd >= 0 and spent + reserved + pico > usd then return 'usd' end
redis.call('HSET', KEYS[2], rid, tier .. ' ' .. ARGV[3] .. ' ' .. string.format('%d', now + ttl_ms))
""" + _TOUCH + "return 'ok'"

# A settle is applied once per reservation id (the 'settled:<id>' field), so a retry after a
# lost reply cannot charge twice.
SETTLE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('HSETNX', KEYS[1], 'settled:' .. ARGV[1], 1) == 0 then return 1 end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HINCRBY', KEYS[1], 'spent', ARGV[3])
redis.call('HINCRBY', KEYS[1], 'calls:' .. ARGV[2], 1)
redis.call('RPUSH', KEYS[3], ARGV[4])
""" + _TOUCH + "return 1"

OPEN_LUA = """
local created = 0
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'usd', ARGV[1], 'caps', ARGV[2], 'spent', 0)
  created = 1
end
""" + _TOUCH + "return created"


class RedisLedger:
    """The ledger in Redis, shared by every gateway process that names the same URL.

    Spend and call counters are Redis integers (HINCRBY); a pico-dollar sum stays exact in
    the Lua scripts' doubles up to 2^53 pico-dollars (≈ $9,000 per task)."""

    def __init__(self, url: str, task_ttl_s: float = 3600.0, reservation_ttl_s: float = 300.0,
                 prefix: str = "rlrouter"):
        self.url, self.prefix = url, prefix
        self.task_ttl_ms, self.reservation_ttl_ms = int(task_ttl_s * 1000), int(reservation_ttl_s * 1000)
        self.redis = None

    async def connect(self) -> None:
        """Open the connection and check it answers; ``TaskStoreError`` names the URL and the fix."""
        import redis.asyncio as aioredis

        self.redis = aioredis.from_url(self.url, decode_responses=True, socket_connect_timeout=2, socket_timeout=5)
        try:
            await self.redis.ping()
        except Exception as err:  # noqa: BLE001 - any failure here means the store is not usable
            await self.redis.aclose()
            raise TaskStoreError(f"server.task_store {self._safe_url()} is unreachable ({type(err).__name__}: "
                                 f"{err}); start redis-server there, or set task_store: memory") from None
        self._reserve = self.redis.register_script(RESERVE_LUA)
        self._settle = self.redis.register_script(SETTLE_LUA)
        self._open = self.redis.register_script(OPEN_LUA)

    async def close(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()

    def _safe_url(self) -> str:
        """The URL without a password (it may hold one: redis://:secret@host)."""
        head, sep, tail = self.url.partition("@")
        return f"{head.split('//')[0]}//***@{tail}" if sep else self.url

    def _keys(self, task_id: str) -> list[str]:
        tag = "{" + task_id + "}"  # one hash slot per task on a Redis Cluster
        return [f"{self.prefix}:task:{tag}", f"{self.prefix}:res:{tag}", f"{self.prefix}:steps:{tag}"]

    async def _call(self, coroutine):
        try:
            return await coroutine
        except Exception as err:  # noqa: BLE001
            import redis

            if isinstance(err, redis.RedisError):
                raise TaskStoreError(f"server.task_store {self._safe_url()} failed: {type(err).__name__}: {err}") \
                    from None
            raise

    async def open(self, task_id: str, budget: Budget) -> tuple[TaskState, bool]:
        usd, caps = _budget_fields(budget)
        async with self.redis.pipeline(transaction=True) as pipe:  # one round trip: open, then read
            await self._open(keys=self._keys(task_id), args=[usd, caps, self.task_ttl_ms], client=pipe)
            self._queue_reads(pipe, task_id, steps=True)
            created, *reads = await self._call(pipe.execute())
        return self._parse(task_id, *reads), bool(created)

    async def state(self, task_id: str, steps: bool = True) -> TaskState | None:
        async with self.redis.pipeline(transaction=True) as pipe:
            self._queue_reads(pipe, task_id, steps)
            reads = await self._call(pipe.execute())
        return self._parse(task_id, *reads) if steps else self._parse(task_id, reads[0], reads[1], [], reads[2])

    def _queue_reads(self, pipe, task_id: str, steps: bool) -> None:
        task_key, res_key, steps_key = self._keys(task_id)
        pipe.hgetall(task_key).hgetall(res_key)
        if steps:
            pipe.lrange(steps_key, 0, -1)
        pipe.time()

    def _parse(self, task_id: str, task: dict, reservations: dict, steps: list, now) -> TaskState | None:
        if not task:
            return None
        now_ms = int(now[0]) * 1000 + int(now[1]) // 1000
        reserved_pico, reserved_calls = 0, {}
        for raw in reservations.values():
            tier, pico, deadline = raw.split(" ")
            if int(deadline) > now_ms:
                reserved_pico += int(pico)
                reserved_calls[tier] = reserved_calls.get(tier, 0) + 1
        calls = {k[len("calls:"):]: int(v) for k, v in task.items() if k.startswith("calls:")}
        return TaskState(task_id, _budget_from_fields(int(task["usd"]), task["caps"]), int(task["spent"]), calls,
                         reserved_pico, reserved_calls, [json.loads(s) for s in steps],
                         json.loads(task["outcome"]) if task.get("outcome") else None)

    async def reserve(self, task_id: str, reservation_id: str, tier: str, pico: int) -> str:
        return await self._call(self._reserve(keys=self._keys(task_id),
                                              args=[reservation_id, tier, int(pico), self.reservation_ttl_ms,
                                                    self.task_ttl_ms]))

    async def settle(self, task_id: str, reservation_id: str, tier: str, pico: int, step: dict) -> bool:
        done = await self._call(self._settle(keys=self._keys(task_id),
                                             args=[reservation_id, tier, int(pico), json.dumps(step),
                                                   self.task_ttl_ms]))
        return bool(done)

    async def release(self, task_id: str, reservation_id: str) -> None:
        await self._call(self.redis.hdel(self._keys(task_id)[1], reservation_id))

    async def set_outcome(self, task_id: str, outcome: dict) -> bool:
        task_key = self._keys(task_id)[0]
        if not await self._call(self.redis.exists(task_key)):
            return False
        await self._call(self.redis.hset(task_key, "outcome", json.dumps(outcome)))
        return True


def make_ledger(task_store: str, task_ttl_s: float, reservation_ttl_s: float):
    if task_store == "memory":
        return MemoryLedger(task_ttl_s, reservation_ttl_s)
    return RedisLedger(task_store, task_ttl_s, reservation_ttl_s)


async def settle_with_retries(ledger, attempts: int, *args) -> bool | None:
    """``ledger.settle`` retried on a store error (safe: a settle applies once per
    reservation id). None = the store stayed down; the reservation then holds the worst case
    until it lapses."""
    for k in range(attempts):
        try:
            return await ledger.settle(*args)
        except TaskStoreError:
            if k == attempts - 1:
                return None
            await asyncio.sleep(0.05 * 2 ** k)
    return None
