"""The HTTP face of the router: an OpenAI-compatible API on FastAPI.

- ``POST /v1/chat/completions``: the request is the task; the router thinks, routes
  sub-queries to the pool, reads the replies and answers (``rlrouter.serve.service``). The
  response is a normal chat completion; ``usage`` adds ``cost_usd`` and the router's own
  tokens; the field ``rlrouter`` holds the trace. ``stream: true`` sends the answer as SSE
  chunks once it is known.
- ``POST /v1/chat/completions`` with ``model: "rlrouter/auto"`` (``server.gateway_model``):
  gateway mode (``rlrouter.serve.gateway``): the request is one step of an agent's task; it
  goes to the tier the router picks under the task's budget, verbatim (tools, tool calls,
  streaming), and the tier's reply comes back as it is, with ``x-rlrouter-*`` headers.
- ``POST /v1/tasks``, ``GET /v1/tasks/{id}``, ``POST /v1/tasks/{id}/outcome``: a task's
  budget up front, its spend and steps, and its outcome afterwards (for training data).
- ``POST /v1/route``: step mode for agent frameworks: the episode so far and the budget;
  returns the tier (and the think text) without calling a model.
- ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus).

Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: bad input is a
400 naming the field, a missing or wrong key a 401, a budget that cannot pay for one call
a 400 with code ``budget_too_small``, pool failures a 502; never a 500 for bad input.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from envs.budget import Budget
from rlrouter.serve.config import ServeConfig
from rlrouter.serve.gateway import Gateway, GatewayError, TrafficLog, outcome_record
from rlrouter.serve.ledger import TaskStoreError, make_ledger, new_reservation_id
from rlrouter.serve.metrics import ServeMetrics
from rlrouter.serve.service import BudgetError, RequestTooLong, RouterService, Spend, UpstreamError

log = logging.getLogger("rlrouter.serve")
STREAM_CHUNK_CHARS = 64


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind, self.extra = kind, extra


# -- request bodies ----------------------------------------------------------------------
class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields (user, seed, …) that change nothing here

    model: str = ""
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)
    tools: list[Any] | None = None
    budget: dict[str, Any] | None = None
    max_turns: int | None = Field(None, ge=1)
    router_temperature: float = Field(0.0, ge=0, le=2)


class HistoryStep(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tier: str
    event: str = "ok"
    observation: str = ""


class Progress(BaseModel):
    model_config = ConfigDict(extra="forbid")
    done: int = Field(ge=0)
    total: int = Field(ge=1)


class CallTokens(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input: int = Field(0, ge=0)
    output: int | None = Field(None, ge=1)


class Spent(BaseModel):
    model_config = ConfigDict(extra="forbid")
    usd: float = Field(0.0, ge=0)
    calls: dict[str, int] = Field(default_factory=dict)


class RouteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: str = Field(min_length=1)
    next_step: str = Field(min_length=1)
    history: list[HistoryStep] = Field(default_factory=list)
    step_index: int | None = Field(None, ge=0)
    max_steps: int | None = Field(None, ge=1)
    progress: Progress | None = None
    budget: dict[str, Any] | None = None
    spent: Spent | None = None
    next_call_tokens: CallTokens | None = None
    temperature: float = Field(0.0, ge=0, le=2)


# -- the app -------------------------------------------------------------------------------
def create_app(config: ServeConfig, service_factory) -> FastAPI:
    """``service_factory()`` builds the ``RouterService`` (the engine starts inside the
    server's event loop); ``service.engine.shutdown()`` runs when the server stops."""
    metrics = ServeMetrics()
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        ledger = make_ledger(config.task_store, config.task_ttl_s, config.reservation_ttl_s)
        await ledger.connect()
        state["service"] = await service_factory(metrics)
        state["gateway"] = Gateway(state["service"], ledger, TrafficLog(config.traffic_log))
        log.info("router ready: tiers %s, auth %s, task store %s", config.pool.names,
                 "on" if config.api_key_env else "off", "memory" if config.task_store == "memory" else "redis")
        yield
        state.pop("gateway")
        await ledger.close()
        service = state.pop("service")
        await service.pool_client.aclose()
        service.engine.shutdown()

    app = FastAPI(title="rlrouter", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        body = {"error": {"message": err.message, "type": err.kind, "param": err.param, "code": err.code}}
        if err.extra:
            body["rlrouter"] = err.extra
        return JSONResponse(body, status_code=err.status)

    @app.exception_handler(GatewayError)
    async def gateway_error(request: Request, err: GatewayError):
        return JSONResponse({"error": {"message": err.message, "type": err.kind, "param": err.param,
                                       "code": err.code}}, status_code=err.status)

    @app.exception_handler(TaskStoreError)
    async def task_store_error(request: Request, err: TaskStoreError):
        return JSONResponse({"error": {"message": str(err), "type": "server_error", "param": "server.task_store",
                                       "code": "task_store_unavailable"}}, status_code=503)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError):
        first = err.errors()[0]
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            message, param = "the request body is not valid JSON", None
        else:
            param = ".".join(loc) or None
            message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": param,
                                       "code": "invalid_value"}}, status_code=400)

    app.add_middleware(CountRequests, metrics=metrics)

    def engine_status() -> str:
        if "service" not in state:
            return "starting"
        return "ok" if state["service"].engine.healthy else "engine_down"

    def service() -> RouterService:
        if engine_status() != "ok":
            raise APIError(503, "the router engine is not running", kind="server_error", code="engine_down")
        return state["service"]

    async def authorize(request: Request) -> None:  # async: FastAPI runs sync dependencies in a thread pool
        key = config.server_api_key()
        if not key:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           kind="authentication_error", code="invalid_api_key")

    def budget_of(raw: dict | None, param: str = "budget") -> Budget:
        if raw is None:
            return config.default_budget
        try:
            budget = Budget.from_dict(raw, where=param)
            budget.check_tiers(config.pool)
        except (ValueError, TypeError) as err:
            raise APIError(400, str(err), param=param, code="invalid_budget") from None
        return budget

    @app.get("/health")
    async def health():
        status = engine_status()
        if status != "ok":
            return JSONResponse({"status": status}, status_code=503)
        return {"status": status, "model": config.served_model_name, "tiers": config.pool.names}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "rlrouter"}
                                           for name in (config.served_model_name, config.gateway_model)]}

    @app.post("/v1/route", dependencies=[Depends(authorize)])
    async def route(body: RouteRequest):
        svc = service()
        budget = budget_of(body.budget)
        for i, step in enumerate(body.history):
            if step.tier not in config.pool.names:
                raise APIError(400, f"history[{i}].tier {step.tier!r} is not a tier of the pool {config.pool.names}",
                               param=f"history.{i}.tier")
        if body.spent is None:
            if budget.usd is not None and body.history:
                raise APIError(400, "spent.usd is required with a usd budget once the episode has history "
                               "(the dollars the episode has spent so far)", param="spent.usd")
            calls = {}
            for step in body.history:
                calls[step.tier] = calls.get(step.tier, 0) + 1
            spend = Spend(0.0, calls)
        else:
            unknown = set(body.spent.calls) - set(config.pool.names)
            if unknown or any(v < 0 for v in body.spent.calls.values()):
                raise APIError(400, f"spent.calls must map tiers of the pool {config.pool.names} to counts >= 0",
                               param="spent.calls")
            spend = Spend(body.spent.usd, dict(body.spent.calls))
        request = body.model_dump(exclude_none=True)
        try:
            result = await svc.route(request, budget, spend)
        except RequestTooLong as err:
            raise APIError(400, str(err), param="task", code="context_length_exceeded") from None
        return JSONResponse({"id": f"route-{uuid.uuid4().hex}", "object": "route", "model": config.served_model_name,
                             **result})

    def gateway() -> Gateway:
        service()
        return state["gateway"]

    @app.post("/v1/tasks", dependencies=[Depends(authorize)], status_code=201)
    async def open_task(request: Request):
        body = await json_body(request)
        task_id = body.get("task_id", f"task-{new_reservation_id()}")
        if not isinstance(task_id, str) or not task_id.strip() or len(task_id) > 256:
            raise APIError(400, "task_id must be a non-empty string of at most 256 characters", param="task_id")
        unknown = set(body) - {"task_id", "budget"}
        if unknown:
            raise APIError(400, f"unknown field(s) {sorted(unknown)}; allowed: task_id, budget",
                           param=sorted(unknown)[0])
        task_state, created = await gateway().ledger.open(task_id.strip(), budget_of(body.get("budget")))
        if not created:
            raise APIError(409, f"task {task_id!r} exists (budget {task_state.budget.label}); use a new task_id",
                           param="task_id", code="task_exists")
        return JSONResponse(task_state.to_dict(), status_code=201)

    @app.get("/v1/tasks/{task_id}", dependencies=[Depends(authorize)])
    async def get_task(task_id: str):
        task_state = await gateway().ledger.state(task_id)
        if task_state is None:
            raise APIError(404, f"no task {task_id!r} (never opened, or idle longer than server.task_ttl_s "
                                f"{config.task_ttl_s:g} s)", param="task_id", code="task_not_found")
        return task_state.to_dict()

    @app.post("/v1/tasks/{task_id}/outcome", dependencies=[Depends(authorize)])
    async def post_outcome(task_id: str, request: Request):
        outcome = outcome_record(await json_body(request))
        gw = gateway()
        if not await gw.ledger.set_outcome(task_id, outcome):
            raise APIError(404, f"no task {task_id!r} (never opened, or idle longer than server.task_ttl_s "
                                f"{config.task_ttl_s:g} s)", param="task_id", code="task_not_found")
        gw.log.write({"time": time.time(), "task": task_id, "outcome": outcome})
        return {"task_id": task_id, "outcome": outcome}

    async def json_body(request: Request) -> dict:
        try:
            body = json.loads(await request.body() or b"{}")
        except ValueError:
            raise APIError(400, "the request body is not valid JSON", code="invalid_value") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_value")
        return body

    async def gateway_step(body: dict, headers: dict):
        gw = gateway()
        step = await gw.begin(body, headers)
        if body.get("stream"):
            chunks = await gw.stream(step)
            return StreamingResponse(chunks, media_type="text/event-stream", headers=await gw.headers(step))
        data, _ = await gw.complete(step)
        return JSONResponse(data, headers=await gw.headers(step))

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat(request: Request):
        raw = await json_body(request)
        if raw.get("model") == config.gateway_model:
            return await gateway_step(raw, {k.lower(): v for k, v in request.headers.items()})
        try:
            body = ChatRequest.model_validate(raw)
        except ValidationError as err:
            raise RequestValidationError(err.errors()) from None
        svc = service()
        if body.tools:
            raise APIError(400, "tools are not supported: the router answers through its pool", param="tools")
        if not any(m.role == "user" for m in body.messages):
            raise APIError(400, "messages must hold at least one user message (the request)", param="messages")
        budget = budget_of(body.budget)
        max_turns = body.max_turns or config.max_turns
        if max_turns > config.max_turns:
            raise APIError(400, f"max_turns {max_turns} exceeds the server's limit {config.max_turns}",
                           param="max_turns")
        max_tokens = body.max_completion_tokens or body.max_tokens or config.max_tokens
        sampling = {k: v for k, v in (("temperature", body.temperature), ("top_p", body.top_p)) if v is not None}
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            result = await svc.chat(messages, budget, max_turns, max_tokens, body.router_temperature, sampling)
        except BudgetError as err:
            raise APIError(400, str(err), param="budget", code="budget_too_small") from None
        except RequestTooLong as err:
            raise APIError(400, str(err), param="messages", code="context_length_exceeded") from None
        except UpstreamError as err:
            raise APIError(502, str(err), kind="upstream_error", code="pool_unavailable",
                           extra={"trace": err.trace}) from None
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        extra = {k: result[k] for k in ("trace", "stopped", "budget", "spend", "malformed_router_turns")}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_sse(completion_id, config.served_model_name, result, extra, include_usage),
                                     media_type="text/event-stream")
        return JSONResponse({"id": completion_id, "object": "chat.completion", "created": int(time.time()),
                             "model": config.served_model_name,
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": result["answer"]},
                                          "finish_reason": result["finish_reason"]}],
                             "usage": result["usage"], "rlrouter": extra})

    return app


