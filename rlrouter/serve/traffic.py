"""The gateway's traffic log as training data (``rlrouter traffic LOG… --recipe R --out DIR``).

``server.traffic_log`` holds one JSON line per gateway step (task, step index, the router's
step prompt, the tier that took the step, tokens, cost, the task's budget) and one per
posted outcome (``POST /v1/tasks/{id}/outcome``). This module groups the lines by task and
writes:

- ``replay.jsonl``: one row per step of every task with an outcome (prompt, tier, tokens,
  cost, the task's success and score), the table a learned router (kNN, MLP, MF) or an
  offline evaluation reads;
- ``dataset/``: SFT data in the synthesis format (``rlrouter sft RECIPE --synth-dir DIR``):
  one chat per successful task, [system, step prompt, route turn, …], the route being the
  tier that took the step and the thought written as synthesis writes it (last outcome,
  caps left);
- ``report.json`` and a printed table: tasks seen, with an outcome, successful, steps and
  dollars per tier.

Tasks without an outcome are counted and left out: their label is unknown. A task whose
steps were logged by several replicas (one Redis ledger) is merged by step index.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from envs.budget import Budget


def read_traffic(paths) -> tuple[dict[str, list[dict]], dict[str, dict]]:
    """(steps by task, ordered by step index; the last posted outcome by task) from one log
    or the logs of several replicas. Lines that are not JSON objects are an error naming
    the file and line."""
    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"traffic log {path} not found (server.traffic_log in the pool config)")
    steps: dict[str, dict[int, dict]] = defaultdict(dict)
    outcomes: dict[str, dict] = {}
    lines = [(path, n, line) for path in paths for n, line in enumerate(path.read_text().splitlines(), start=1)]
    lines.sort(key=lambda x: _time_of(x[2]))  # outcomes and steps in the order they happened
    for path, n, line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise ValueError(f"{path}:{n}: not a JSON line; is this a traffic log (server.traffic_log)?") from None
        if not isinstance(record, dict) or "task" not in record:
            raise ValueError(f"{path}:{n}: a traffic line has a 'task' field; got {line[:80]!r}")
        if "outcome" in record:
            outcomes[record["task"]] = record["outcome"]
        elif "step" in record:
            steps[record["task"]][int(record["step"])] = record
    return {task: [by_index[i] for i in sorted(by_index)] for task, by_index in steps.items()}, outcomes


def _time_of(line: str) -> float:
    try:
        return float(json.loads(line).get("time", 0.0))
    except (ValueError, AttributeError, TypeError):
        return 0.0


def think_for(steps: list[dict], k: int, budget: Budget | None) -> str:
    """The thought synthesis writes (``rlrouter.router.prompt.think_text``) from what the
    router could see before step ``k``: the last outcome and the caps left."""
    from rlrouter.router.prompt import think_text

    earlier = steps[:k]
    calls: dict[str, int] = defaultdict(int)
    for s in earlier:
        calls[s["tier"]] += 1
    budget = budget or Budget()
    view = {"history": [{"event": s.get("event", "ok")} for s in earlier],
            "calls_left": {t: cap - calls[t] for t, cap in budget.max_calls.items()},
            "budget": budget.to_dict(),
            "usd_left": None if budget.usd is None else budget.usd - sum(s.get("cost_usd", 0.0) for s in earlier)}
    return think_text(view)


def traffic_data(logs, recipe, out_dir: str | Path) -> dict:
    """Write ``replay.jsonl``, ``dataset/`` and ``report.json`` under ``out_dir`` from one
    traffic log or several (one per replica); return the report."""
    from datasets import Dataset

    from rlrouter.router.prompt import format_route, system_message

    steps_by_task, outcomes = read_traffic(logs)
    log = ", ".join(str(p) for p in ([logs] if isinstance(logs, (str, Path)) else logs))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = set(recipe.pool.names)
    system = {"role": "system", "content": system_message(recipe.pool.describe())}
    rows, chats = [], []
    dollars: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for task, steps in sorted(steps_by_task.items()):
        unknown = {s["tier"] for s in steps} - names
        if unknown:
            raise ValueError(f"{log}: task {task!r} was routed to tier(s) {sorted(unknown)}, which recipe "
                             f"{recipe.name!r} does not have (its pool: {sorted(names)})")
        outcome = outcomes.get(task)
        if outcome is None:
            continue
        budget = Budget.from_dict(steps[0]["budget"]) if steps[0].get("budget") else None
        for s in steps:
            dollars[s["tier"]] += s.get("cost_usd", 0.0)
            calls[s["tier"]] += 1
            rows.append({"task": task, "step": s["step"], "step_prompt": s["step_prompt"], "tier": s["tier"],
                         "router_tier": s.get("router_tier"), "prompt_tokens": s.get("prompt_tokens"),
                         "completion_tokens": s.get("completion_tokens"), "cached_tokens": s.get("cached_tokens", 0),
                         "cost_usd": s.get("cost_usd"), "success": bool(outcome["success"]),
                         "score": outcome.get("score")})
        if outcome["success"]:
            messages = [system]
            for k, s in enumerate(steps):
                messages += [{"role": "user", "content": s["step_prompt"]},
                             {"role": "assistant", "content": format_route(s["tier"], think_for(steps, k, budget))}]
            tiers = [sum(s["tier"] == t for s in steps) for t in recipe.pool.names]
            chats.append({"messages": messages, "step_prompts": [s["step_prompt"] for s in steps], "task_id": task,
                          "taxonomy": "traffic", "budget": budget.label if budget else "none", "success": True,
                          "cost_usd": sum(s.get("cost_usd", 0.0) for s in steps),
                          "large_calls": tiers[-1], "tier_calls": tiers, "steps": len(steps)})
    with (out_dir / "replay.jsonl").open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    if chats:
        Dataset.from_list(chats).save_to_disk(str(out_dir / "dataset"))
    with_outcome = [t for t in steps_by_task if t in outcomes]
    report = {"log": str(log), "tasks": len(steps_by_task), "with_outcome": len(with_outcome),
              "without_outcome": len(steps_by_task) - len(with_outcome),
              "successful": sum(bool(outcomes[t]["success"]) for t in with_outcome),
              "steps": len(rows), "sft_examples": sum(c["steps"] for c in chats),
              "calls": dict(calls), "cost_usd": dict(dollars)}
    (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    return report


def print_report(report: dict, out_dir: Path) -> None:
    print(f"| tasks | with outcome | successful | steps | SFT route turns | calls by tier | dollars by tier |")
    print("|---|---|---|---|---|---|---|")
    calls = ", ".join(f"{t} {n}" for t, n in sorted(report["calls"].items())) or "-"
    dollars = ", ".join(f"{t} ${v:.6f}" for t, v in sorted(report["cost_usd"].items())) or "-"
    print(f"| {report['tasks']} | {report['with_outcome']} | {report['successful']} | {report['steps']} | "
          f"{report['sft_examples']} | {calls} | {dollars} |")
    print(f"wrote {out_dir / 'replay.jsonl'}" + (f", {out_dir / 'dataset'}" if report["sft_examples"] else "")
          + f" and {out_dir / 'report.json'}")
    if report["without_outcome"]:
        print(f"{report['without_outcome']} task(s) had no outcome (POST /v1/tasks/{{id}}/outcome) and were left out")
