#!/usr/bin/env bash
# benchmarks/.venvs/autoround: Intel's AutoRound for benchmarks/quality.py (methods autoround,
# autoround_light). auto-round 0.16.1 is a pure-Python wheel; transformers pinned to the
# project's own version. gguf and accelerate: transformers needs them to load the SmolLM2 GGUF.
set -euo pipefail
source "$(dirname "$0")/peer_venv.sh"
peer_venv autoround "torch==2.13.0" "auto-round==0.16.1" "transformers==5.24.0" "gguf==0.19.0" \
  "accelerate==1.15.0"
