#!/usr/bin/env bash
# gpu_all.sh -- issue 13's one-shot GPU measurement, for a lent H100/H200 (about 8 minutes).
#
# Steps, each a separate process under its own `timeout`, each writing one JSON file into $OUT
# (with the machine -- GPU name, driver, torch/triton/transformers/torchao versions --, the
# command and the date), so that a failure or a hang in one step loses none of the others:
#   tests     pytest -m gpu (test files holding GPU tests), pytest-timeout per test  tests.json
#   kernels   benchmarks/gpu_kernels.py's sweep: our Triton W4A16 kernels vs cuBLAS
#             fp16/bf16 F.linear vs torchao int4, Llama-3-8B shapes, M = 1..2048,
#             achieved GB/s vs a measured copy bandwidth                             kernels.json
#   decode    greedy decode tokens/s under torch.compile (static KV cache, CUDA
#             graphs): fp16 dense, awq_ao INT4 fp16, torchao int4 (bf16), awq_ao
#             bf16, bf16 dense, on 8 random-weight layers of Llama-3-8B width        decode.json
#   quantize  awq_ao.quantize(..., device="cuda") layer by layer on a 3-layer
#             Llama-3-8B-wide random bf16 model kept on the CPU: time, peak GPU
#             memory, per-block timeline, INT4-vs-float logits error                 quantize.json
#   summary   every step's status/exit code/time, headline numbers, issue 13's
#             targets                                                                gpu_all.json
# plus gpu_all.log (everything printed). 6 files: the device tool brings back at most 8.
# Each step gets a share of the time left (tests 25, kernels 30, decode 33, quantize 12), so
# time a step leaves unused goes to the next ones; inside a step, kernels takes the shapes and
# decode the variants in order of importance and stops before its cap (the JSON says what was
# not run). decode runs fp16 dense, awq_ao fp16 and torchao int4 first, the bf16 ones if time
# is left.
#
# The GPU machine has its own stack (python3 = /opt/torch/.venv, torch 2.11, Triton 3.6,
# transformers 5.17, no torchao) and no network. awq_ao runs from this tree through
# PYTHONPATH (no pip install of the project, no build). Carried wheels (benchmarks/.gpu_wheels,
# made by benchmarks/gpu_wheels.sh: torchao 0.18.0, which awq_ao needs and which supports
# torch >= 2.11) are installed with pip --no-index --no-deps into /tmp/gpu_all_state.*/site, only
# those whose distribution python3 lacks.
#
# ---- THE RUN-TOOL INVOCATION (one call; first: `bash benchmarks/gpu_wheels.sh` here) ----
#   run(command="bash benchmarks/gpu_all.sh --budget 450",
#       timeout_s=560,
#       carry=["benchmarks/.gpu_wheels"])
# --budget 450: the script ends about 450 s after it starts (wheels, set-up and the summary
# included); timeout_s 560 leaves room for a step killed at its cap. With the machine's start
# (1-2 min) that is about 10 of the session's 15 device minutes. Then copy the files from
# files_at into benchmarks/results/gpu/ and commit them. A second call starts a fresh machine
# (it stays warm 30 s): --steps kernels --budget 200 (say), or --quick, if 4+ minutes are left.
#
# Usage: bash benchmarks/gpu_all.sh [--budget S] [--steps a,b,...] [--out DIR] [--quick]
#                                   [--python PY] [--wheels DIR] [--dry-run] [--cpu-smoke]
#   --dry-run    no measurement even on a GPU: checks arguments, installs the wheels, runs each
#                step's skip path, writes the JSON files (on a CPU: "skipped: no CUDA GPU")
#   --cpu-smoke  tests this script's logic on a CPU: decode and quantize with a tiny model (the
#                timings mean nothing), pytest -m gpu (every GPU test skips); kernels skip
#   --quick      3 kernel shapes at M = 1 16 512, decode 3 variants x 4 layers, quantize 2 layers
#   --python PY  interpreter (default: $PYTHON or python3)
#   --out DIR    default: $OUT, else /tmp/gpu_all-<date>
#   --wheels DIR default: benchmarks/.gpu_wheels
# Environment: AWQ_AO_CPU_KERNELS (default 0 here: the C++ CPU kernels are not built; set
# auto to build them as a user's first CPU call would), PYTHON, OUT.
set -u -o pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2
ORIG_CMD="bash benchmarks/gpu_all.sh $*"

