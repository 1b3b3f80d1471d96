"""Serving load: N concurrent clients against ``rlrouter serve`` for a fixed time, and the
serving overhead against raw vLLM generation of the same tokens.

1. Start ``rlrouter serve`` (a subprocess, real HTTP on 127.0.0.1) with the pool on a local
   stand-in server (``--pool-delay-s`` of network latency per call).
2. Step mode: N clients send ``/v1/route`` requests built from real environment states for
   ``--seconds``; print requests/s, p50/p95 latency, errors.
3. Chat mode: N clients send chat requests (think/route/answer with pool calls) for
   ``--seconds``; same numbers.
4. Stop the server; start the same router on vLLM's async engine in this process and send
   exactly the step requests the server completed — same prompts, same route constraint
   (``route_args``), same concurrency — with no HTTP, no validation, no prompt building. The ratio
   served time / raw time is what the server costs on top of the engine (goal ≤ 1.15×).

usage: python benchmarks/serve_load.py [--clients 8] [--seconds 20] [--checkpoint DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import router_checkpoint


def cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of a process and of its children, by process name."""
    import psutil

    parent = psutil.Process(pid)
    totals: dict[str, float] = {}
    for proc in [parent] + parent.children(recursive=True):
        try:
            times = proc.cpu_times()
            name = "api" if proc.pid == pid else proc.name()
            totals[name] = totals.get(name, 0.0) + times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return totals


def route_bodies(recipe, n: int) -> list[dict]:
    """``/v1/route`` bodies from real episode states (random routes, mixed budgets)."""
    from envs import Budget
    from rlrouter.serve.service import route_request

    env = recipe.make_env("test")
    rng = np.random.default_rng(0)
    bodies = []
    episode = 0
    while len(bodies) < n:
        env.reset(seed=episode, options={"budget": Budget(max_calls={"large": 1 + episode % 3})})
        episode += 1
        for _ in range(int(rng.integers(1, 6))):
            bodies.append(route_request(env.view()))
            mask = np.flatnonzero(env.view()["action_mask"])
            _, _, done, truncated, _ = env.step(int(rng.choice(mask)))
            if done or truncated or len(bodies) >= n:
                break
    return bodies


async def load(url: str, bodies: list[dict], clients: int, seconds: float, headers: dict) -> dict:
    """``clients`` loops, each posting the next body until time is up (aiohttp: the lightest
    client at hand, since it shares the machine's cores with the server)."""
    import aiohttp

    latencies, errors, done, next_index = [], 0, [], [0]
    deadline = time.perf_counter() + seconds

    async def client(http):
        nonlocal errors
        while time.perf_counter() < deadline:
            i = next_index[0]
            next_index[0] += 1
            start = time.perf_counter()
            try:
                async with http.post(url, json=bodies[i % len(bodies)], headers=headers) as response:
                    body = await response.json() if response.status == 200 else None
            except Exception:  # noqa: BLE001 - a load test counts every failure
                body = None
            latencies.append(time.perf_counter() - start)
            if body is not None:
                done.append((i, body))
            else:
                errors += 1

    start, cpu = time.perf_counter(), time.process_time()
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    elapsed = time.perf_counter() - start
    return {"requests": len(latencies), "errors": errors, "seconds": elapsed,
            "client_cpu_s": time.process_time() - cpu,
            "requests_per_s": len(latencies) / elapsed, "p50_ms": 1000 * float(np.percentile(latencies, 50)),
            "p95_ms": 1000 * float(np.percentile(latencies, 95)), "completed": sorted(done, key=lambda d: d[0])}


