"""Quality benchmark: FP vs RTN vs awq_ao (and its ablations) vs torchao's AWQ prototype vs
peer 4-bit tools (llm-compressor GPTQ and AWQ+GPTQ, AutoRound) on SmolLM2-135M, or with
``--model gemma3`` on Gemma 3 270M (base; lay it out first with
``bash benchmarks/peers/second_model_setup.sh``).

Every method sees the same calibration blocks and the same WikiText-2 windows (the same
texts and code for both models, each with its own tokenizer; where the tokenizer prepends a
BOS of its own, Gemma's ``<bos>``, every window and calibration block starts with it and
holds one text token less, see ``awq_ao.evaluation.leading_bos``; SmolLM2's prepends none). Each
(method, setting) runs in its own subprocess so that wall time and peak memory (ru_maxrss)
of the quantization step are measured in isolation.

    python benchmarks/quality.py                 # all settings, 40 windows
    python benchmarks/quality.py --windows 148   # the whole test set
    python benchmarks/quality.py --methods fp,rtn,awq_ao,llmc_gptq,llmc_awq_gptq,autoround,autoround_light
    python benchmarks/quality.py --model gemma3  # -> benchmarks/results/quality_gemma3.json

Smoke test of one method (about a minute plus its quantization):
``--methods rtn --settings 4:64 --windows 1 --n-samples 8 --out /tmp/q.json``
(``--autoround-iters 2`` for the AutoRound rows).

Peers run in their own virtual environments, never in the project's: create them with
``bash benchmarks/peers/llmcompressor_setup.sh`` and ``bash benchmarks/peers/autoround_setup.sh``
(``benchmarks/.venvs/<name>``); the worker runs that venv's python with awq_ao on PYTHONPATH,
so the same awq_ao.evaluation code measures perplexity. A missing venv is a recorded skip.
Peers quantize the float32 model and are evaluated fake-quantized (see benchmarks/peers/).

Writes benchmarks/results/quality.json (``--model gemma3``: quality_gemma3.json) and prints
a table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from peak_rss import current_mib, peak_mib, reset_peak

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # devtools/
from devtools.shared_data import MODELS  # noqa: E402  (imports torch: so does _machine())

RESULTS = ROOT / "benchmarks" / "results"

SETTINGS = [(4, 64), (3, 64), (4, 128)]
# awq_ao variants: options passed on top of the library defaults ("awq_ao": none at all)
AWQ_AO_METHODS: dict[str, dict] = {
    "awq_ao": {},
    "awq_ao_nearest": {"sequential": True, "rounding": "nearest"},
    "awq_ao_in_memory_nearest": {"sequential": False, "rounding": "nearest"},
    "awq_ao_sequential_gptq": {"sequential": True, "rounding": "gptq"},
    # ablations of the default (AWQ scales + clipping + GPTQ-style rounding):
    # GPTQ-style rounding alone. awq_ao has no option for error-feedback rounding without a
    # calibration-driven step (scale_search=False, clip=False means no calibration, so plain
    # RTN): clip=True with max_shrink=0.0 leaves the clipping search one candidate, ratio 1,
    # i.e. no clipping, while the input Grams are still collected for the rounding.
    "awq_ao_gptq_only": {"scale_search": False, "max_shrink": 0.0},
    # clipping + GPTQ-style rounding, no AWQ scales
    "awq_ao_no_scales": {"scale_search": False},
    # AWQ scales + GPTQ-style rounding, no clipping
    "awq_ao_no_clip": {"clip": False},
    # the defaults + 32 steps of block-output refinement per block (block_refine_steps)
    "awq_ao_refine32": {"block_refine_steps": 32},
}
# peers, each in its own venv: method -> venv name (benchmarks/.venvs/<name>, made by
# benchmarks/peers/<name>_setup.sh)
PEERS: dict[str, str] = {
    "llmc_gptq": "llmcompressor",
    "llmc_awq_gptq": "llmcompressor",
    "autoround": "autoround",
    "autoround_light": "autoround",
}
# peers that cannot be installed here: a row with the reason, every setting
NOT_INSTALLABLE = {
    "gptqmodel": "not run: gptqmodel 7.7.0 requires torch>=2.14.1 (only CUDA builds of that torch; "
                 "pip's resolver refuses it next to torch==2.13.0 CPU); llmc_gptq is the GPTQ row",
}
METHODS = ["fp", "rtn", *AWQ_AO_METHODS, "torchao_awq", *PEERS, *NOT_INSTALLABLE]
# torchao's CPU INT4 weight (Int4OpaqueTensor) runs its linear ~100x slower in float32 than
# in bfloat16 (measured 5.07 s vs 0.047 s for 2048 tokens x 576 -> 1536 on one core), which
# makes its AWQ search (20 quantized linears on all calibration tokens per layer) take days;
# so torchao's AWQ runs on the bfloat16 model, and "fp_bf16" gives the bf16 model's own
# perplexity for reference. Every other method runs in float32.
BF16_METHODS = {"torchao_awq", "fp_bf16"}


def peer_python(method: str) -> Path:
    """The python of the venv a peer method runs in."""
    return ROOT / "benchmarks" / ".venvs" / PEERS[method] / "bin" / "python"


def peer_setup_script(method: str) -> str:
    return f"benchmarks/peers/{PEERS[method]}_setup.sh"


# --model: default results file (benchmarks/results/<name>) and known per-model skips
DEFAULT_OUT = {"smollm2": "quality.json", "gemma3": "quality_gemma3.json"}
TORCHAO_G128_SKIP = {
    "smollm2": "not run: hidden size 576 is not a multiple of 128, torchao skips those layers",
}


def worker(method: str, bits: int, group_size: int, windows: int, n_samples: int, seq_len: int,
           calib: str, search_samples: int, autoround_iters: int | None = None,
           model_name: str = "smollm2", calib_offset: int = 0) -> dict:
    """Quantize with one method and measure perplexity (runs in a fresh process)."""
    import torch

    # peers' venvs hold neither torchao nor awq_ao's kernels: only awq_ao.evaluation (and the
    # repository's shared-data helpers) are imported
    from awq_ao.evaluation import batches, calibration_blocks, leading_bos, perplexity, text_ids
    from devtools.shared_data import calibration_text, load_model, wikitext_test

    torch.manual_seed(0)
    dtype = torch.bfloat16 if method in BF16_METHODS else torch.float32
    model, tok = load_model(model_name, dtype)
    bos = leading_bos(tok)  # None for SmolLM2: its windows and blocks are as they always were
    ids = text_ids(tok, wikitext_test(), bos)
    blocks = calibration_blocks(tok, calibration_text(calib), n_samples, seq_len, bos_token_id=bos,
                                offset=calib_offset)
    rss_loaded = current_mib()
    peak_kind = reset_peak()
    out: dict = {"method": method, "bits": bits, "group_size": group_size, "dtype": str(dtype).removeprefix("torch.")}
    if bos is not None:
        out["bos_token_id"] = bos  # each window / calibration block: this BOS + its tokens
    t0 = time.perf_counter()
    if method in PEERS:
        from peers import quality_peers

        if method in quality_peers.LLMC_METHODS:
            out.update(quality_peers.llmcompressor_quantize(model, tok, blocks, method, bits, group_size))
        else:
            model, info = quality_peers.autoround_quantize(model, tok, blocks, method, bits, group_size,
                                                           iters=autoround_iters)
            out.update(info)
    elif method == "rtn":
        import awq_ao

        awq_ao.quantize(model, None, bits=bits, group_size=group_size, scale_search=False,
                        clip=False, verbose=False, progress=False)
    elif method in AWQ_AO_METHODS:
        import awq_ao

        extra = AWQ_AO_METHODS[method]
        out["options"] = extra
        rep = awq_ao.quantize(model, list(batches(blocks, 8)), bits=bits, group_size=group_size,
                              max_search_samples=search_samples, verbose=False, progress=False, **extra)
        out["report"] = {"mode": rep.mode, "error_feedback": rep.error_feedback,
                         "groups": rep.kind_counts(), "folded": rep.folded,
                         "explicit_multiplies": rep.fallback_multiplies,
                         "quantized_linears": len(rep.quantized), "times": rep.times}
    elif method == "torchao_awq":
        quantized = _torchao_awq(model, blocks, bits, group_size)
        out["torchao_quantized_linears"] = quantized
    if method not in ("fp", "fp_bf16"):
        out["quant_s"] = time.perf_counter() - t0
        out["peak_rss_mib_during_quant"] = peak_mib()
        out["peak_measured_by"] = peak_kind
        out["rss_mib_before_quant"] = rss_loaded
    ppl, n = perplexity(model, ids, 2048, windows, bos_token_id=bos)
    out.update(perplexity=ppl, windows=n)
    if method not in PEERS:  # peers' models are fake-quantized float32: their size says nothing
        from awq_ao.lowering.swap import model_size_bytes

        out["size_mib"] = model_size_bytes(model) / 2**20
    return out


def _torchao_awq(model, blocks, bits: int, group_size: int) -> int:
    """torchao.prototype.awq on CPU: prepare, calibrate, convert. Returns #linears quantized."""
    import torch
    from torchao.prototype.awq import AWQConfig
    from torchao.quantization import quantize_

    if bits == 4:
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

        base = PrototypeInt4WeightOnlyConfig(group_size=group_size)
    else:
        from torchao.quantization import IntxWeightOnlyConfig
        from torchao.quantization.granularity import PerGroup

        base = IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{bits}"), granularity=PerGroup(group_size))

    def keep(m, fqn):
        return isinstance(m, torch.nn.Linear) and "lm_head" not in fqn

    quantize_(model, AWQConfig(base, step="prepare"), filter_fn=keep)
    with torch.no_grad():
        for i in range(0, blocks.shape[0], 8):
            model(blocks[i : i + 8], use_cache=False)
    quantize_(model, AWQConfig(base, step="convert"), filter_fn=keep)
    n = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and "lm_head" not in name and type(m.weight) is not torch.nn.Parameter:
            n += 1
    return n


