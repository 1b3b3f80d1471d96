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

For agents: a request with ``tools`` is answered with a call to its first tool (arguments
made from the tool's JSON schema) until the conversation holds ``tool_rounds`` tool results
(default 2; ``/control`` ``{"tool_rounds": n}``), then with text. ``stream: true`` answers
in SSE chunks as OpenAI does (``stream_options.include_usage`` adds the usage chunk).
``/control`` ``{"prompt_cache": true}`` reports ``usage.prompt_tokens_details.cached_tokens``
as a provider's prompt cache would: the tokens of the longest prefix this model has seen in
an earlier prompt (whole 4-byte tokens).

    python -m rlrouter.serve.local_pool --port 8001 [--api-key-env POOL_KEY] [--delay-s 0.2]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import os
import socket
import threading
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

WORDS = ("the plan checks each step and returns a short answer with the result of the work so far "
         "then it lists what remains and why").split()


def reply_words(model: str, prompt: str, n: int = 48) -> list[str]:
    seed = int(hashlib.sha256(f"{model}\n{prompt}".encode()).hexdigest(), 16)
    return [f"[{model}]"] + [WORDS[(seed >> (3 * i)) % len(WORDS)] for i in range(n - 1)]


def tool_arguments(tool: dict, k: int) -> dict:
    """Arguments for a call to ``tool`` from its JSON schema: every required property gets a
    value of its type (strings name the round ``k``)."""
    params = (tool.get("function") or {}).get("parameters") or {}
    values = {"string": f"step {k}", "integer": k, "number": float(k), "boolean": True, "array": [], "object": {}}
    return {name: values.get((params.get("properties") or {}).get(name, {}).get("type"), f"step {k}")
            for name in params.get("required") or []}


def prompt_text(messages: list) -> str:
    def text(m):
        content = m.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        calls = json.dumps(m["tool_calls"]) if m.get("tool_calls") else ""
        return f"{content or ''}{calls}"

    return "\n".join(text(m) for m in messages)


def create_pool_app(api_key: str | None = None, delay_s: float = 0.0) -> FastAPI:
    app = FastAPI(title="rlrouter local pool")
    app.state.faults = {}  # model -> [mode, remaining count]
    app.state.replies = {}  # model -> fixed reply text
    app.state.ledger = []
    app.state.delay_s = delay_s
    app.state.tool_rounds = 2
    app.state.prompt_cache = False
    app.state.seen = {}  # model -> prompts seen (the simulated prompt cache)

    @app.post("/control")
    async def control(request: Request):
        body = await request.json()
        if "delay_s" in body:
            app.state.delay_s = float(body["delay_s"])
        if "model" in body and "reply" in body:
            app.state.replies[body["model"]] = body["reply"]
        elif "model" in body:
            app.state.faults[body["model"]] = [body.get("mode", "ok"), int(body.get("count", -1))]
        if "tool_rounds" in body:
            app.state.tool_rounds = int(body["tool_rounds"])
        if "prompt_cache" in body:
            app.state.prompt_cache = bool(body["prompt_cache"])
            app.state.seen.clear()
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
        prompt = prompt_text(messages)
        tools = body.get("tools") or []
        rounds = sum(1 for m in messages if m.get("role") == "tool")
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
        message, finish = {"role": "assistant", "content": None}, "stop"
        if tools and rounds < app.state.tool_rounds:
            tool = tools[0]
            call = {"id": f"call_{len(app.state.ledger)}_{rounds}", "type": "function",
                    "function": {"name": tool["function"]["name"],
                                 "arguments": json.dumps(tool_arguments(tool, rounds))}}
            message["tool_calls"], finish = [call], "tool_calls"
            n_out = len(call["function"]["arguments"].encode()) // 4 + 4
        else:
            fixed = app.state.replies.get(model)
            words = fixed.split(" ") if fixed else reply_words(model, prompt)
            limit = int(max_tokens or len(words))
            finish = "length" if limit < len(words) else "stop"
            words = words[:limit]
            message["content"], n_out = " ".join(words), len(words)
        if max_tokens is not None and n_out > int(max_tokens):
            n_out, finish = int(max_tokens), "length"
        usage = {"prompt_tokens": len(prompt.encode()) // 4 + 4 * len(messages), "completion_tokens": n_out}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        if app.state.prompt_cache:
            seen = app.state.seen.setdefault(model, [])
            shared = max((len(os.path.commonprefix([prompt, p]).encode()) for p in seen), default=0)
            usage["prompt_tokens_details"] = {"cached_tokens": min(shared // 4, usage["prompt_tokens"])}
            seen.append(prompt)
        app.state.ledger.append({"model": model, "status": 200, "stream": bool(body.get("stream")),
                                 "user": body.get("user"),
                                 "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0),
                                 **{k: usage[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}})
        completion = {"id": f"cmpl-{len(app.state.ledger)}", "object": "chat.completion",
                      "created": int(time.time()), "model": model}
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(sse_chunks(completion, message, finish, usage, include_usage),
                                     media_type="text/event-stream")
        return {**completion, "choices": [{"index": 0, "message": message, "finish_reason": finish}], "usage": usage}

    return app


async def sse_chunks(completion: dict, message: dict, finish: str, usage: dict, include_usage: bool):
    """A completion as OpenAI streams it: a role chunk, content (a word per chunk) or the tool
    call, the finish chunk, the usage chunk when asked for, ``[DONE]``."""
    head = {**completion, "object": "chat.completion.chunk"}

    def chunk(choices, **more):
        return f"data: {json.dumps({**head, 'choices': choices, **more})}\n\n"

    yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
    if message.get("tool_calls"):
        calls = [{"index": i, **c} for i, c in enumerate(message["tool_calls"])]
        yield chunk([{"index": 0, "delta": {"tool_calls": calls}, "finish_reason": None}])
    else:
        for i, word in enumerate(message["content"].split(" ")):
            yield chunk([{"index": 0, "delta": {"content": word if i == 0 else f" {word}"}, "finish_reason": None}])
    yield chunk([{"index": 0, "delta": {}, "finish_reason": finish}])
    if include_usage:
        yield chunk([], usage=usage)
    yield "data: [DONE]\n\n"


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
