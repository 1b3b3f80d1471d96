"""Replay world against counts read independently from the RouteLLM files."""

import csv
import glob
import json
from pathlib import Path

import pandas as pd
import pytest

from envs import Budget, Pool, make_routing_env
from envs.tokens import count_tokens
from envs.worlds.replay import ROUTELLM_CHEAP, ROUTELLM_STRONG, ReplayConfig, ReplayWorld, load_routellm, load_table

ROOT = Path(__file__).resolve().parents[1]


def test_mmlu_table_matches_pandas_counts(routellm_dir, mmlu_table):
    frames = [pd.read_csv(f) for f in sorted(glob.glob(str(routellm_dir / "mmlu" / "mmlu_*.csv")))]
    df = pd.concat(frames, ignore_index=True)
    assert len(mmlu_table) == len(df) == 14042
    for model in (ROUTELLM_CHEAP, ROUTELLM_STRONG):
        assert int(mmlu_table.correct[model].sum()) == int(df[model].astype(bool).sum())
    # the README's rates: Mixtral 68.1%, GPT-4 80.6%
    assert mmlu_table.correct[ROUTELLM_CHEAP].mean() == pytest.approx(0.681, abs=0.0005)
    assert mmlu_table.correct[ROUTELLM_STRONG].mean() == pytest.approx(0.806, abs=0.0005)


def test_gsm8k_table_matches_the_readme_counts(routellm_dir):
    table = load_routellm(routellm_dir, "gsm8k")
    assert len(table) == 1319
    assert int(table.correct[ROUTELLM_CHEAP].sum()) == 842
    assert int(table.correct[ROUTELLM_STRONG].sum()) == 1130
    assert set(table.responses) == {ROUTELLM_CHEAP, ROUTELLM_STRONG}


def test_gsm8k_episode_replays_recorded_outcomes_and_token_costs(routellm_dir):
    env = make_routing_env("replay", world={"source": "routellm-gsm8k", "episode_length": 4})
    world = env.world
    df = pd.read_csv(routellm_dir / "gsm8k_responses.csv")
    pool = Pool.default()
    _, info = env.reset(seed=0, options={"task_id": "test-3"})
    rows = world.rows_of("test-3")
    total = 0.0
    for step, row in enumerate(rows):
        tier = "large" if step % 2 else "small"
        model = ROUTELLM_STRONG if tier == "large" else ROUTELLM_CHEAP
        _, _, terminated, _, info = env.step(pool.index(tier))
        assert info["step_ok"] == bool(df.loc[row, model])
        assert info["input_tokens"] == count_tokens(df.loc[row, "prompt"])
        assert info["output_tokens"] == count_tokens(df.loc[row, f"{model}_response"])
        total += pool[tier].cost_usd(info["input_tokens"], info["output_tokens"])
    assert terminated
    assert info["cost_usd"] == pytest.approx(total, rel=1e-12)


def test_success_needs_the_configured_fraction_of_correct_answers(mmlu_table):
    cfg = ReplayConfig(episode_length=5, success_fraction=0.8)
    w = ReplayWorld(Pool.default(), cfg, table=mmlu_table)
    small = Pool.default()["small"]
    for i in range(30):
        tid = f"train-{i}"
        state = w.reset(tid, 0)
        while not state.done:
            result = w.step(state, small)
        n_correct = int(mmlu_table.correct[ROUTELLM_CHEAP][list(w.rows_of(tid))].sum())
        assert result.success == (n_correct >= 4)


def test_train_and_test_rows_are_disjoint(mmlu_table):
    w = ReplayWorld(Pool.default(), ReplayConfig(), table=mmlu_table)
    train = {r for i in range(300) for r in w.rows_of(f"train-{i}")}
    test = {r for i in range(100) for r in w.rows_of(f"test-{i}")}
    assert not train & test
    assert train <= set(w.split_rows("train").tolist()) and test <= set(w.split_rows("test").tolist())
    assert len(w.split_rows("train")) + len(w.split_rows("test")) == len(mmlu_table)
    assert not set(w.split_rows("train").tolist()) & set(w.split_rows("test").tolist())
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        w.split_rows("dev")


def generic_rows():
    return [
        {"prompt": "What is 2+2?", "cheap": "true", "strong": "true", "cheap_cost": 0.001, "strong_cost": 0.01},
        {"prompt": "Prove Fermat.", "cheap": "false", "strong": "yes", "cheap_cost": 0.002, "strong_cost": 0.03},
        {"prompt": "Capital of France?", "cheap": "1", "strong": "0", "cheap_cost": 0.001, "strong_cost": 0.02},
        {"prompt": "Sort [3,1,2].", "cheap": "no", "strong": "true", "cheap_cost": 0.003, "strong_cost": 0.01},
    ]


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_generic_table_loads_in_every_documented_format(tmp_path, fmt):
    rows = generic_rows()
    path = tmp_path / f"table.{fmt}"
    if fmt == "csv":
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pd.DataFrame(rows).to_parquet(path)
    table = load_table(path)
    assert table.models == ["cheap", "strong"]
    assert table.correct["cheap"].tolist() == [True, False, True, False]
    assert table.correct["strong"].tolist() == [True, True, False, True]
    assert table.costs["strong"].tolist() == [0.01, 0.03, 0.02, 0.01]