def _error_line(stderr: str) -> str:
    """The exception line of a worker's traceback (else its last stderr line)."""
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        head = ln.split(":", 1)[0]
        if head.endswith(("Error", "Exception")) and " " not in head:
            return ln
    return lines[-1] if lines else "?"


def _machine() -> dict:
    import torch
    import torchao
    import transformers

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "torchao": torchao.__version__,
            "transformers": transformers.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="smollm2",
                    help="benchmark model (devtools.shared_data.load_model); gemma3 needs "
                         "bash benchmarks/peers/second_model_setup.sh")
    ap.add_argument("--windows", type=int, default=40, help="2048-token WikiText-2 test windows (1 for a smoke test)")
    ap.add_argument("--n-samples", type=int, default=32, help="calibration blocks (8 for a smoke test)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--search-samples", type=int, default=16)
    ap.add_argument("--calib", default="wiki.valid.tokens")
    ap.add_argument("--calib-offset", type=int, default=0,
                    help="skip this many calibration blocks first: another calibration draw for every method (default 0)")
    ap.add_argument("--settings", default=",".join(f"{b}:{g}" for b, g in SETTINGS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", default=None, help="results JSON (default: benchmarks/results/"
                    "quality.json, for --model gemma3 quality_gemma3.json)")
    ap.add_argument("--resume", action="store_true",
                    help="keep rows already in --out (same eval/calibration) and run only missing jobs")
    ap.add_argument("--autoround-iters", type=int, default=None,
                    help="override the AutoRound recipes' iters (smoke tests only; recorded in the row)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        method, bits, gs = args.worker.split(":")
        res = worker(method, int(bits), int(gs), args.windows, args.n_samples, args.seq_len,
                     args.calib, args.search_samples, args.autoround_iters, args.model, args.calib_offset)
        print("RESULT " + json.dumps(res), flush=True)
        return
    settings = [tuple(int(v) for v in s.split(":")) for s in args.settings.split(",")]
    methods = args.methods.split(",")
    rows: list[dict] = []
    if args.out is None:
        args.out = str(RESULTS / DEFAULT_OUT[args.model])
    out_path = Path(args.out)
    eval_desc = f"WikiText-2 test, non-overlapping 2048-token windows, first {args.windows}"
    calib_desc = f"{args.n_samples} x {args.seq_len} tokens from {args.calib} (same for all methods)"
    if args.calib_offset:  # another draw: its own description, so --resume never mixes draws
        calib_desc = calib_desc.replace(" tokens from ", f" tokens after the first {args.calib_offset} blocks of ")
    if args.model != "smollm2":  # SmolLM2's tokenizer prepends no BOS: its strings stay as they were
        eval_desc += " (each: the tokenizer's BOS + 2047 text tokens, 2047 tokens scored)"
        calib_desc += " (each block: the tokenizer's BOS + seq_len - 1 text tokens)"
    if args.resume and out_path.exists():
        old = json.loads(out_path.read_text())
        if (old.get("eval") == eval_desc and old.get("calibration") == calib_desc
                and old.get("model_name", "smollm2") == args.model):
            rows = [r for r in old["rows"] if "perplexity" in r]
            print(f"resuming: {len(rows)} rows kept from {out_path}", flush=True)

    def done(m: str, bits: int, gs: int) -> bool:
        return any(r["method"] == m and (m in ("fp", "fp_bf16") or (r["bits"], r["group_size"]) == (bits, gs)) for r in rows)

    def write() -> None:
        doc = {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "machine": _machine(),
            "model": MODELS[args.model],
            "model_name": args.model,
            "eval": eval_desc,
            "calibration": calib_desc,
            "awq_ao_search_samples": args.search_samples,
            "peer_venvs": {v: f"benchmarks/.venvs/{v}" for v in sorted(set(PEERS.values()))},
            "rows": rows,
        }
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=2))
        tmp.replace(out_path)

    jobs: list[tuple[str, int, int]] = []
    for m in ("fp", "fp_bf16"):
        if m in methods:
            jobs.append((m, 16, -1))
    for bits, gs in settings:
        for m in methods:
            if m in ("fp", "fp_bf16"):
                continue
            if m == "torchao_awq" and gs == 128 and args.model in TORCHAO_G128_SKIP:
                rows.append({"method": m, "bits": bits, "group_size": gs, "error": TORCHAO_G128_SKIP[args.model]})
                continue
            if m in NOT_INSTALLABLE:
                rows.append({"method": m, "bits": bits, "group_size": gs, "error": NOT_INSTALLABLE[m]})
                continue
            jobs.append((m, bits, gs))
    for m, bits, gs in jobs:
        if done(m, bits, gs):
            continue
        python, env = sys.executable, None
        if m in PEERS:
            python = str(peer_python(m))
            if not Path(python).is_file():
                msg = (f"skipped: venv benchmarks/.venvs/{PEERS[m]} not found; "
                       f"create it with: bash {peer_setup_script(m)}")
                print(f"{m} INT{bits} g{gs}: {msg}", flush=True)
                rows.append({"method": m, "bits": bits, "group_size": gs, "error": msg, "skipped": True})
                write()
                continue
            # awq_ao from this checkout (not installed in the peer venv): awq_ao.evaluation only
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
        cmd = [python, __file__, "--worker", f"{m}:{bits}:{gs}", "--model", args.model, "--windows", str(args.windows),
               "--n-samples", str(args.n_samples), "--seq-len", str(args.seq_len),
               "--search-samples", str(args.search_samples), "--calib", args.calib,
               "--calib-offset", str(args.calib_offset)]
        if args.autoround_iters is not None and m in PEERS:
            cmd += ["--autoround-iters", str(args.autoround_iters)]
        print(f"running {m}" + ("" if m in ("fp", "fp_bf16") else f" INT{bits} g{gs}") + " ...", flush=True)
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            err = _error_line(proc.stderr)
            row = {"method": m, "bits": bits, "group_size": gs, "error": err, "returncode": proc.returncode}
            if m in PEERS:
                row["stderr_tail"] = proc.stderr.strip().splitlines()[-15:]
            rows.append(row)
            write()
            print(f"  failed: {err}", flush=True)
            continue
        res = json.loads(line[0][len("RESULT "):])
        res["wall_s"] = time.perf_counter() - t
        rows.append(res)
        write()
        print(f"  ppl {res['perplexity']:.3f} ({res['windows']} windows)"
              + (f", quantized in {res['quant_s']:.0f}s, peak RSS {res['peak_rss_mib_during_quant']:.0f} MiB" if "quant_s" in res else ""),
              flush=True)
    fp = next((r["perplexity"] for r in rows if r["method"] == "fp" and "perplexity" in r), None)
    print("\n| setting | method | perplexity | gap closed | quant time (s) | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|")
    for bits, gs in settings:
        rtn = next((r.get("perplexity") for r in rows if r["method"] == "rtn" and r["bits"] == bits and r["group_size"] == gs), None)
        for r in rows:
            if r["method"] in ("fp", "fp_bf16") or r["bits"] != bits or r["group_size"] != gs:
                continue
            if "perplexity" not in r:
                print(f"| INT{bits} g{gs} | {r['method']} | — ({r['error']}) | | | |")
                continue
            closed = ""
            if fp is not None and rtn is not None and r["method"] != "rtn" and rtn != fp:
                closed = f"{100 * (rtn - r['perplexity']) / (rtn - fp):.0f}%"
            print(f"| INT{bits} g{gs} | {r['method']} | {r['perplexity']:.3f} | {closed} | "
                  f"{r.get('quant_s', 0):.0f} | {r.get('peak_rss_mib_during_quant', 0):.0f} |")
    if fp is not None:
        print(f"| FP32 | fp | {fp:.3f} | | | |")
    write()
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
