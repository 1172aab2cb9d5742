#!/usr/bin/env bash
# Create benchmarks/.venvs/llamacpp with llama-cpp-python (built from source for this CPU) and
# gguf, for the llama.cpp variant of benchmarks/cpu_decode.py. This venv is separate from the
# project's .venv: llama.cpp is a peer the benchmark measures, never a dependency of awq_ao.
#
#     bash benchmarks/peers/llamacpp_setup.sh > /tmp/llamacpp_build.log 2>&1
#
# Idempotent: a stamp file records a finished install; delete the venv (or touch this script)
# to build again. The build targets the CPU it runs on (GGML_NATIVE=ON), so a venv built on one
# machine is not meant to be copied to another. Override the flags with LLAMACPP_CMAKE_ARGS.
# The flags, compiler and llama.cpp's own system info go to $VENV/build-info.json.
# torch is not installed here: the GGUF of the random-weight model is written by the project's
# venv (benchmarks/peers/llamacpp_peer.py) and only quantized here.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
VENV=benchmarks/.venvs/llamacpp
VERSION=0.3.36
CMAKE_ARGS_USED=${LLAMACPP_CMAKE_ARGS:-"-DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DGGML_OPENMP=ON"}
STAMP=$VENV/.llamacpp-installed
if [ -f "$STAMP" ] && [ "$STAMP" -nt "$0" ]; then
  echo "llama.cpp venv ready: $VENV"
  exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
  mkdir -p "$(dirname "$VENV")"
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
"$VENV/bin/python" -m pip install -q "gguf==0.19.0" numpy
start=$(date +%s)
# --no-cache-dir: never reuse a wheel built earlier with other flags or for another CPU
CMAKE_ARGS="$CMAKE_ARGS_USED" CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
  "$VENV/bin/python" -m pip install -v --no-cache-dir --no-binary llama-cpp-python \
  "llama-cpp-python==$VERSION"
end=$(date +%s)
CMAKE_ARGS_USED="$CMAKE_ARGS_USED" BUILD_SECONDS=$((end - start)) "$VENV/bin/python" - <<'PY' > "$VENV/build-info.json"
import json, os, platform, subprocess
import llama_cpp
info = {
    "llama_cpp_python": llama_cpp.__version__,
    "cmake_args": os.environ["CMAKE_ARGS_USED"],
    "build_seconds": int(os.environ["BUILD_SECONDS"]),
    "cc": subprocess.run(["cc", "--version"], capture_output=True, text=True).stdout.splitlines()[0],
    "cmake": subprocess.run(["cmake", "--version"], capture_output=True, text=True).stdout.splitlines()[0],
    "python": platform.python_version(),
    "system_info": llama_cpp.llama_print_system_info().decode(),
}
print(json.dumps(info, indent=1))
PY
cat "$VENV/build-info.json"
touch "$STAMP"
echo "llama.cpp venv ready: $VENV"
