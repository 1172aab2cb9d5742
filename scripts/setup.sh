#!/usr/bin/env bash
# Create .venv (if needed) and install awq_ao with its test and GGUF extras.
# torch is pinned to 2.13.0: on these machines that takes the local CPU build instead of
# several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
STAMP=.venv/.awq_ao-installed
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[test,gguf,interop]"
  touch "$STAMP"
fi
