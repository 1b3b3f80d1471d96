"""Embedding routers (knn, mlp, mf) on a constructed replay world whose query text names the
tier that succeeds, the embedding cache, save / reload, and the checks `rlrouter eval` makes
before any episode. The real all-MiniLM-L6-v2 from its offline wheel embeds the texts."""

import csv

import numpy as np
import pytest

from rlrouter.boundary.steps import boundary_steps
from rlrouter.config import RecipeError, recipe_from_dict
from rlrouter.evaluate import job
from rlrouter.evaluate.encoder import EmbeddingError, SentenceEncoder
from rlrouter.evaluate.learned import ROUTERS, EmbeddingRouterPolicy, LearnedRouter
from rlrouter.router.checkpoint import CheckpointError

TOPICS = ["geometry", "chemistry", "history", "music", "biology", "law", "poetry", "economics", "astronomy", "cooking"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("rlrouter-cache")


@pytest.fixture(scope="module")
def named_tier_table(tmp_path_factory):
    """Queries that say which model answers them: 'large' ones only the large model gets right."""
    path = tmp_path_factory.mktemp("table") / "named.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt", "weak", "strong"])
        for i in range(240):
            topic = TOPICS[i % len(TOPICS)]
            if i % 2:
                writer.writerow([f"Prove the hard theorem {i} of {topic}: only the large model solves this.", 0, 1])
            else:
                writer.writerow([f"Look up the easy fact {i} of {topic}: the small model answers this.", 1, 1])
    return path


def named_recipe(table, cache_dir, **embedding):
    return recipe_from_dict({
        "name": "named-tier",
        "world": {"kind": "replay", "source": "table", "table": str(table), "episode_length": 4,
                  "success_fraction": 1.0, "test_fraction": 0.25, "n_train": 60, "n_test": 12},
        "pool": {"tiers": [
            {"name": "small", "usd_per_1m_input": 0.4, "usd_per_1m_output": 1.6,
             "executor": {"kind": "recorded", "model": "weak"}},
            {"name": "large", "usd_per_1m_input": 2.0, "usd_per_1m_output": 8.0,
             "executor": {"kind": "recorded", "model": "strong"}}]},
        "synth": {"tasks": 60},
        "eval": {"tasks": 12, "budgets": ["none", "large_calls=1", "usd=0.0002"], "bootstrap": 20,
                 "policies": ["always-small", "always-large", "random", "knn", "mlp", "mf"], "random_p": [0.5],
                 "embedding": {"cache_dir": str(cache_dir), "thresholds": [0.3], **embedding}},
    })


@pytest.fixture(scope="module")
def named_eval(named_tier_table, cache_dir, tmp_path_factory):
    recipe = named_recipe(named_tier_table, cache_dir)
    out = tmp_path_factory.mktemp("named-eval")
    return recipe, job.eval_recipe(recipe, out_dir=out, progress=False), out


def test_each_embedding_router_sends_exactly_the_large_queries_to_large(named_eval):
    recipe, result, _ = named_eval
    env = recipe.make_env("test")
    prompts = env.world.table.prompts
    rows = [r for t in env.task_ids[:12] for r in env.world.rows_of(t)]
    large_share = sum("large model" in prompts[r] for r in rows) / len(rows)
    assert 0.2 < large_share < 0.8
    by_name = {(r["policy"], r["budget"]): r for r in result["rows"]}
    assert by_name[("always-large", "none")]["success"] == 1.0
    for kind in ROUTERS:
        row = by_name[(f"{kind}(t=0.3)", "none")]
        assert row["success"] == 1.0, kind
        assert row["large_fraction"] == pytest.approx(large_share), kind


def test_no_embedding_router_exceeds_a_budget(named_eval):
    _, result, _ = named_eval
    learned = [r for r in result["rows"] if r["policy"].split("(")[0] in ROUTERS]
    assert len(learned) == 3 * 3
    assert all(r["budget_violations"] == 0 for r in learned)
    episodes = [r for r in result["rows"] if r["budget"] == "large_calls=1" and r["policy"].startswith("knn")]
    assert episodes and all(r["large_fraction"] <= 1 / 4 + 1e-9 for r in episodes)  # at most one large call of 4


def test_results_carry_curves_and_the_saved_routers(named_eval):
    _, result, out = named_eval
    families = {(c["family"], c["budget"]) for c in result["curves"]}
    assert {("knn", "none"), ("mlp", "none"), ("mf", "none"), ("random", "none")} <= families
    knn = next(c for c in result["curves"] if c["family"] == "knn" and c["budget"] == "none")
    assert knn["apgr"] > next(c for c in result["curves"] if c["family"] == "random" and c["budget"] == "none")["apgr"]
    for kind in ROUTERS:
        assert (out / "routers" / f"{kind}.pt").is_file() and (out / "routers" / f"{kind}.json").is_file()
    assert (out / "pgr.png").is_file()
    assert "| none | knn |" in (out / "results.md").read_text()


