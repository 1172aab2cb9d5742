"""Memory and time of quantization: awq_ao sequential vs awq_ao in-memory vs torchao's AWQ.

Each (method, model, depth) runs in a fresh subprocess. The model is built directly in the
benchmark dtype; the peak RSS of the quantization phase (the kernel's high-water mark, reset
once the model is loaded: see peak_rss.py) is reported in total and as the increase over the
loaded model ("overhead").
Random weights are fine here: only memory and time are measured. All methods get the same
calibration batches and the same scale grid size.

    python benchmarks/memory.py                       # default sweep (Llama-1B width, 4/8/16 layers)
    python benchmarks/memory.py --models smollm2      # the real 135M model

Writes benchmarks/results/memory.json and prints a table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from peak_rss import current_mib, peak_mib, reset_peak

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # devtools/
    sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
METHODS = ["awq_ao_sequential", "awq_ao_sequential_spill", "awq_ao_sequential_spill_gptq", "awq_ao_in_memory",
           "torchao_awq"]
# a cheaper clipping search than the library default (time only: the clipping search keeps a
# [K/g, g, g] Gram per layer whatever its grid); torchao's AWQ does no clipping at all
CLIP_GRID = 10
CLIP_TOKENS = None


def _build(model_name: str, layers: int, dtype):
    import torch

    if model_name == "smollm2":
        from devtools.shared_data import load_smollm2

        model, _ = load_smollm2(dtype)
        if layers and layers < len(model.model.layers):
            model.model.layers = model.model.layers[:layers]
            model.config.num_hidden_layers = layers
        return model, model.config.vocab_size
    from transformers import LlamaConfig, LlamaForCausalLM

    # Llama-3.2-1B widths
    cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
                      num_key_value_heads=8, num_hidden_layers=layers, vocab_size=32000,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in the target dtype: no float32 copy at any point
    try:
        model = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(default)
    return model, cfg.vocab_size


def worker(method: str, model_name: str, layers: int, n_samples: int, seq_len: int, n_grid: int,
           dtype_name: str) -> dict:
    """Quantize with one method and report peak memory and time (runs in a fresh process)."""
    import torch

    # import both libraries before the baseline: their import cost is not quantization memory
    import torchao.prototype.awq  # noqa: F401

    import awq_ao
    from awq_ao.lowering.swap import model_size_bytes

    dtype = getattr(torch, dtype_name)
    model, vocab = _build(model_name, layers, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, vocab, (2, seq_len), generator=g) for _ in range(max(1, n_samples // 2))]
    loaded = current_mib()
    peak_kind = reset_peak()
    t0 = time.perf_counter()
    # sequential convert hands memory back after each block's search and after each block:
    # record resident memory and the peak so far at those points (over the loaded model)
    timeline: list[list[float]] = []
    import awq_ao.passes.sequential as seq

    release = seq.release_freed_memory

    def traced_release() -> None:
        release()
        timeline.append([round(time.perf_counter() - t0, 1), round(current_mib() - loaded), round(peak_mib() - loaded)])

    seq.release_freed_memory = traced_release
    if method.startswith("awq_ao"):
        sequential = method.startswith("awq_ao_sequential")
        # spill: rollback originals go to a temporary folder on disk instead of staying in memory
        spill = tempfile.mkdtemp(prefix="awq_ao_memory_") if "_spill" in method else None
        # rows measured before gptq became the default pinned "nearest"; "_gptq" rows use it
        rounding = "gptq" if method.endswith("_gptq") else "nearest"
        try:
            awq_ao.quantize(model, data, bits=4, group_size=128 if model_name != "smollm2" else 64,
                            n_grid=n_grid, max_search_samples=n_samples, verbose=False, progress=False,
                            clip_grid=CLIP_GRID, clip_tokens=CLIP_TOKENS,
                            sequential=sequential, spill_dir=spill, rounding=rounding)
        finally:
            if spill is not None:
                shutil.rmtree(spill, ignore_errors=True)
    else:
        from torchao.prototype.awq import AWQConfig
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
        from torchao.quantization import quantize_

        base = PrototypeInt4WeightOnlyConfig(group_size=128 if model_name != "smollm2" else 64)

        def keep(m, fqn):
            return isinstance(m, torch.nn.Linear) and "lm_head" not in fqn

        quantize_(model, AWQConfig(base, step="prepare", scale_search_space_size=n_grid), filter_fn=keep)
        with torch.no_grad():
            for b in data:
                model(b, use_cache=False)
        quantize_(model, AWQConfig(base, step="convert", scale_search_space_size=n_grid), filter_fn=keep)
    wall = time.perf_counter() - t0
    peak = peak_mib()
    after = current_mib()
    qsize = model_size_bytes(model) / 2**20
    return {"method": method, "model": model_name, "layers": layers, "params": n_params,
            "dtype": dtype_name, "rss_loaded_mib": loaded, "peak_rss_mib": peak,
            "overhead_mib": peak - loaded, "rss_after_mib": after, "quantized_model_mib": qsize, "quant_s": wall,
            "peak_measured_by": peak_kind, "timeline_s_rss_peak_mib": timeline}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="llama1b")
    ap.add_argument("--layers", default="4,8,16")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--n-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--n-grid", type=int, default=5)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                    help="model dtype (torchao's CPU INT4 linear is ~100x slower in float32)")
    ap.add_argument("--out", default=str(RESULTS / "memory.json"))
    ap.add_argument("--resume", action="store_true", help="keep finished rows of --out, run the rest")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        method, model_name, layers = args.worker.split(":")
        print("RESULT " + json.dumps(worker(method, model_name, int(layers), args.n_samples,
                                            args.seq_len, args.n_grid, args.dtype)), flush=True)
        return
    import platform

    import torch
    import torchao

    out_path = Path(args.out)
    calib_desc = (f"{args.n_samples} x {args.seq_len} random tokens, {args.dtype}, n_grid {args.n_grid}; "
                  f"awq_ao clipping: clip_grid {CLIP_GRID}, clip_tokens {CLIP_TOKENS or 'all'}")
    rows: list[dict] = []
    if args.resume and out_path.exists():
        old = json.loads(out_path.read_text())
        if old.get("calibration") == calib_desc:
            rows = [r for r in old["rows"] if "error" not in r]

    def write() -> None:
        doc = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
               "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
               "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                           "torch": torch.__version__, "torchao": torchao.__version__},
               "calibration": calib_desc,
               "rows": rows}
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(doc, indent=2))

    for model_name in args.models.split(","):
        for layers in [int(x) for x in args.layers.split(",")]:
            for m in args.methods.split(","):
                if any(r["method"] == m and r["model"] == model_name and r["layers"] == layers for r in rows):
                    continue
                cmd = [sys.executable, __file__, "--worker", f"{m}:{model_name}:{layers}",
                       "--n-samples", str(args.n_samples), "--seq-len", str(args.seq_len),
                       "--n-grid", str(args.n_grid), "--dtype", args.dtype]
                print(f"running {m} {model_name} x{layers} layers ...", flush=True)
                proc = subprocess.run(cmd, capture_output=True, text=True)
                line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                if proc.returncode != 0 or not line:
                    err = (proc.stderr.strip().splitlines() or ["?"])[-1]
                    rows.append({"method": m, "model": model_name, "layers": layers, "error": err})
                    print(f"  failed: {err}", flush=True)
                    continue
                r = json.loads(line[0][len("RESULT "):])
                rows.append(r)
                write()
                print(f"  peak {r['peak_rss_mib']:.0f} MiB (overhead {r['overhead_mib']:.0f} MiB), {r['quant_s']:.0f}s", flush=True)
    print("\n| model | layers | method | peak RSS (MiB) | over loaded model (MiB) | time (s) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['layers']} | {r['method']} | failed: {r['error']} | | |")
        else:
            print(f"| {r['model']} | {r['layers']} | {r['method']} | {r['peak_rss_mib']:.0f} | "
                  f"{r['overhead_mib']:.0f} | {r['quant_s']:.0f} |")
    write()
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