async def raw_generation(checkpoint: Path, config, bodies: list[dict], clients: int) -> dict:
    """The same step requests straight on the engine: prompts and route constraints prepared up front."""
    from transformers import AutoTokenizer

    from envs import Budget
    from rlrouter.router.checkpoint import read_meta
    from rlrouter.router.generation import AsyncRouterEngine, route_args
    from rlrouter.serve.service import RouterService, Spend, pool_descriptors

    # the server's own prompt building, without its engine, pool client or metrics
    service = RouterService(None, AutoTokenizer.from_pretrained(checkpoint), config, None, None,
                            pool_descriptors(config, read_meta(checkpoint)))
    work = []
    for body in bodies:
        budget = Budget.from_dict(body["budget"])
        spend = Spend(body["spent"]["usd"], body["spent"]["calls"])
        work.append((service.step_prompt(body, budget, spend),
                     route_args(service.step_allowed(body, budget, spend), service.format.turn_format)))
    engine = AsyncRouterEngine(checkpoint, max_model_len=2048)
    try:
        await engine.generate(work[0][0], None, config.router_max_tokens, extra_args=work[0][1])  # warm-up, as the server had
        before = cpu_seconds(os.getpid())
        queue = list(range(len(work)))
        tokens = []

        async def client():
            while queue:
                ids, constraint = work[queue.pop(0)]
                out = await engine.generate(ids, None, config.router_max_tokens, extra_args=constraint)
                tokens.append(out.completion_tokens)

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        seconds = time.perf_counter() - start
        cpu = {k: v - before.get(k, 0.0) for k, v in cpu_seconds(os.getpid()).items()}
        return {"requests": len(work), "seconds": seconds, "completion_tokens": sum(tokens), "cpu_s": cpu}
    finally:
        engine.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--pool-delay-s", type=float, default=0.2, help="latency of each pool call (chat mode)")
    parser.add_argument("--recipe", default="recipes/quickstart.yaml")
    parser.add_argument("--checkpoint", help="router checkpoint (default: runs/<recipe>/sft if present)")
    parser.add_argument("--out", help="write results.json here")
    args = parser.parse_args()

    import httpx
    import yaml

    from rlrouter.config import load_recipe
    from rlrouter.serve.config import serve_config_from_dict
    from rlrouter.serve.local_pool import LocalPoolServer, free_port

    recipe = load_recipe(args.recipe)
    checkpoint, tmp = router_checkpoint(recipe, args.checkpoint)
    bodies = route_bodies(recipe, 256)
    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    with LocalPoolServer(delay_s=args.pool_delay_s) as pool:
        raw = {"pool": [{"name": t.name, "base_url": pool.base_url, "model": f"{t.name}-model",
                         "usd_per_1m_input": t.usd_per_1m_input, "usd_per_1m_output": t.usd_per_1m_output}
                        for t in recipe.pool.tiers],
               "server": {"max_turns": 3, "router_max_tokens": 64, "default_budget": {"usd": 0.05}}}
        (work / "pool.yaml").write_text(yaml.safe_dump(raw))
        config = serve_config_from_dict(raw)
        port = free_port()
        log = open(work / "server.log", "w")
        server = subprocess.Popen([sys.executable, "-m", "rlrouter", "serve", "--checkpoint", str(checkpoint),
                                   "--pool", str(work / "pool.yaml"), "--port", str(port), "--log-level", "warning"],
                                  stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 300
            while True:
                try:
                    if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if server.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"server did not start; see {work / 'server.log'}")
                time.sleep(1)
            httpx.post(f"{base}/v1/route", json=bodies[0], timeout=120)  # warm-up
            print(f"step mode: {args.clients} clients for {args.seconds:g} s …", flush=True)
            before = cpu_seconds(server.pid)
            step = asyncio.run(load(f"{base}/v1/route", bodies, args.clients, args.seconds, {}))
            step["server_cpu_s"] = {k: v - before.get(k, 0.0) for k, v in cpu_seconds(server.pid).items()}
            chats = [{"messages": [{"role": "user", "content": b["task"]}], "max_tokens": 64,
                      "budget": {"usd": 0.01, "large_calls": 1}} for b in bodies[:64]]
            print(f"chat mode: {args.clients} clients for {args.seconds:g} s (pool latency "
                  f"{args.pool_delay_s:g} s per call) …", flush=True)
            chat = asyncio.run(load(f"{base}/v1/chat/completions", chats, args.clients, args.seconds, {}))
        finally:
            server.terminate()
            server.wait(timeout=60)
            log.close()
    served_bodies = [bodies[i % len(bodies)] for i, _ in step["completed"]]
    served_tokens = sum(r["usage"]["completion_tokens"] for _, r in step["completed"])
    served_seconds = step["seconds"] * len(served_bodies) / max(step["requests"], 1)
    print(f"raw engine: the same {len(served_bodies)} step requests, {args.clients} at a time …", flush=True)
    raw_run = asyncio.run(raw_generation(checkpoint, config, served_bodies, args.clients))
    ratio = served_seconds / raw_run["seconds"]
    chat_calls = [len([t for t in r["rlrouter"]["trace"] if "tier" in t]) for _, r in chat["completed"]]
    print("\n| mode | clients | requests | errors | requests/s | p50 (ms) | p95 (ms) |")
    print("|---|---|---|---|---|---|---|")
    for name, r in (("step (/v1/route)", step), ("chat (/v1/chat/completions)", chat)):
        print(f"| {name} | {args.clients} | {r['requests']} | {r['errors']} | {r['requests_per_s']:.1f} | "
              f"{r['p50_ms']:.0f} | {r['p95_ms']:.0f} |")
    print(f"\nload generator CPU: {step['client_cpu_s']:.1f} s (step), {chat['client_cpu_s']:.1f} s (chat)")
    print("CPU seconds, step mode (served): " + ", ".join(f"{k} {v:.1f}" for k, v in step["server_cpu_s"].items()))
    print("CPU seconds, same requests (raw): " + ", ".join(f"{k} {v:.1f}" for k, v in raw_run["cpu_s"].items()))
    cpu_ratio = (sum(step["server_cpu_s"].values()) * len(served_bodies) / max(step["requests"], 1)) / \
        sum(raw_run["cpu_s"].values())
    print(f"chat: {np.mean(chat_calls) if chat_calls else 0:.2f} pool calls per request "
          f"({args.pool_delay_s:g} s each)")
    print(f"serving overhead (step mode): served {served_seconds:.2f} s vs raw engine {raw_run['seconds']:.2f} s for "
          f"the same {len(served_bodies)} requests ({served_tokens} vs {raw_run['completion_tokens']} router tokens): "
          f"ratio {ratio:.2f} (goal <= 1.15); CPU seconds ratio {cpu_ratio:.2f}")
    result = {"clients": args.clients, "seconds": args.seconds,
              "step": {k: v for k, v in step.items() if k != "completed"},
              "chat": {k: v for k, v in chat.items() if k != "completed"}, "raw": raw_run,
              "served_seconds_same_requests": served_seconds, "served_tokens": served_tokens, "overhead_ratio": ratio,
              "cpu_ratio": cpu_ratio}
    print(json.dumps(result))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "serve_load.json").write_text(json.dumps(result, indent=1))
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
