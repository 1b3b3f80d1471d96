"""Gateway overhead: the same agent steps sent straight to a tier and through the gateway of
``rlrouter serve`` (model ``rlrouter/auto``), at the same concurrency.

1. The local pool server runs as its own process (``python -m rlrouter.serve.local_pool``,
   ``--pool-delay-s`` of network latency per call, default 0: what is left is software).
2. The work: ``--steps`` chat-completions bodies of a tool-using agent (system prompt, task,
   0-3 earlier tool-call rounds, a tool schema), spread over ``--tasks`` task ids.
3. Direct: ``--clients`` clients post every step to the pool (model ``small-model``).
4. Gateway: ``rlrouter serve`` with a route-only router, the same steps, the same clients.
   Each reply's ``Server-Timing`` header gives the router's decision and the time waiting on
   the tier; gateway overhead = client latency - decision - upstream (parsing, the task
   ledger, building the forwarded body, the extra HTTP hop). Once per ``--task-store``.
5. The same with a think/route router: its decision decodes a thought first.

The routers are two tiny ones trained here (~1 min each, kept in ``--work``) unless given.

usage: python benchmarks/gateway.py [--clients 4] [--steps 200] [--task-store memory,redis] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

TOOLS = [{"type": "function", "function": {
    "name": "lookup", "description": "Look a fact up in the reference book.",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}]
TASKS = ["How many moons does the planet in the book have?", "Find the year the bridge in chapter 3 opened.",
         "Which of the two reports gives the larger total, and by how much?", "Summarize the log's last error."]
PRICES = {"small": (0.40, 1.60), "large": (2.00, 8.00)}


def agent_steps(n_steps: int, n_tasks: int) -> list[tuple[str, dict]]:
    """(task id, chat-completions body) of a tool-using agent: step ``j`` of a task carries
    its ``j`` earlier tool-call rounds, as LangGraph or the Agents SDK would send them."""
    steps = []
    for i in range(n_steps):
        task, round_ = i % n_tasks, (i // n_tasks) % 4
        messages = [{"role": "system", "content": "You are a careful assistant. Use the lookup tool."},
                    {"role": "user", "content": TASKS[task % len(TASKS)] + f" (case {task})"}]
        for r in range(round_):
            call = {"id": f"call_{task}_{r}", "type": "function",
                    "function": {"name": "lookup", "arguments": json.dumps({"query": f"step {r}"})}}
            messages += [{"role": "assistant", "content": None, "tool_calls": [call]},
                         {"role": "tool", "tool_call_id": call["id"], "content": f"the book says: step {r} is 42"}]
        steps.append((f"task-{task}", {"messages": messages, "tools": TOOLS, "max_tokens": 32}))
    return steps


def train_router(turn_format: str, out: Path) -> Path:
    """A tiny router (the test suite's settings) trained in the given turn format."""
    if (out / "sft" / "rlrouter.json").is_file():
        return out / "sft"
    from rlrouter.config import recipe_from_dict
    from rlrouter.pipeline import run_sft_stage, run_synth

    recipe = recipe_from_dict({
        "name": f"gateway-bench-{turn_format}", "seed": 0,
        "world": {"kind": "synthetic", "n_train": 40, "n_test": 10, "max_length": 8},
        "synth": {"tasks": 40, "samples": 2, "n_strata": 2, "boundary_k": 2, "out_dir": str(out / "synth")},
        "sft": {"epochs": 12, "batch_size": 4, "learning_rate": 5e-3, "logging_steps": 10, "out_dir": str(out / "sft")},
        "router": {"max_new_tokens": 32, "batch_size": 16, "turn_format": turn_format}})
    print(f"training a tiny {turn_format} router in {out} …", flush=True)
    run_synth(recipe, progress=False)
    run_sft_stage(recipe, progress=False)
    return out / "sft"


def wait_for(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 300) -> None:
    import httpx

    deadline = time.time() + timeout_s
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"{url} did not come up; see {log}")
        time.sleep(0.5)


class Process:
    """A server subprocess with its log, stopped on exit."""

    def __init__(self, command: list[str], log: Path, health: str | None = None, env: dict | None = None):
        self.log = log
        self.file = open(log, "w")
        self.proc = subprocess.Popen(command, stdout=self.file, stderr=subprocess.STDOUT, env=env or dict(os.environ))
        if health:
            wait_for(health, self.proc, log)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.file.close()


def server_timing(header: str | None) -> dict[str, float]:
    """``router;dur=1.2, upstream;dur=3.4`` -> {"router": 1.2, "upstream": 3.4} (ms)."""
    out = {}
    for part in (header or "").split(","):
        name, _, rest = part.strip().partition(";")
        if rest.startswith("dur="):
            out[name] = float(rest[4:])
    return out