BUDGET=450
STEPS="tests,kernels,decode,quantize"
OUTDIR="${OUT:-}"
PY="${PYTHON:-python3}"
WHEELS="$REPO/benchmarks/.gpu_wheels"
DRY=0
SMOKE=0
QUICK=0

usage() { sed -n '2,/^set -u/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; }
die() { echo "gpu_all.sh: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
    case "$1" in
        --budget) [ $# -ge 2 ] || die "--budget needs a value"; BUDGET="$2"; shift 2 ;;
        --budget=*) BUDGET="${1#*=}"; shift ;;
        --steps) [ $# -ge 2 ] || die "--steps needs a value"; STEPS="$2"; shift 2 ;;
        --steps=*) STEPS="${1#*=}"; shift ;;
        --out) [ $# -ge 2 ] || die "--out needs a value"; OUTDIR="$2"; shift 2 ;;
        --out=*) OUTDIR="${1#*=}"; shift ;;
        --python) [ $# -ge 2 ] || die "--python needs a value"; PY="$2"; shift 2 ;;
        --python=*) PY="${1#*=}"; shift ;;
        --wheels) [ $# -ge 2 ] || die "--wheels needs a value"; WHEELS="$2"; shift 2 ;;
        --wheels=*) WHEELS="${1#*=}"; shift ;;
        --dry-run) DRY=1; shift ;;
        --cpu-smoke) SMOKE=1; shift ;;
        --quick) QUICK=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done
case "$BUDGET" in ''|*[!0-9]*) die "--budget takes whole seconds, got '$BUDGET'" ;; esac
[ "$BUDGET" -ge 60 ] || die "--budget must be at least 60 s, got $BUDGET"
STEP_LIST=()
IFS=',' read -r -a _steps <<< "$STEPS"
for s in "${_steps[@]}"; do
    case "$s" in
        tests|kernels|decode|quantize) STEP_LIST+=("$s") ;;
        '') ;;
        *) die "unknown step '$s' (tests, kernels, decode, quantize)" ;;
    esac
done
[ ${#STEP_LIST[@]} -gt 0 ] || die "--steps names no step"
command -v "$PY" >/dev/null 2>&1 || die "no interpreter '$PY'"
[ -n "$OUTDIR" ] || OUTDIR="/tmp/gpu_all-$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$OUTDIR" || die "cannot create $OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
STATE_DIR="$(mktemp -d /tmp/gpu_all_state.XXXXXX)"
STATE="$STATE_DIR/steps.tsv"
SITE="$STATE_DIR/site"  # the carried wheels are installed here (fresh for each run)
trap 'rm -rf "$STATE_DIR"' EXIT
: > "$STATE"

share() {
    case "$1" in tests) echo 25 ;; kernels) echo 30 ;; decode) echo 33 ;; quantize) echo 12 ;; esac
}

