#!/usr/bin/env bash
# Install what the tests need, then run the whole suite (slow integration tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
PY="${PYTHON:-python3}"
exec "$PY" -m pytest -q "$@"