async def load(url: str, bodies: list[tuple[dict, dict]], clients: int) -> dict:
    """Post every (headers, body) once, ``clients`` at a time; per request: latency and the
    reply's Server-Timing (aiohttp: the lightest client at hand, on the same 2 cores)."""
    import aiohttp

    queue = list(range(len(bodies)))
    rows: list[dict] = [{} for _ in bodies]

    async def client(http):
        while queue:
            i = queue.pop(0)
            headers, body = bodies[i]
            start = time.perf_counter()
            try:
                async with http.post(url, json=body, headers=headers) as response:
                    data = await response.json()
                    ok = response.status == 200 and bool(data.get("choices"))
                    timing = server_timing(response.headers.get("server-timing"))
            except Exception:  # noqa: BLE001 - a load test counts every failure
                ok, timing = False, {}
            rows[i] = {"ms": 1000 * (time.perf_counter() - start), "ok": ok, **timing}

    start = time.perf_counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients),
                                     timeout=aiohttp.ClientTimeout(total=120)) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return {"seconds": time.perf_counter() - start, "rows": rows}


def summary(run: dict) -> dict:
    rows = run["rows"]
    ok = [r for r in rows if r["ok"]]

    def pct(values):
        return {"p50_ms": float(np.percentile(values, 50)), "p95_ms": float(np.percentile(values, 95))} \
            if values else {"p50_ms": float("nan"), "p95_ms": float("nan")}

    out = {"requests": len(rows), "errors": len(rows) - len(ok), "requests_per_s": len(rows) / run["seconds"],
           "latency": pct([r["ms"] for r in ok])}
    if ok and "router" in ok[0]:
        out["decision"] = pct([r["router"] for r in ok])
        out["upstream"] = pct([r["upstream"] for r in ok])
        out["overhead"] = pct([r["ms"] - r["router"] - r["upstream"] for r in ok])
    return out


