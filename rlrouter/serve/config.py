"""The serving configuration (``pool.yaml``): the pool's model endpoints and the server's
limits, validated up front with errors that name the field and the fix.

```yaml
pool:                                  # the tiers the router may route to
  - name: small                        # must be a tier of the checkpoint's pool
    base_url: http://127.0.0.1:8001/v1 # any OpenAI-compatible endpoint (vLLM, a hosted API)
    model: Qwen/Qwen2.5-0.5B-Instruct
    usd_per_1m_input: 0.40
    usd_per_1m_output: 1.60
    usd_per_1m_cached_input: 0.10      # optional: the price of prompt tokens served from cache
    api_key_env: SMALL_API_KEY         # optional: the key is read from this env variable
    timeout_s: 30                      # optional
    max_retries: 2                     # optional: retries after a timeout, 429 or 5xx
  - name: large
    ...
server:                                # all optional
  api_key_env: RLROUTER_API_KEY        # clients must send "Authorization: Bearer <key>"
  default_budget: {usd: 0.05, large_calls: 3}
  max_turns: 4                         # router turns per chat request
  min_routes: 1                        # routes before the router may answer
  max_tokens: 512                      # a pool call's output tokens, at most
  router_max_tokens: 128               # one router turn's tokens, at most
  # gateway mode (model "rlrouter/auto"): one request = one step of an agent's task
  gateway_model: rlrouter/auto         # the model name that selects gateway mode
  task_store: memory                   # or redis://127.0.0.1:6379/0 to share budgets across replicas
  task_ttl_s: 3600                     # a task idle this long is forgotten
  reservation_ttl_s: 300               # a reservation not settled by then is dropped (a dead replica)
  tools_overhead_tokens: 256           # prompt tokens a chat template may add for a request's tools
  traffic_log: runs/gateway/traffic.jsonl  # optional: one JSON line per step and per posted outcome
```
Secrets never appear in this file: only the *names* of the environment variables that
hold them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from envs.budget import Budget
from envs.pool import Pool, Tier

TIER_FIELDS = {"name", "base_url", "model", "usd_per_1m_input", "usd_per_1m_output", "usd_per_1m_cached_input",
               "descriptor", "api_key_env", "timeout_s", "max_retries"}
SERVER_FIELDS = {"api_key_env", "default_budget", "max_turns", "min_routes", "max_tokens", "router_max_tokens",
                 "retry_backoff_s", "input_overhead_tokens", "served_model_name", "gateway_model", "task_store",
                 "task_ttl_s", "reservation_ttl_s", "tools_overhead_tokens", "traffic_log"}


@dataclass(frozen=True)
class Endpoint:
    """Where a tier's model answers: an OpenAI-compatible ``/chat/completions``."""

    base_url: str
    model: str
    api_key_env: str | None = None
    timeout_s: float = 30.0
    max_retries: int = 2  # the key (api_key_env) is read at call time by envs.openai_client, never stored


@dataclass(frozen=True)
class ServeConfig:
    pool: Pool
    endpoints: dict[str, Endpoint]
    api_key_env: str | None = None
    default_budget: Budget = field(default_factory=Budget)
    max_turns: int = 4
    min_routes: int = 1
    max_tokens: int = 512
    router_max_tokens: int = 128
    retry_backoff_s: float = 0.2
    # Upper bound on the tokens a chat template adds around each message (role markers,
    # special tokens): the worst-case input of a pool call is its UTF-8 bytes plus this.
    input_overhead_tokens: int = 16
    served_model_name: str = "rlrouter"
    gateway_model: str = "rlrouter/auto"
    task_store: str = "memory"  # "memory" (one process) or a redis:// URL (replicas share budgets)
    task_ttl_s: float = 3600.0
    reservation_ttl_s: float = 300.0
    tools_overhead_tokens: int = 256
    traffic_log: str | None = None

    def server_api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None


def load_serve_config(path: str | Path) -> ServeConfig:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"pool config {path} not found; see recipes/serve/pool.yaml for an example")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"pool config {path} is not valid YAML: {err}") from None
    return serve_config_from_dict(data, where=str(path))


