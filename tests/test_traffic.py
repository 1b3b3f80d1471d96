"""``rlrouter traffic``: the gateway's traffic logs (two replicas) become a replay table and
SFT data in the synthesis format, checked line by line against a hand-written log."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlrouter.cli import main
from rlrouter.config import load_recipe


def step(task, k, tier, cost, t, budget=None, prompt=None):
    return {"time": t, "task": task, "step": k, "tier": tier, "router_tier": tier, "allowed_tiers": ["small", "large"],
            "step_prompt": prompt or f"{task} step {k}", "event": "ok", "finish_reason": "stop",
            "prompt_tokens": 100 + k, "completion_tokens": 10, "cached_tokens": 0, "cost_usd": cost,
            "budget": budget or {"usd": 0.01, "max_calls": {"large": 2}}}


@pytest.fixture
def logs(tmp_path):
    replica_a = [step("ok-task", 0, "small", 1e-4, 1.0), step("ok-task", 2, "small", 3e-4, 3.0),
                 step("bad-task", 0, "large", 5e-4, 1.5), step("open-task", 0, "small", 1e-4, 1.6),
                 {"time": 4.0, "task": "ok-task", "outcome": {"success": True, "score": 0.9}}]
    replica_b = [step("ok-task", 1, "large", 2e-3, 2.0),  # the same task through the other replica
                 {"time": 5.0, "task": "bad-task", "outcome": {"success": False}}]
    paths = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    for path, lines in zip(paths, (replica_a, replica_b)):
        path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return paths


QUICKSTART = str(Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml")


def recipe():
    return load_recipe(QUICKSTART)


def test_logged_tasks_with_outcomes_become_a_replay_table_and_sft_chats(logs, tmp_path, capsys):
    from datasets import load_from_disk

    from rlrouter.boundary.synthesis import step_examples
    from rlrouter.router.prompt import system_message

    out = tmp_path / "data"
    assert main(["traffic", *map(str, logs), "--recipe", QUICKSTART, "--out", str(out)]) == 0
    rows = [json.loads(x) for x in (out / "replay.jsonl").read_text().splitlines()]
    assert [(r["task"], r["step"], r["tier"], r["success"]) for r in rows] == [
        ("bad-task", 0, "large", False), ("ok-task", 0, "small", True), ("ok-task", 1, "large", True),
        ("ok-task", 2, "small", True)]
    assert rows[1]["score"] == 0.9 and rows[0]["score"] is None
    chats = load_from_disk(str(out / "dataset"))
    assert len(chats) == 1 and chats[0]["task_id"] == "ok-task" and chats[0]["tier_calls"] == [2, 1]
    messages = chats[0]["messages"]
    assert messages[0]["content"] == system_message(recipe().pool.describe())
    # the thought synthesis writes: last outcome; large calls left of 2; dollars left of $0.01
    assert [m["content"] for m in messages[1:]] == [
        "ok-task step 0", "<think>start; large 2, $0.010</think><route>small</route>",
        "ok-task step 1", "<think>ok; large 2, $0.010</think><route>large</route>",
        "ok-task step 2", "<think>ok; large 1, $0.008</think><route>small</route>"]  # 0.01 - 1e-4 - 2e-3
    assert len(step_examples(chats)) == 3  # what `rlrouter sft --synth-dir` trains on
    report = json.loads((out / "report.json").read_text())
    assert (report["tasks"], report["with_outcome"], report["without_outcome"], report["successful"]) == (3, 2, 1, 1)
    assert report["calls"] == {"small": 2, "large": 2}
    assert report["cost_usd"]["large"] == pytest.approx(2.5e-3) and report["cost_usd"]["small"] == pytest.approx(4e-4)
    assert "1 task(s) had no outcome" in capsys.readouterr().out


def test_a_log_that_is_not_a_traffic_log_or_names_other_tiers_is_a_clear_error(logs, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(step("t", 0, "small", 1e-4, 1.0)) + "\nnot json\n")
    assert main(["traffic", str(bad), "--recipe", QUICKSTART, "--out", str(tmp_path / "x")]) == 2
    assert f"{bad}:2: not a JSON line" in capsys.readouterr().err
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps(step("t", 0, "medium", 1e-4, 1.0)) + "\n")
    assert main(["traffic", str(other), "--recipe", QUICKSTART, "--out", str(tmp_path / "y")]) == 2
    assert "tier(s) ['medium'], which recipe 'quickstart' does not have" in capsys.readouterr().err
    assert main(["traffic", str(tmp_path / "missing.jsonl"), "--recipe", QUICKSTART,
                 "--out", str(tmp_path / "z")]) == 2
    assert "missing.jsonl not found" in capsys.readouterr().err