def gateway_run(checkpoint: Path, pool_url: str, store: str, work: Path, steps, clients: int, tag: str) -> dict:
    import yaml

    from rlrouter.serve.local_pool import free_port

    pool = {"pool": [{"name": n, "base_url": pool_url, "model": f"{n}-model", "usd_per_1m_input": p_in,
                      "usd_per_1m_output": p_out, "max_retries": 1, "timeout_s": 30} for n, (p_in, p_out) in PRICES.items()],
            "server": {"task_store": store, "router_max_tokens": 64, "max_tokens": 256, "retry_backoff_s": 0.01,
                       "default_budget": {"usd": 10.0}}}
    (work / f"pool-{tag}.yaml").write_text(yaml.safe_dump(pool))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    print(f"gateway ({tag}): starting rlrouter serve …", flush=True)
    server = Process([sys.executable, "-m", "rlrouter", "serve", "--checkpoint", str(checkpoint), "--pool",
                      str(work / f"pool-{tag}.yaml"), "--port", str(port), "--max-model-len", "2048",
                      "--log-level", "warning"], work / f"server-{tag}.log", f"{base}/health",
                     {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")})
    try:
        run_id = f"{tag}-{time.time_ns()}"
        bodies = [({"X-Rlrouter-Task": f"{run_id}-{task}"}, {**body, "model": "rlrouter/auto"}) for task, body in steps]
        asyncio.run(load(f"{base}/v1/chat/completions", bodies[:8], clients))  # warm-up (not measured)
        print(f"gateway ({tag}): {len(steps)} steps, {clients} clients …", flush=True)
        bodies = [({"X-Rlrouter-Task": f"{run_id}-m-{task}"}, body) for (_, body), (task, _) in zip(bodies, steps)]
        return asyncio.run(load(f"{base}/v1/chat/completions", bodies, clients))
    finally:
        server.stop()


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    parts = [("upstream", "tier (pool) call"), ("decision", "router decision"), ("overhead", "gateway overhead")]
    for q, offset in (("p50_ms", -0.2), ("p95_ms", 0.2)):
        left = np.zeros(len(names))
        for (key, label), color in zip(parts, ("#999999", "#4c72b0", "#dd8452")):
            values = np.array([results[n][key][q] if key in results[n] else
                               (results[n]["latency"][q] if key == "upstream" else 0.0) for n in names])
            ax.barh(np.arange(len(names)) + offset, values, 0.38, left=left, color=color,
                    label=label if q == "p50_ms" else None, alpha=1.0 if q == "p50_ms" else 0.6)
            left += values
    ax.set_yticks(np.arange(len(names)), names)
    ax.set_xlabel("ms per step (dark: p50 of each part, light: p95)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--pool-delay-s", type=float, default=0.0, help="network latency of each tier call")
    parser.add_argument("--task-store", default="memory,redis", help="comma list: memory, redis (a local redis-server)")
    parser.add_argument("--route-checkpoint", help="a route-only router (default: train a tiny one)")
    parser.add_argument("--think-checkpoint", help="a think/route router (default: train a tiny one)")
    parser.add_argument("--work", default="runs/bench-gateway", help="routers, configs and server logs go here")
    parser.add_argument("--out", help="write gateway.json and gateway.png here")
    args = parser.parse_args()

    from rlrouter.serve.local_pool import free_port

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    stores = [s.strip() for s in args.task_store.split(",") if s.strip()]
    if any(s not in ("memory", "redis") for s in stores):
        raise SystemExit(f"--task-store takes memory and/or redis, got {args.task_store!r}")
    if "redis" in stores and shutil.which("redis-server") is None:
        raise SystemExit("--task-store redis needs Debian's redis-server (scripts/install.sh installs it)")
    routers = {"route": Path(args.route_checkpoint) if args.route_checkpoint else train_router("route", work / "route"),
               "think_route": Path(args.think_checkpoint) if args.think_checkpoint
               else train_router("think_route", work / "think_route")}
    steps = agent_steps(args.steps, args.tasks)
    pool_port = free_port()
    pool = Process([sys.executable, "-m", "rlrouter.serve.local_pool", "--port", str(pool_port),
                    "--delay-s", str(args.pool_delay_s)], work / "pool.log", f"http://127.0.0.1:{pool_port}/ledger")
    redis = None
    pool_url = f"http://127.0.0.1:{pool_port}/v1"
    runs = {}
    try:
        direct = [({}, {**body, "model": "small-model"}) for _, body in steps]
        asyncio.run(load(f"{pool_url}/chat/completions", direct[:8], args.clients))  # warm-up
        print(f"direct: {len(steps)} steps to the tier, {args.clients} clients …", flush=True)
        runs["direct to the tier"] = asyncio.run(load(f"{pool_url}/chat/completions", direct, args.clients))
        for store in stores:
            url = "memory"
            if store == "redis":
                redis_port = free_port()
                redis = Process(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no"], work / "redis.log")
                time.sleep(0.5)
                url = f"redis://127.0.0.1:{redis_port}/0"
            runs[f"gateway, route-only, {store}"] = gateway_run(routers["route"], pool_url, url, work, steps,
                                                                args.clients, f"route-{store}")
        store = "memory" if "memory" in stores else "redis"
        runs[f"gateway, think/route, {store}"] = gateway_run(routers["think_route"], pool_url,
                                                             "memory" if store == "memory" else url, work, steps,
                                                             args.clients, "think")
    finally:
        pool.stop()
        if redis is not None:
            redis.stop()

    results = {name: summary(run) for name, run in runs.items()}
    base = results["direct to the tier"]["latency"]
    print(f"\n{args.steps} agent steps, {args.clients} clients, pool latency {args.pool_delay_s:g} s "
          f"({os.cpu_count()} cores)\n")
    print("| path | errors | requests/s | latency p50 / p95 (ms) | added vs direct p50 / p95 | "
          "router decision p50 / p95 | gateway overhead p50 / p95 |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        lat = r["latency"]
        added = "-" if name.startswith("direct") else \
            f"{lat['p50_ms'] - base['p50_ms']:.1f} / {lat['p95_ms'] - base['p95_ms']:.1f}"
        decision = f"{r['decision']['p50_ms']:.1f} / {r['decision']['p95_ms']:.1f}" if "decision" in r else "-"
        overhead = f"{r['overhead']['p50_ms']:.1f} / {r['overhead']['p95_ms']:.1f}" if "overhead" in r else "-"
        print(f"| {name} | {r['errors']} | {r['requests_per_s']:.1f} | {lat['p50_ms']:.1f} / {lat['p95_ms']:.1f} | "
              f"{added} | {decision} | {overhead} |")
    gateways = {n: r for n, r in results.items() if "overhead" in r}
    worst = max(r["overhead"]["p50_ms"] for r in gateways.values())
    print(f"\ngateway overhead (excluding the router's decoding): worst p50 {worst:.1f} ms (goal <= 5 ms); "
          f"errors {sum(r['errors'] for r in results.values())}")
    out = {"steps": args.steps, "clients": args.clients, "tasks": args.tasks, "pool_delay_s": args.pool_delay_s,
           "cores": os.cpu_count(), "results": results}
    print(json.dumps(out))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gateway.json").write_text(json.dumps(out, indent=1))
        plot(results, Path(args.out) / "gateway.png")
        print(f"wrote {Path(args.out) / 'gateway.json'} and {Path(args.out) / 'gateway.png'}")


if __name__ == "__main__":
    main()
