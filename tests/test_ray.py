"""The RL stage on a real local Ray cluster (one head node per session, started with
``ray start --head`` on 127.0.0.1): rollout actors play the same episodes as an
in-process run, a killed rollout actor's shard is played again, a Ray Train run matches
an in-process run and survives a killed learner, and ``ray job submit`` runs the cluster
recipe."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from envs import Budget
from rlrouter.router.episodes import EpisodeSpec
from rlrouter.router.generation import HFEngine
from rlrouter.rl.workers import LocalRollouts, RolloutWorker, shard_specs

ROOT = Path(__file__).resolve().parents[1]

def test_shards_are_contiguous_and_cover_every_episode_once():
    specs = list(range(10))
    assert shard_specs(specs, 3) == [[0, 1, 2], [3, 4, 5, 6], [7, 8, 9]]
    assert shard_specs(specs[:2], 4) == [[0], [1]]  # no empty shards
    with pytest.raises(ValueError, match="rollout workers must be >= 1"):
        shard_specs(specs, 0)


@pytest.mark.parametrize("section,field,value,match", [
    ("ray", "learner_workers", 0, "ray.learner_workers must be an integer >= 1"),
    ("ray", "rollout_cpus", -1, "ray.rollout_cpus must be a number >= 0"),
    ("ray", "max_rollout_restarts", 1.5, "ray.max_rollout_restarts must be an integer >= 0"),
    ("ray", "learner_gpu", 1, r"unknown field\(s\) \['learner_gpu'\]"),
    ("ray", "rollout_workers", 0, "ray.rollout_workers must be an integer >= 1"),
    ("rl", "rollout_shards", 0, "rl.rollout_shards must be >= 1"),
])
def test_ray_settings_name_the_bad_field(section, field, value, match):
    from rlrouter.config import RecipeError, recipe_from_dict

    with pytest.raises(RecipeError, match=match):
        recipe_from_dict({"name": "x", "stages": ["rl"], section: {field: value}})


def _specs(n: int) -> list[EpisodeSpec]:
    budgets = [Budget(), Budget(max_calls={"large": 2})]
    return [EpisodeSpec(f"train-{i % 20}", budgets[i % 2], seed=100 + i) for i in range(n)]


def _signature(rollouts) -> list:
    return [(r.spec, [(t.completion_ids, t.tier) for t in r.turns], r.success, r.cost_usd) for r in rollouts]


@pytest.fixture
def one_thread():
    """Ray gives each 1-CPU worker one torch thread; the in-process reference uses the same."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_ray_job_submit_runs_the_cluster_recipe_end_to_end(ray_cluster):
    """The README's command, against the session's head node."""
    job = subprocess.run(
        [sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--address", ray_cluster["dashboard"],
         "--working-dir", str(ROOT), "--", "rlrouter", "train", "recipes/ray-cluster.yaml", "--ray", "--quiet"],
        capture_output=True, text=True, timeout=900, cwd=ROOT)
    out = job.stdout + job.stderr
    assert job.returncode == 0, out[-4000:]
    assert "succeeded" in out.lower()
    # the driver's own lines (the learner's are forwarded to the job log too, but not
    # necessarily before the job ends)
    for line in ("== stage: rl", "last iteration: iteration 3,", "== stage: eval"):
        assert line in out, line
    table = [row for row in out.splitlines() if row.startswith("| ")]
    assert any("| bopo" in row or "bopo" in row.split("|")[1] for row in table[1:]), table


@pytest.mark.slow
def test_ray_rollout_actors_play_the_same_episodes_as_in_process_shards(trained, ray_cluster, one_thread):
    from rlrouter.distributed import RayRollouts
    from rlrouter.router.checkpoint import load_checkpoint

    recipe, checkpoint = trained
    model, tok, _ = load_checkpoint(checkpoint, recipe.pool.names)
    specs = _specs(12)
    local = LocalRollouts(RolloutWorker(HFEngine(model, tok, recipe.pool.names, 32), lambda: recipe.make_env("train"),
                                        "step"), shards=3)
    expected, local_stats = local.play(specs, seed=3, iteration=5, temperature=1.0)
    remote = RayRollouts(recipe, model, tok, "step", "train", shards=3, workers=2, cpus_per_worker=0.5)
    try:  # 3 shards on 2 actors: one actor plays two of them
        got, stats = remote.play(specs, seed=3, iteration=5, temperature=1.0)
    finally:
        remote.close()
    assert [r.spec for r in got] == specs  # every episode once, in order
    assert _signature(got) == _signature(expected)
    for a, b in zip(got, expected):
        for ta, tb in zip(a.turns, b.turns):
            np.testing.assert_allclose(ta.logprobs, tb.logprobs, atol=1e-5)
    assert [stats[f"shard{k}_episodes"] for k in range(3)] == [4, 4, 4]
    assert sorted(stats[f"shard{k}_actor"] for k in range(3)) in ([0, 0, 1], [0, 1, 1])
    assert stats["shard0_restarts"] == 0 and stats["shard0_generate_s"] > 0 and stats["shard0_queue_wait_s"] >= 0
    assert set(local_stats) <= set(stats)


