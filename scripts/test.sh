#!/usr/bin/env bash
# Set up (if needed) and run the default test suite (slow and GPU tests are skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/python -m ruff check awq_ao tests benchmarks devtools
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