def serve_config_from_dict(data: Any, where: str = "pool config") -> ServeConfig:
    if not isinstance(data, Mapping) or "pool" not in data:
        raise ValueError(f"{where}: expected a mapping with a 'pool:' list of tiers (and an optional 'server:')")
    unknown = set(data) - {"pool", "server"}
    if unknown:
        raise ValueError(f"{where}: unknown section(s) {sorted(unknown)}; allowed: pool, server")
    entries = data["pool"]
    if not isinstance(entries, list) or len(entries) < 2:
        raise ValueError(f"{where}: pool must list at least two tiers")
    tiers, endpoints = [], {}
    for i, entry in enumerate(entries):
        at = f"{where}: pool[{i}]"
        if not isinstance(entry, Mapping):
            raise ValueError(f"{at} must be a mapping")
        unknown = set(entry) - TIER_FIELDS
        if unknown:
            raise ValueError(f"{at}: unknown field(s) {sorted(unknown)}; allowed: {sorted(TIER_FIELDS)}")
        missing = {"name", "base_url", "model", "usd_per_1m_input", "usd_per_1m_output"} - set(entry)
        if missing:
            raise ValueError(f"{at}: missing field(s) {sorted(missing)}")
        if not str(entry["base_url"]).startswith(("http://", "https://")):
            raise ValueError(f"{at}.base_url must start with http:// or https://, got {entry['base_url']!r}")
        _check_env_name(entry.get("api_key_env"), f"{at}.api_key_env")
        try:
            cached = entry.get("usd_per_1m_cached_input")
            tiers.append(Tier(entry["name"], float(entry["usd_per_1m_input"]), float(entry["usd_per_1m_output"]),
                              entry.get("descriptor", ""),
                              usd_per_1m_cached_input=None if cached is None else float(cached)))
            endpoints[entry["name"]] = Endpoint(
                str(entry["base_url"]).rstrip("/"), str(entry["model"]), entry.get("api_key_env"),
                _positive(entry.get("timeout_s", 30.0), f"{at}.timeout_s"),
                _count(entry.get("max_retries", 2), f"{at}.max_retries", minimum=0))
        except ValueError as err:
            raise ValueError(err if str(err).startswith(where) else f"{at}: {err}") from None
    try:
        pool = Pool(tuple(tiers))
    except ValueError as err:
        raise ValueError(f"{where}: pool: {err}") from None
    server = data.get("server") or {}
    if not isinstance(server, Mapping):
        raise ValueError(f"{where}: server must be a mapping")
    unknown = set(server) - SERVER_FIELDS
    if unknown:
        raise ValueError(f"{where}: server: unknown field(s) {sorted(unknown)}; allowed: {sorted(SERVER_FIELDS)}")
    _check_env_name(server.get("api_key_env"), f"{where}: server.api_key_env")
    budget = Budget.from_dict(server.get("default_budget"), where=f"{where}: server.default_budget")
    try:
        budget.check_tiers(pool)
    except ValueError as err:
        raise ValueError(f"{where}: server.default_budget: {err}") from None
    config = ServeConfig(
        pool=pool, endpoints=endpoints, api_key_env=server.get("api_key_env"), default_budget=budget,
        max_turns=_count(server.get("max_turns", 4), f"{where}: server.max_turns"),
        min_routes=_count(server.get("min_routes", 1), f"{where}: server.min_routes", minimum=0),
        max_tokens=_count(server.get("max_tokens", 512), f"{where}: server.max_tokens"),
        router_max_tokens=_count(server.get("router_max_tokens", 128), f"{where}: server.router_max_tokens"),
        retry_backoff_s=float(server.get("retry_backoff_s", 0.2)),
        input_overhead_tokens=_count(server.get("input_overhead_tokens", 16), f"{where}: server.input_overhead_tokens",
                                     minimum=0),
        served_model_name=str(server.get("served_model_name", "rlrouter")),
        gateway_model=str(server.get("gateway_model", "rlrouter/auto")),
        task_store=_task_store(server.get("task_store", "memory"), f"{where}: server.task_store"),
        task_ttl_s=_positive(server.get("task_ttl_s", 3600.0), f"{where}: server.task_ttl_s"),
        reservation_ttl_s=_positive(server.get("reservation_ttl_s", 300.0), f"{where}: server.reservation_ttl_s"),
        tools_overhead_tokens=_count(server.get("tools_overhead_tokens", 256), f"{where}: server.tools_overhead_tokens",
                                     minimum=0),
        traffic_log=None if server.get("traffic_log") is None else str(server["traffic_log"]),
    )
    if config.gateway_model == config.served_model_name:
        raise ValueError(f"{where}: server.gateway_model and server.served_model_name are both "
                         f"{config.gateway_model!r}; the model name is what tells gateway steps from chat requests")
    slowest = max(e.timeout_s * (e.max_retries + 1) for e in endpoints.values())
    if config.reservation_ttl_s <= slowest:
        raise ValueError(f"{where}: server.reservation_ttl_s ({config.reservation_ttl_s:g}) must exceed the slowest "
                         f"tier's timeout_s x (max_retries + 1) = {slowest:g} s, or a reservation could lapse while "
                         "its call is still running")
    if config.min_routes > config.max_turns:
        raise ValueError(f"{where}: server.min_routes ({config.min_routes}) exceeds server.max_turns "
                         f"({config.max_turns})")
    return config


def _task_store(value: Any, where: str) -> str:
    if value == "memory" or (isinstance(value, str) and value.startswith(("redis://", "rediss://", "unix://"))):
        return value
    raise ValueError(f"{where} must be 'memory' or a Redis URL like redis://127.0.0.1:6379/0, got {value!r}")


def _check_env_name(value: Any, where: str) -> None:
    """An ``api_key_env`` must be a variable *name*; the message never echoes the value,
    which may be a key pasted by mistake."""
    if value is not None and not (isinstance(value, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value)):
        raise ValueError(f"{where} must name an environment variable (e.g. SMALL_API_KEY) that holds the key, "
                         "never the key itself")


def _count(value: Any, where: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{where} must be an integer >= {minimum}, got {value!r}")
    return value


def _positive(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{where} must be a positive number of seconds, got {value!r}")
    return float(value)