install_wheels() {
    local whls=() w need=()
    shopt -s nullglob
    whls=("$WHEELS"/*.whl)
    shopt -u nullglob
    if [ ${#whls[@]} -eq 0 ]; then
        echo "[wheels] none in $WHEELS (make them with: bash benchmarks/gpu_wheels.sh)"
        return 0
    fi
    while IFS= read -r w; do [ -n "$w" ] && need+=("$w"); done \
        < <("$PY" benchmarks/gpu_all.py missing-wheels "${whls[@]}")
    for w in "${whls[@]}"; do
        case " ${need[*]} " in *" $w "*) ;; *) echo "[wheels] already there, not installed: $(basename "$w")" ;; esac
    done
    if [ ${#need[@]} -eq 0 ]; then
        return 0
    fi
    echo "[wheels] installing into $SITE: $(for w in "${need[@]}"; do basename "$w"; done | tr '\n' ' ')"
    if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --disable-pip-version-check --target "$SITE" "${need[@]}"; then
        echo "[wheels] pip install failed; the steps go on (imports will say what is missing)"
    fi
}

main() {
    local t_start deadline step cap left rest_share s rc t0 wall extra=()
    t_start=$(date +%s)
    deadline=$((t_start + BUDGET))
    echo "[gpu_all] $(date -u +%Y-%m-%dT%H:%M:%SZ) $ORIG_CMD"
    echo "[gpu_all] repo $REPO, out $OUTDIR, python $PY, budget ${BUDGET}s, steps ${STEP_LIST[*]}" \
         "dry_run=$DRY cpu_smoke=$SMOKE quick=$QUICK"
    install_wheels
    export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
    export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
    export AWQ_AO_CPU_KERNELS="${AWQ_AO_CPU_KERNELS:-0}"  # C++ CPU kernels: not needed on the GPU
    export GPU_ALL_COMMAND="$ORIG_CMD"
    unset TRITON_INTERPRET
    command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi || echo "[gpu_all] no nvidia-smi"
    if timeout 120 "$PY" benchmarks/gpu_all.py info --save "$STATE_DIR/machine.json"; then
        export GPU_ALL_MACHINE_JSON="$STATE_DIR/machine.json"  # the steps reuse it
    else
        echo "[gpu_all] info failed (rc $?): each step reads the machine itself"
    fi

    [ "$DRY" = 1 ] && extra+=(--dry-run)
    if [ "$SMOKE" = 1 ]; then
        extra+=(--device cpu --model tiny --layers 2 --prompt 8 --warmup 2 --new-tokens 4
                --eager-tokens 2 --mode default --quant-model tiny --quant-layers 2
                --quant-dtype float32 --samples 4 --seq-len 32 --min-variant-s 5)
    elif [ "$QUICK" = 1 ]; then
        extra+=(--kernel-shapes q_proj/o_proj k_proj/v_proj down_proj --m 1 16 512
                --variants fp16_dense awq_ao_fp16 torchao_int4_bf16 --layers 4 --quant-layers 2)
    fi
    for step in "${STEP_LIST[@]}"; do
        left=$((deadline - $(date +%s) - 15))  # 15 s kept for the summary
        rest_share=0
        for s in "${STEP_LIST[@]}"; do
            if ! grep -q "^$s " "$STATE"; then rest_share=$((rest_share + $(share "$s"))); fi
        done
        cap=$((left * $(share "$step") / rest_share))
        [ "$cap" -lt 20 ] && cap=20
        echo
        echo "[gpu_all] ===== $step: up to ${cap}s ($(date -u +%H:%M:%S)) ====="
        t0=$(date +%s)
        # the step stops itself 10 s before its cap (and writes its JSON); timeout is for hangs
        timeout --signal=TERM --kill-after=10 "$cap" \
            "$PY" benchmarks/gpu_all.py "$step" --out "$OUTDIR" --budget $((cap - 10)) "${extra[@]}"
        rc=$?
        wall=$(( $(date +%s) - t0 ))
        echo "$step $rc $wall $cap" >> "$STATE"
        echo "[gpu_all] ===== $step: exit $rc after ${wall}s ====="
    done
    echo
    timeout 60 "$PY" benchmarks/gpu_all.py summary --out "$OUTDIR" --state "$STATE" --budget "$BUDGET" \
        "${extra[@]}"
    rc=$?
    echo "[gpu_all] done in $(( $(date +%s) - t_start ))s; files in $OUTDIR:"
    ls -la "$OUTDIR"
    return $rc
}

main 2>&1 | tee -a "$OUTDIR/gpu_all.log"
exit "${PIPESTATUS[0]}"