def test_a_saved_router_reloads_with_identical_decisions(named_tier_table, cache_dir, tmp_path):
    recipe = named_recipe(named_tier_table, cache_dir)
    table = boundary_steps(recipe.make_env("train"), recipe.make_env("train").task_ids[:30], progress=False)
    encoder = SentenceEncoder(cache_dir=cache_dir)
    embeddings = encoder.encode(table.texts)
    settings = recipe.eval.embedding.fit_settings() | {"thresholds": "auto", "epochs": 5}
    views = [{"length": 4, "position": 1, "calls_left": {"large": 1}, "usd_left": None}] * 2
    for kind in ROUTERS:
        fitted = LearnedRouter.fit(kind, table, embeddings, settings, seed=3)
        fitted.save(tmp_path)
        loaded = LearnedRouter.load(tmp_path, kind)
        p_fit, p_load = fitted.predict(embeddings, table.numeric), loaded.predict(embeddings, table.numeric)
        assert np.array_equal(p_fit, p_load), kind
        assert loaded.thresholds == fitted.thresholds and len(fitted.thresholds) >= 2
        for t in fitted.thresholds:
            a, b = EmbeddingRouterPolicy(fitted, encoder, t), EmbeddingRouterPolicy(loaded, encoder, t)
            for p in p_fit[:50]:
                assert a.decide(p, views[0]) == b.decide(p, views[1])


def test_the_embedding_cache_serves_a_second_run_without_the_model(cache_dir):
    texts = ["route me to the small model", "a hard proof for the large one", "route me to the small model"]
    first = SentenceEncoder(cache_dir=cache_dir)
    a = first.encode(texts)
    assert a.shape == (3, 384) and np.allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
    second = SentenceEncoder(cache_dir=cache_dir)
    b = second.encode(texts)
    assert second.misses == 0 and second.hits == 3
    assert second._model is None  # nothing embedded, so the model was never loaded
    assert np.array_equal(a, b)


def _no_episode(*args, **kwargs):
    raise AssertionError("an episode was played before the inputs were checked")


def test_a_missing_embedding_model_fails_before_any_episode(named_tier_table, cache_dir, monkeypatch):
    monkeypatch.setattr(job, "boundary_runs", _no_episode)
    recipe = named_recipe(named_tier_table, cache_dir, model="/nonexistent/minilm")
    with pytest.raises(EmbeddingError, match=r"eval\.embedding\.model: /nonexistent/minilm not found"):
        job.eval_recipe(recipe, progress=False)


def test_a_folder_that_is_not_sentence_transformers_is_refused(named_tier_table, cache_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(job, "boundary_runs", _no_episode)
    (tmp_path / "config.json").write_text("{}")
    recipe = named_recipe(named_tier_table, cache_dir, model=str(tmp_path))
    with pytest.raises(EmbeddingError, match="is not a sentence-transformers folder"):
        job.eval_recipe(recipe, progress=False)


def test_an_empty_threshold_list_is_a_recipe_error(named_tier_table, cache_dir):
    with pytest.raises(RecipeError, match=r"eval\.embedding: thresholds must be 'auto' or a non-empty list"):
        named_recipe(named_tier_table, cache_dir, thresholds=[])


def test_a_world_without_training_tasks_has_no_boundary_data(cache_dir, monkeypatch):
    monkeypatch.setattr(job, "boundary_runs", _no_episode)
    recipe = recipe_from_dict({"world": {"kind": "synthetic", "n_train": 0, "n_test": 4},
                               "eval": {"tasks": 4, "policies": ["always-small", "knn"],
                                        "embedding": {"cache_dir": str(cache_dir)}}})
    with pytest.raises(ValueError, match="eval.embedding.split: the world has no 'train' tasks"):
        job.eval_recipe(recipe, progress=False)


def test_a_damaged_checkpoint_fails_before_any_episode(tmp_path, monkeypatch):
    monkeypatch.setattr(job, "boundary_runs", _no_episode)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    recipe = recipe_from_dict({"world": {"kind": "synthetic", "n_test": 4}, "eval": {"tasks": 4}})
    with pytest.raises(CheckpointError, match="no weights"):
        job.eval_recipe(recipe, checkpoint=tmp_path / "ckpt", out_dir=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_unknown_policy_names_are_refused_before_any_episode(monkeypatch):
    monkeypatch.setattr(job, "boundary_runs", _no_episode)
    recipe = recipe_from_dict({"world": {"kind": "synthetic", "n_test": 4}, "eval": {"tasks": 4}})
    with pytest.raises(ValueError, match=r"policies: unknown \['knm'\]"):
        job.eval_recipe(recipe, policies=["always-small", "knm"], progress=False)


def test_an_embedding_does_not_depend_on_the_texts_embedded_with_it(tmp_path):
    texts = ["a short step", "a much longer step text that pads every other text in its batch " * 4, "third"]
    together = SentenceEncoder(cache_dir=tmp_path / "a").encode(texts)
    alone = np.stack([SentenceEncoder(cache_dir=tmp_path / f"b{i}").encode([t])[0] for i, t in enumerate(texts)])
    assert np.array_equal(together, alone)


def test_a_fit_does_not_depend_on_what_ran_before_it(named_tier_table, cache_dir):
    import torch

    recipe = named_recipe(named_tier_table, cache_dir)
    env = recipe.make_env("train")
    table = boundary_steps(env, env.task_ids[:10], progress=False)
    embeddings = SentenceEncoder(cache_dir=cache_dir).encode(table.texts)
    settings = recipe.eval.embedding.fit_settings() | {"epochs": 2}
    for kind in ("mlp", "mf"):
        torch.manual_seed(1)
        first = LearnedRouter.fit(kind, table, embeddings, settings, seed=0).predict(embeddings, table.numeric)
        torch.rand(1000)  # other work moves the global generator
        second = LearnedRouter.fit(kind, table, embeddings, settings, seed=0).predict(embeddings, table.numeric)
        assert np.array_equal(first, second), kind