def test_recorded_cost_column_is_charged_and_bounds_the_mask(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in generic_rows()))
    pool = [{"name": "small", "usd_per_1m_input": 1, "usd_per_1m_output": 1, "executor": {"model": "cheap"}},
            {"name": "large", "usd_per_1m_input": 9, "usd_per_1m_output": 9, "executor": {"model": "strong"}}]
    env = make_routing_env("replay", pool=pool, world={"source": "table", "table": str(path), "episode_length": 2,
                                                       "test_fraction": 0.5},
                           budget=Budget(usd=0.035))
    _, info = env.reset(seed=0, options={"task_id": "train-0"})
    rows = env.world.rows_of("train-0")
    assert info["action_mask"].tolist() == [1, 1]  # worst case large = max recorded 0.03 <= 0.035
    _, _, _, _, info = env.step(1)
    assert info["cost_usd"] == pytest.approx([0.01, 0.03, 0.02, 0.01][rows[0]])
    # 0.035 - spent < 0.03 (the large worst case): large is now masked
    assert info["action_mask"].tolist()[1] == 0


def test_generic_table_errors_name_the_column_and_file(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("question,a,b\nq,true,maybe\n")
    with pytest.raises(ValueError, match="no prompt column 'prompt'"):
        load_table(path)
    with pytest.raises(ValueError, match=r"t.csv row 1 column b: cannot read 'maybe'"):
        load_table(path, prompt_column="question")
    with pytest.raises(ValueError, match="unsupported format"):
        load_table(_touch(tmp_path / "x.txt"))


def _touch(path):
    path.write_text("x")
    return path


def test_tier_mapped_to_a_missing_model_is_explained(mmlu_table):
    pool = Pool.from_config([
        {"name": "small", "usd_per_1m_input": 1, "usd_per_1m_output": 1, "executor": {"model": "gpt-2"}},
        {"name": "large", "usd_per_1m_input": 2, "usd_per_1m_output": 2},
    ])
    with pytest.raises(ValueError, match="tier 'small'.*table's models"):
        ReplayWorld(pool, ReplayConfig(), table=mmlu_table)


def test_missing_data_folder_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="RLROUTER_ROUTELLM_DIR"):
        load_routellm(tmp_path / "nowhere")


@pytest.fixture(scope="module")
def llmrouter_dir():
    from envs.worlds.replay import default_data_dir

    root = default_data_dir("llmrouter")
    if not (root / "dcrouter_train.json").is_file():
        pytest.skip(f"LLMRouter recordings not found at {root} (set RLROUTER_LLMROUTER_DIR)")
    return root


@pytest.fixture(scope="module")
def mmlu_pro_dir():
    from envs.worlds.replay import default_data_dir

    root = default_data_dir("mmlu-pro")
    if not list(root.glob("model_outputs_*_5shots.zip")):
        pytest.skip(f"MMLU-Pro recordings not found at {root} (set RLROUTER_MMLU_PRO_DIR)")
    return root


def test_llmrouter_table_matches_the_files(llmrouter_dir):
    from envs.worlds.replay import load_llmrouter

    table = load_llmrouter(llmrouter_dir)
    train = json.loads((llmrouter_dir / "dcrouter_train.json").read_text())
    test = json.loads((llmrouter_dir / "dcrouter_test.json").read_text())
    assert len(table) == len(train) + len(test) == 6108 and len(table.models) == 9
    # a fully correct call only: commongen's fractional coverage counts when it is 1
    for model in table.models:
        assert int(table.correct[model][:5608].sum()) == sum(r["scores"][model] == 1 for r in train)
    tasks = pd.read_json(llmrouter_dir / "default_query_train.jsonl", lines=True)
    assert len(set(table.subjects)) == tasks["task_name"].nunique() == 14
    assert table.subjects[0] == tasks.set_index("query").loc[train[0]["question"], "task_name"]


def test_mmlu_pro_table_joins_the_five_models_on_question_id(mmlu_pro_dir):
    import zipfile

    from envs.worlds.replay import load_mmlu_pro

    table = load_mmlu_pro(mmlu_pro_dir)
    answered = {}
    for path in sorted(mmlu_pro_dir.glob("*.zip")):
        with zipfile.ZipFile(path) as archive:
            answered[path.name] = pd.read_json(archive.open(archive.namelist()[0]))
    ids = set.intersection(*(set(df["question_id"]) for df in answered.values()))
    assert len(table) == len(ids) == 12002 and len(table.models) == 5
    pro = answered["model_outputs_gemini-1.5-pro-002_5shots.zip"].set_index("question_id").loc[sorted(ids)]
    assert int(table.correct["gemini-1.5-pro-002"].sum()) == int((pro["pred"] == pro["answer"]).sum())
    assert table.responses["gemini-1.5-pro-002"][0] == pro["model_outputs"].iloc[0]
    assert table.correct["Meta-Llama-3_1-70B-Instruct"].mean() == pytest.approx(0.628, abs=0.003)  # the README's rate
    assert len(set(table.subjects)) == 14 and table.prompts[0].startswith(pro["question"].iloc[0] + "\nA. ")


def test_a_three_tier_mmlu_pro_episode_prices_recorded_responses(mmlu_pro_dir):
    from rlrouter.config import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "mmlu-pro-three-tier.yaml")
    env = recipe.make_env("test")
    world = env.world
    _, info = env.reset(seed=0, options={"task_id": "test-2"})
    total = 0.0
    for step, row in enumerate(world.rows_of("test-2")):
        tier = recipe.pool.tiers[step % 3]
        model = tier.executor["model"]
        _, _, terminated, _, info = env.step(step % 3)
        assert info["step_ok"] == bool(world.table.correct[model][row])
        assert info["output_tokens"] == count_tokens(world.table.responses[model][row])
        total += tier.cost_usd(count_tokens(world.table.prompts[row]), info["output_tokens"])
    assert terminated and info["cost_usd"] == pytest.approx(total, rel=1e-12)
