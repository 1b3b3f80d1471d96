"""Serve a trained router with vLLM behind an OpenAI-compatible API (``rlrouter serve``).

- ``config``: the pool config (``pool.yaml``): endpoints, prices, limits, key variable names
- ``service``: step routing and the think/route/answer chat loop, with budget arithmetic (the
  router decodes on ``rlrouter.router.generation.AsyncRouterEngine``)
- ``pool_client``: calls to the pool's models with retries, backoff and cost from ``usage``
- ``gateway``: gateway mode: each request of an unmodified agent is one step of a task,
  routed under the task's budget and forwarded verbatim
- ``ledger``: the tasks' budgets across requests (reserve, settle), in memory or in Redis
- ``app``: the FastAPI app (OpenAI-shaped requests, responses and errors, SSE, metrics)
- ``local_pool``: a small OpenAI-compatible server to try the router without model servers
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from rlrouter.router.prompt import HISTORY_WINDOW


def serve(checkpoint: str | Path, pool_path: str | Path, host: str = "127.0.0.1", port: int = 8000,
          max_model_len: int = 2048, gpu_memory_utilization: float = 0.5, dtype: str = "auto",
          log_level: str = "info", enforce_eager: bool = False) -> None:
    """Check everything a user can get wrong first, then start the engine and the server."""
    import uvicorn

    from rlrouter.router.checkpoint import read_meta
    from rlrouter.serve.app import create_app
    from rlrouter.serve.config import load_serve_config
    from rlrouter.serve.service import pool_descriptors

    meta = read_meta(checkpoint)
    config = load_serve_config(pool_path)
    descriptors = pool_descriptors(config, meta)
    missing = [f"{where} names {name} but it is not set" for where, name in
               [("server.api_key_env", config.api_key_env)] +
               [(f"pool tier {tier}.api_key_env", e.api_key_env) for tier, e in config.endpoints.items()]
               if name and not os.environ.get(name)]
    if missing:
        raise ValueError(f"{pool_path}: " + "; ".join(missing) + " (export it, or remove api_key_env)")
    if config.task_store != "memory":
        check_task_store(config, pool_path)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if meta.get("router", {}).get("prompt_mode") == "episode":
        logging.getLogger("rlrouter.serve").warning(
            "%s was trained on episode prompts; /v1/route sends it the step prompt (one chat per decision), "
            "which it has not seen in training", checkpoint)
    engine_kwargs = {"max_model_len": max_model_len, "gpu_memory_utilization": gpu_memory_utilization,
                     "dtype": dtype, "enforce_eager": enforce_eager}
    window = meta.get("router", {}).get("history_window", HISTORY_WINDOW)
    app = create_app(config, service_factory(checkpoint, config, descriptors, engine_kwargs, window))
    uvicorn.run(app, host=host, port=port, log_level=log_level)


def check_task_store(config, pool_path) -> None:
    """Redis must answer before the engine starts (a clear error, not a failed startup)."""
    import asyncio

    from rlrouter.serve.ledger import RedisLedger, TaskStoreError

    async def ping():
        ledger = RedisLedger(config.task_store)
        await ledger.connect()
        await ledger.close()

    try:
        asyncio.run(ping())
    except TaskStoreError as err:
        raise ValueError(f"{pool_path}: {err}") from None


def service_factory(checkpoint, config, descriptors, engine_kwargs, history_window: int = HISTORY_WINDOW):
    async def build(metrics):
        from transformers import AutoTokenizer

        from rlrouter.router.generation import AsyncRouterEngine
        from rlrouter.serve.pool_client import PoolClient
        from rlrouter.serve.service import RouterService

        from rlrouter.router.checkpoint import read_meta
        from rlrouter.router.prompt import RouterFormat

        engine = AsyncRouterEngine(checkpoint, **engine_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        return RouterService(engine, tokenizer, config, PoolClient(config, metrics), metrics, descriptors,
                             history_window, RouterFormat.from_meta(read_meta(checkpoint)))

    return build
