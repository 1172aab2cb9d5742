#!/usr/bin/env bash
# benchmarks/.venvs/llmcompressor: llm-compressor's GPTQModifier and AWQModifier + GPTQModifier
# recipes for benchmarks/quality.py (methods llmc_gptq, llmc_awq_gptq).
# llmcompressor 0.14.0.1 requires transformers >= 5.15, <= 5.17 and compressed-tensors 0.19.
# gguf and accelerate: transformers needs them to load the SmolLM2 GGUF.
# (GPTQModel is not an option here: gptqmodel 7.7.0 requires torch >= 2.14.1, CUDA wheels.)
set -euo pipefail
source "$(dirname "$0")/peer_venv.sh"
peer_venv llmcompressor "torch==2.13.0" "llmcompressor==0.14.0.1" "transformers==5.17.0" \
  "compressed-tensors==0.19.0" "gguf==0.19.0" "accelerate==1.15.0"
