"""Metrics arithmetic, the eval command end to end, and recipe validation."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from envs import Budget
from rlrouter.boundary import classify
from rlrouter.cli import main
from rlrouter.config import RecipeError, load_recipe, recipe_from_dict
from rlrouter.evaluate.runner import EpisodeRecord, budget_violated, summarize

ROOT = Path(__file__).resolve().parents[1]


def rec(policy, budget, success, cost, small, large, taxonomy=None):
    return EpisodeRecord(policy, budget, "t", success, cost, {"small": small, "large": large}, small + large,
                         False, False, taxonomy)


def test_taxonomy_thresholds():
    assert classify(0.6, 0.2) == "easy"
    assert classify(0.5, 0.0) == "easy"
    assert classify(0.4, 0.5) == "hard"
    assert classify(0.4, 0.4) == "intractable"
    assert classify(0.7, 0.9, theta=0.8) == "hard"


def test_summary_metrics_by_hand():
    records = [
        rec("always-small", "none", True, 0.01, 10, 0, "easy"),
        rec("always-small", "none", False, 0.01, 10, 0, "hard"),
        rec("always-large", "none", True, 0.05, 0, 10, "easy"),
        rec("always-large", "none", True, 0.07, 0, 10, "hard"),
        rec("mine", "large_calls=2", True, 0.02, 8, 2, "easy"),
        rec("mine", "large_calls=2", False, 0.02, 9, 1, "hard"),
        rec("mine", "large_calls=2", True, 0.03, 8, 2, "hard"),
        rec("mine", "large_calls=2", True, 0.01, 10, 0, "easy"),
    ]
    rows = {(r["policy"], r["budget"]): r for r in summarize(records, "large")}
    mine = rows[("mine", "large_calls=2")]
    assert mine["success"] == 0.75
    assert mine["mean_cost_usd"] == pytest.approx(0.02)
    assert mine["cost_vs_large"] == pytest.approx(0.02 / 0.06)
    assert mine["large_fraction"] == pytest.approx(5 / 40)
    assert mine["success_by_taxonomy"] == {"easy": 1.0, "hard": 0.5}
    # (0.75 - 0.5) / (1.0 - 0.5)
    assert mine["gap_recovered"] == pytest.approx(0.5)
    assert rows[("always-small", "none")]["gap_recovered"] == 0.0


def test_violation_check_is_independent_of_the_env():
    assert budget_violated(Budget(usd=0.01), 0.0100001, {})
    assert not budget_violated(Budget(usd=0.01), 0.01, {})
    assert budget_violated(Budget(max_calls={"large": 2}), 0.0, {"large": 3})


def test_eval_command_writes_json_table_and_png(tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(["eval", str(ROOT / "recipes/quickstart.yaml"), "--tasks", "12", "--budget", "large_calls=3,6",
                 "--budget", "usd=0.03", "--out", str(out), "--quiet",
                 "--policies", "always-small,always-large,random,first-large,escalate,oracle"])
    assert code == 0
    data = json.loads((out / "results.json").read_text())
    budgets = {row["budget"] for row in data["summary"]}
    assert budgets == {"large_calls=3", "large_calls=6", "usd=0.03", "none"}  # none: the references
    assert all(row["budget_violations"] == 0 for row in data["summary"])
    assert sum(data["meta"]["taxonomy_counts"].values()) == 12
    for e in data["episodes"]:
        if e["budget"] == "large_calls=3":
            assert e["calls"]["large"] <= 3
        if e["budget"] == "usd=0.03":
            assert e["cost_usd"] <= 0.03
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "results.md").read_text()
    assert "| large_calls=3 | oracle |" in table
    assert "oracle" in capsys.readouterr().out


def test_eval_is_reproducible_with_a_seed(tmp_path):
    recipe = load_recipe(ROOT / "recipes/quickstart.yaml")
    from rlrouter.evaluate.job import eval_recipe

    runs = [eval_recipe(recipe, budgets=[Budget(max_calls={"large": 4})], tasks=6, seed=3, out_dir=tmp_path / str(i),
                        policies=["random", "escalate"], progress=False) for i in range(2)]
    assert runs[0]["rows"] == runs[1]["rows"]


def test_console_script_reports_bad_recipes_without_a_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"world": {"kind": "synthetic"}, "env": {"cost_lamda": 1.0}}))
    proc = subprocess.run([sys.executable, "-m", "rlrouter.cli", "eval", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "env: unknown field(s) ['cost_lamda']" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("data, message", [
    ({"stages": ["sft9"]}, "stages must be"),
    ({"world": {"kind": "alfworld"}}, "world.kind must be one of"),
    ({"world": {"kind": "synthetic", "n_tests": 3}}, r"unknown synthetic-world field\(s\) \['n_tests'\]"),
    ({"pool": {"tiers": [{"name": "small", "usd_per_1m_input": 1, "usd_per_1m_output": 1}]}}, "at least two"),
    ({"eval": {"policies": ["always-medium"]}}, "unknown policy 'always-medium'"),
    ({"eval": {"budgets": ["xl_calls=3"]}}, "budget caps calls to tier 'xl'"),
    ({"eval": {"budgets": "usd=1"}}, "must be a list"),
    ({"eval": {"engine": "vlm"}}, r"eval.engine must be 'hf' \(transformers\) or 'vllm', got 'vlm'"),
    ({"seed": "zero"}, "seed must be an integer"),
    ({"trainer": {}}, r"unknown section\(s\) \['trainer'\]"),
    ({"world": {"kind": "replay", "source": "routellm-mmlu", "data_dir": "/nowhere"}}, "not found"),
])
def test_recipe_errors_name_the_field(data, message):
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict(data)


def test_shipped_recipes_validate(routellm_dir):
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        recipe = load_recipe(path)
        assert recipe.pool.names[0] == "small" and recipe.pool.names[-1] == "large", path
        prices = [t.usd_per_1m_output for t in recipe.pool.tiers]
        assert prices == sorted(prices), path  # tiers cheapest first