KNOWN_PATHS = {"/v1/chat/completions", "/v1/route", "/v1/models", "/v1/tasks", "/health", "/metrics"}


class CountRequests:
    """Requests and latency per endpoint and status. A plain ASGI middleware: Starlette's
    ``@app.middleware("http")`` wraps every response in a stream and a task."""

    def __init__(self, app, metrics: ServeMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            endpoint = scope["path"] if scope["path"] in KNOWN_PATHS else "other"
            self.metrics.requests.labels(endpoint=endpoint, status=str(status[0])).inc()
            self.metrics.latency.labels(endpoint=endpoint).observe(time.perf_counter() - start)


async def _sse(completion_id: str, model: str, result: dict, extra: dict, include_usage: bool):
    created = int(time.time())

    def chunk(delta: dict, finish_reason=None, **more) -> str:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}], **more}
        return f"data: {json.dumps(body)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    answer = result["answer"]
    for start in range(0, len(answer), STREAM_CHUNK_CHARS):
        yield chunk({"content": answer[start:start + STREAM_CHUNK_CHARS]})
    yield chunk({}, result["finish_reason"], rlrouter=extra)
    if include_usage:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [], "usage": result["usage"]}
        yield f"data: {json.dumps(body)}\n\n"
    yield "data: [DONE]\n\n"
