"""Shared fixtures. The RouteLLM recordings are read in place from shared/data/routellm."""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from envs.worlds.replay import default_routellm_dir  # noqa: E402

# The session's Ray cluster (``ray_cluster``) uses Ray's token authentication with a token of
# this session, so a token left in ~/.ray by another cluster cannot lock the clients out. Set
# before anything imports Ray (it reads them once); child processes inherit them.
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))

ROUTELLM_DIR = default_routellm_dir()


@pytest.fixture(scope="session")
def routellm_dir() -> Path:
    if not (ROUTELLM_DIR / "mmlu").is_dir():
        pytest.skip(f"RouteLLM recordings not found at {ROUTELLM_DIR} (set RLROUTER_ROUTELLM_DIR)")
    return ROUTELLM_DIR


@pytest.fixture(scope="session")
def mmlu_table(routellm_dir):
    from envs.worlds.replay import load_routellm

    return load_routellm(routellm_dir, "mmlu")


TINY = {
    "name": "tiny-test",
    "seed": 0,
    "world": {"kind": "synthetic", "n_train": 40, "n_test": 10, "max_length": 8},
    "synth": {"tasks": 40, "samples": 2, "n_strata": 2, "boundary_k": 2},
    "sft": {"epochs": 12, "batch_size": 4, "learning_rate": 5e-3, "logging_steps": 10},
    "router": {"max_new_tokens": 32, "batch_size": 16},
    "env": {"cost_lambda": 2.0},
}


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A tiny router fine-tuned on 40 short synthesized tasks (one per session, ~1 min)."""
    from rlrouter.config import recipe_from_dict
    from rlrouter.pipeline import run_sft_stage, run_synth

    root = tmp_path_factory.mktemp("router")
    recipe = recipe_from_dict({**TINY, "synth": {**TINY["synth"], "out_dir": str(root / "synth")},
                               "sft": {**TINY["sft"], "out_dir": str(root / "sft")}})
    run_synth(recipe, progress=False)
    checkpoint = run_sft_stage(recipe, progress=False)
    return recipe, checkpoint


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray head node per session, started as a user starts one (``ray start
    --head``) on 127.0.0.1 with 2 CPUs; this process joins it. Yields its GCS address and
    the dashboard URL that ``ray job submit`` talks to."""
    import os
    import subprocess

    import ray

    from rlrouter.serve.local_pool import free_port

    gcs_port, dashboard_port = free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    ray_cli = [sys.executable, "-m", "ray.scripts.scripts"]
    started = subprocess.run([*ray_cli, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
                              "--num-cpus=2", "--num-gpus=0", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                              f"--dashboard-port={dashboard_port}", "--disable-usage-stats"],
                             capture_output=True, text=True, env=env, timeout=300)
    if started.returncode != 0:
        raise RuntimeError(f"ray start --head failed:\n{started.stdout[-2000:]}\n{started.stderr[-2000:]}")
    address = f"127.0.0.1:{gcs_port}"
    ray.init(address=address)
    try:
        yield {"gcs": address, "dashboard": f"http://127.0.0.1:{dashboard_port}"}
    finally:
        ray.shutdown()
        subprocess.run([*ray_cli, "stop", "--force"], capture_output=True, timeout=120)


def start_http_server(command: list[str], env: dict, log_path, health_url: str, timeout_s: float = 300):
    """Start a server process (output to ``log_path``) and wait until ``health_url`` answers
    200; the error quotes the log's end when it exits or does not come up. Returns
    ``(process, log file)`` for :func:`stop_http_server`."""
    import subprocess
    import time

    import httpx

    log = open(log_path, "w")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=Path(log_path).parent)
    deadline = time.time() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {Path(log_path).read_text()[-3000:]}")
        try:
            if httpx.get(health_url, timeout=2).status_code == 200:
                return proc, log
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"server did not start: {Path(log_path).read_text()[-3000:]}")
        time.sleep(1)


def stop_http_server(proc, log) -> None:
    import subprocess

    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()
