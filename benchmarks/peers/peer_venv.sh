# Sourced by the peer setup scripts: peer_venv NAME PACKAGE...
# Creates benchmarks/.venvs/NAME (if needed) and installs the pinned PACKAGEs into it. Idempotent:
# a stamp file records the package list; it is redone when the list or the calling script changes.
# torch is pinned to 2.13.0 by every caller: on these machines that takes the local CPU build
# (an unpinned torch pulls several GB of CUDA wheels). awq_ao itself is NOT installed: the
# benchmark runs the venv's python with PYTHONPATH set to the repository, so the same
# awq_ao.evaluation code measures perplexity for every method.
peer_venv() {
  local name=$1
  shift
  local root
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
  local venv="$root/benchmarks/.venvs/$name"
  local stamp="$venv/.peer-installed"
  local want="$*"
  if [ ! -x "$venv/bin/python" ]; then
    mkdir -p "$(dirname "$venv")"
    "${PYTHON:-python3}" -m venv "$venv"
  fi
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ ! "$0" -nt "$stamp" ]; then
    echo "$venv is up to date ($want)"
    return 0
  fi
  "$venv/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  "$venv/bin/python" -m pip install -q "$@"
  echo "$want" > "$stamp"
  echo "installed into $venv: $want"
}
