"""A small OpenAI-compatible chat server that stands in for the pool's paid model APIs
where none can run (tests, benchmarks, trying ``rlrouter serve`` on a laptop).

It speaks the real protocol over real HTTP: ``POST /v1/chat/completions`` answers with a
deterministic reply per model, honours ``max_tokens`` (``finish_reason: "length"``), and
reports ``usage`` (prompt tokens ≈ UTF-8 bytes / 4 + 4 per message; one completion token
per word). It can be told to misbehave: ``POST /control`` with
``{"model": "m", "mode": "500" | "429" | "timeout" | "ok", "count": n}`` fails the next n
calls to ``m`` (n = -1: all of them), ``{"model": "m", "reply": text}`` makes ``m`` answer
``text`` (``null``: back to its own words), and ``delay_s`` adds network latency to every call.
``GET /ledger`` lists every call it answered (model, tokens, status): an account of what
was spent that is independent of the router's own.

    python -m rlrouter.serve.local_pool --port 8001 [--api-key-env POOL_KEY] [--delay-s 0.2]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import os
import socket
import threading
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

WORDS = ("the plan checks each step and returns a short answer with the result of the work so far "
         "then it lists what remains and why").split()


def reply_words(model: str, prompt: str, n: int = 48) -> list[str]:
    seed = int(hashlib.sha256(f"{model}\n{prompt}".encode()).hexdigest(), 16)
    return [f"[{model}]"] + [WORDS[(seed >> (3 * i)) % len(WORDS)] for i in range(n - 1)]


def create_pool_app(api_key: str | None = None, delay_s: float = 0.0) -> FastAPI:
    app = FastAPI(title="rlrouter local pool")
    app.state.faults = {}  # model -> [mode, remaining count]
    app.state.replies = {}  # model -> fixed reply text
    app.state.ledger = []
    app.state.delay_s = delay_s

    @app.post("/control")
    async def control(request: Request):
        body = await request.json()
        if "delay_s" in body:
            app.state.delay_s = float(body["delay_s"])
        if "model" in body and "reply" in body:
            app.state.replies[body["model"]] = body["reply"]
        elif "model" in body:
            app.state.faults[body["model"]] = [body.get("mode", "ok"), int(body.get("count", -1))]
        if body.get("reset_ledger"):
            app.state.ledger.clear()
        return {"ok": True}

    @app.get("/ledger")
    async def ledger():
        return {"calls": app.state.ledger}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        if api_key is not None:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return JSONResponse({"error": {"message": "invalid API key", "type": "authentication_error"}}, 401)
        body = await request.json()
        model = str(body.get("model", ""))
        if app.state.delay_s:
            await asyncio.sleep(app.state.delay_s)
        mode, remaining = app.state.faults.get(model, ["ok", 0])
        if mode != "ok" and remaining != 0:
            app.state.faults[model][1] = remaining - 1 if remaining > 0 else -1
            app.state.ledger.append({"model": model, "status": mode if mode == "timeout" else int(mode)})
            if mode == "timeout":
                await asyncio.sleep(30)
            status = int(mode)
            headers = {"Retry-After": "0.05"} if status == 429 else {}
            return JSONResponse({"error": {"message": f"injected {status}", "type": "server_error"}}, status,
                                headers=headers)
        messages = body.get("messages") or []
        prompt = "\n".join(str(m.get("content", "")) for m in messages)
        fixed = app.state.replies.get(model)
        words = fixed.split(" ") if fixed else reply_words(model, prompt)
        max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or len(words))
        finish = "length" if max_tokens < len(words) else "stop"
        words = words[:max_tokens]
        usage = {"prompt_tokens": len(prompt.encode()) // 4 + 4 * len(messages), "completion_tokens": len(words)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        app.state.ledger.append({"model": model, "status": 200, **usage})
        return {"id": f"cmpl-{len(app.state.ledger)}", "object": "chat.completion", "created": int(time.time()),
                "model": model, "choices": [{"index": 0, "message": {"role": "assistant", "content": " ".join(words)},
                                             "finish_reason": finish}], "usage": usage}

    return app


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalPoolServer:
    """Runs the app with uvicorn in a background thread on 127.0.0.1 (tests, benchmarks)."""

    def __init__(self, port: int = 0, api_key: str | None = None, delay_s: float = 0.0):
        import uvicorn

        self.port = port or free_port()
        self.app = create_pool_app(api_key, delay_s)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                                   timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> "LocalPoolServer":
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("local pool server did not start in 30 s")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--api-key-env", help="require 'Authorization: Bearer $VAR' from clients")
    parser.add_argument("--delay-s", type=float, default=0.0, help="latency added to every call")
    args = parser.parse_args()
    key = os.environ.get(args.api_key_env) if args.api_key_env else None
    uvicorn.run(create_pool_app(key, args.delay_s), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
