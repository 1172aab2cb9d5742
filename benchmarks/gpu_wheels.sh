#!/usr/bin/env bash
# gpu_wheels.sh -- download the wheels that benchmarks/gpu_all.sh installs on the lent GPU
# machine (no network there), into benchmarks/.gpu_wheels/ (git-ignored), to be passed to the
# device tool as carry=["benchmarks/.gpu_wheels"].
#
# That machine has python 3.12 (/opt/torch/.venv) with torch 2.11, Triton 3.6, transformers
# 5.17, safetensors, tqdm, hypothesis, pytest, pytest-timeout and numpy, but no torchao, which
# awq_ao imports for its config and weight tensor. torchao 0.18.0 (a cp310-abi3 wheel, about
# 3.4 MB) loads its C++ extensions only on torch >= 2.11, and is the version awq_ao is tested
# with here. Its METADATA requires nothing outside its 'dev' extra, so it is the only wheel.
#
#   bash benchmarks/gpu_wheels.sh                 # torchao==0.18.0
#   bash benchmarks/gpu_wheels.sh NAME==VER ...   # more (each with its own version; no deps)
#
# gpu_all.sh installs a carried wheel only where python3 lacks its distribution, so a wheel
# never shadows the machine's own version of a package. The carried tree is limited to 64 MiB
# in all (working tree included): this script prints the folder's size.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=benchmarks/.gpu_wheels
PYTHON="${PYTHON:-python3}"
mkdir -p "$DEST"
pkgs=("$@")
[ ${#pkgs[@]} -gt 0 ] || pkgs=("torchao==0.18.0")
for p in "${pkgs[@]}"; do
    name="${p%%[=<>!~]*}"
    # one version of each distribution: an older wheel of the same name would stop the install
    find "$DEST" -maxdepth 1 -iname "$(echo "$name" | tr '-' '_')-*.whl" ! -iname "*-${p##*==}-*" -print -delete
    "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
        --disable-pip-version-check -q -d "$DEST" "$p"
done
ls -la "$DEST"
echo "carry size: $(du -sh "$DEST" | cut -f1) (wheels); working tree + carry must stay under 64 MiB"