@pytest.mark.slow
def test_a_killed_rollout_actor_is_restarted_and_its_episodes_played_again(trained, ray_cluster):
    """Executors with 50 ms of real HTTP latency make a shard take seconds; actor 0 is
    SIGKILLed mid-shard. The iteration still returns each episode exactly once, identical
    to an undisturbed run, and the pool's ledger shows the replayed calls."""
    import urllib.request

    from rlrouter.config import recipe_from_dict
    from rlrouter.distributed import RayRollouts
    from rlrouter.router.checkpoint import load_checkpoint
    from rlrouter.serve.local_pool import LocalPoolServer
    from tests.conftest import TINY

    base, checkpoint = trained
    with LocalPoolServer(delay_s=0.05) as pool:
        tiers = [{"name": "small", "usd_per_1m_input": 0.4, "usd_per_1m_output": 1.6,
                  "executor": {"kind": "simulated", "skill": 0.55, "endpoint": pool.base_url}},
                 {"name": "large", "usd_per_1m_input": 2.0, "usd_per_1m_output": 8.0,
                  "executor": {"kind": "simulated", "skill": 0.88, "endpoint": pool.base_url}}]
        recipe = recipe_from_dict({**TINY, "pool": {"tiers": tiers}})
        model, tok, _ = load_checkpoint(checkpoint, recipe.pool.names)
        specs = _specs(8)

        def ledger_calls() -> int:
            with urllib.request.urlopen(pool.base_url.replace("/v1", "/ledger")) as reply:
                return len(json.loads(reply.read())["calls"])

        rollouts = RayRollouts(recipe, model, tok, "step", "train", shards=2, cpus_per_worker=0.5, max_restarts=2)
        try:
            expected, _ = rollouts.play(specs, seed=1, iteration=0, temperature=1.0)
            undisturbed_calls = ledger_calls()
            assert undisturbed_calls == sum(len(r.turns) for r in expected)  # one HTTP call per agent step
            victim = rollouts.pids()[0]
            killed = threading.Event()

            def kill_mid_shard():
                deadline = time.time() + 60
                while ledger_calls() < undisturbed_calls + 6 and time.time() < deadline:
                    time.sleep(0.02)
                os.kill(victim, signal.SIGKILL)
                killed.set()

            threading.Thread(target=kill_mid_shard, daemon=True).start()
            got, stats = rollouts.play(specs, seed=1, iteration=0, temperature=1.0)
            assert killed.is_set()
            assert rollouts.pids()[0] != victim  # a new process
        finally:
            rollouts.close()
        assert stats["shard0_restarts"] == 1 and stats["shard1_restarts"] == 0
        assert [r.spec for r in got] == specs
        assert _signature(got) == _signature(expected)
        replayed = ledger_calls() - 2 * undisturbed_calls
        assert replayed > 0  # the killed shard's calls before the kill were made again


def _recipe_file(trained, tmp_path, name: str, **extra) -> tuple[Path, dict]:
    recipe = trained[0]
    rl = {"algorithm": "bopo", "iterations": 3, "tasks_per_iteration": 8, "group_size": 4, "tasks": 40,
          "budgets": ["none", "large_calls=2"], "learning_rate": 1e-3, "save_every": 1, "micro_batch_size": 8,
          "rollout_shards": 2, "out_dir": str(tmp_path / name / "rl")}
    data = {"name": "ray-test", "seed": 0, "stages": ["rl"], "world": recipe.world,
            "router": {"max_new_tokens": 32},
            "synth": {"tasks": 40, "out_dir": str(recipe.synth_dir())}, "sft": {"out_dir": str(trained[1])},
            "rl": rl, **extra}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, rl


def _metrics(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if not k.endswith("_s") and not k.endswith("restarts")}
            for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_a_ray_train_run_with_two_learners_matches_in_process_and_survives_a_killed_learner(
        trained, ray_cluster, tmp_path, one_thread):
    """The same recipe and seed in process and on Ray (2 rollout actors, 2 data-parallel
    learners): the episodes of every iteration are identical (same task order, routes,
    costs); the update statistics agree to 1e-4 (two learners sum their gradients in
    another order). One learner is SIGKILLed after the second checkpoint; Ray Train
    restarts the group, which resumes from the last checkpoint it reported."""
    import ray
    from ray.util.state import list_actors

    from rlrouter.config import load_recipe
    from rlrouter.pipeline import run_rl_stage

    local_path, _ = _recipe_file(trained, tmp_path, "local")
    run_rl_stage(load_recipe(local_path), progress=False)

    ray_path, rl = _recipe_file(trained, tmp_path, "ray", ray={"rollout_workers": 2, "rollout_cpus": 0.5,
                                                               "learner_workers": 2,
                                                               "learner_cpus": 0.5, "max_learner_failures": 2})
    state = Path(rl["out_dir"]) / "trainer_state" / "state.json"
    proc = subprocess.Popen([sys.executable, "-m", "rlrouter", "rl", str(ray_path), "--address", ray_cluster["gcs"],
                             "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    deadline = time.time() + 600
    # once iteration 2 is saved, iteration 1's checkpoint has been reported to Ray Train
    while not (state.is_file() and json.loads(state.read_text())["iteration"] >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.2)
    learners = [a for a in list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])]
    assert len(learners) == 2
    os.kill(learners[-1].pid, signal.SIGKILL)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]
    assert "resuming from the checkpoint of iteration" in output
    assert ray.is_initialized()

    local = _metrics(tmp_path / "local" / "rl-metrics.jsonl")
    remote = _metrics(tmp_path / "ray" / "rl-metrics.jsonl")
    assert [m["iteration"] for m in remote] == [1, 2, 3]
    episode_keys = ("episodes", "reward", "success", "cost_usd", "large_fraction", "well_formed", "generated_tokens",
                    "shard0_episodes", "shard1_episodes")
    for a, b in zip(local, remote):
        assert {k: a[k] for k in episode_keys} == {k: b[k] for k in episode_keys}
        for key in ("pg_loss", "entropy", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-7), key
    meta = json.loads((Path(rl["out_dir"]) / "rlrouter.json").read_text())
    assert meta["rl"]["iteration"] == 3 and meta["training"]["ray"]["learner_workers"] == 2
