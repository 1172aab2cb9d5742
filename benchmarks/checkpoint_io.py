"""Checkpoint I/O benchmark: save / load time and peak memory of awq_ao checkpoints of SmolLM2-135M
(INT4, group 64) in all three formats, against the full-precision (float32) checkpoint.

Steps (every measurement runs in a fresh subprocess, so peak RSS is that of one operation):

1. ``awq-ao quantize`` SmolLM2-135M-Instruct (the shared GGUF, dequantized to float32) with
   AWQ INT4 g64 into ``<work>/awq_ao`` (skipped with ``--reuse`` when it exists);
2. the float32 model is saved with ``save_pretrained`` (safetensors) into ``<work>/fp32``;
3. the quantized checkpoint is loaded and re-saved as awq_ao, autoawq and compressed-tensors
   (``save_quantized``; each write is fsynced);
4. each checkpoint is loaded ``--repeats`` times (``load_quantized``; ``from_pretrained`` for
   float32) and its logits on a fixed input are compared with the awq_ao model's.

Memory: ``ru_maxrss`` (peak resident set of the process, which includes file pages mapped by
safetensors) and the RSS before and after the operation (``psutil``). Python, torch and
transformers are imported before the baseline is taken, so the delta is the model's.

Writes ``benchmarks/results/checkpoint_io.json`` (command, machine, versions, date) and prints
a table::

    nice -n 10 python benchmarks/checkpoint_io.py               # ~10-20 min on 2 CPU cores
    python benchmarks/checkpoint_io.py --reuse --work /tmp/ckio # reuse the quantized model
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FORMATS = ("awq_ao", "autoawq", "compressed-tensors")


def _rss() -> int:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:  # pragma: no cover
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.iterdir() if p.is_file())


def machine_info() -> dict:
    info: dict = {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        info["cpu"] = platform.processor()
    try:
        import psutil

        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    return info


def versions() -> dict:
    import safetensors
    import torch
    import torchao
    import transformers

    import awq_ao

    v = {"awq_ao": awq_ao.__version__, "torch": torch.__version__, "torchao": torchao.__version__,
         "transformers": transformers.__version__, "safetensors": safetensors.__version__}
    try:
        import compressed_tensors

        v["compressed_tensors"] = compressed_tensors.__version__
    except ImportError:
        pass
    return v


# ------------------------------------------------------------------------------------------------
# workers (run in subprocesses)
# ------------------------------------------------------------------------------------------------


def _fixed_ids():
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 49152, (1, 64), generator=g)


def worker_save_fp(work: Path) -> dict:
    """Load the GGUF model (float32), then time save_pretrained."""
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from devtools.shared_data import load_smollm2

    model, tok = load_smollm2()
    # transformers marks GGUF-loaded models as quantized (not serializable); the weights are
    # plain float32 tensors, so drop that marker to save them as an ordinary checkpoint
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    out = work / "fp32"
    if out.exists():
        shutil.rmtree(out)
    rss0, peak0 = _rss(), _peak()
    t0, c0 = time.perf_counter(), time.process_time()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"op": "save", "format": "fp32", "seconds": dt, "cpu_seconds": cpu, "rss_before": rss0, "peak_before": peak0,
            "peak_after": _peak(), "disk_bytes": _dir_bytes(out)}


def worker_save(work: Path, fmt: str) -> dict:
    """Load the awq_ao checkpoint, then time save_quantized(format=fmt)."""
    import torch  # noqa: F401
    from transformers import AutoTokenizer

    from awq_ao.checkpoint import load_quantized, save_quantized

    src = work / "awq_ao"
    model = load_quantized(src)
    tok = AutoTokenizer.from_pretrained(str(src))
    out = work / ("resaved-awq_ao" if fmt == "awq_ao" else fmt)
    rss0, peak0 = _rss(), _peak()
    t0, c0 = time.perf_counter(), time.process_time()
    save_quantized(model, out, tokenizer=tok, format=fmt, overwrite=True)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"op": "save", "format": fmt, "seconds": dt, "cpu_seconds": cpu, "rss_before": rss0, "peak_before": peak0,
            "peak_after": _peak(), "disk_bytes": _dir_bytes(out)}


def worker_load(work: Path, fmt: str) -> dict:
    """Time loading one checkpoint; save its logits on a fixed input for the parent to compare."""
    import torch
    import transformers

    import awq_ao.checkpoint as ck

    d = work / ("fp32" if fmt == "fp32" else fmt)
    rss0, peak0 = _rss(), _peak()
    t0, c0 = time.perf_counter(), time.process_time()
    if fmt == "fp32":
        model = transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)
        model.eval()
    else:
        model = ck.load_quantized(d)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    rss1, peak1 = _rss(), _peak()
    t1, c1 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        logits = model(_fixed_ids()).logits[0, -8:].float().clone()
    t_fwd, cpu_fwd = time.perf_counter() - t1, time.process_time() - c1
    torch.save(logits, work / f"logits-{fmt}.pt")
    return {"op": "load", "format": fmt, "seconds": dt, "cpu_seconds": cpu,
            "first_forward_cpu_seconds": cpu_fwd, "rss_before": rss0, "peak_before": peak0,
            "rss_after": rss1, "peak_after": peak1, "rss_after_forward": _rss(),
            "peak_after_forward": _peak(), "first_forward_seconds": t_fwd, "disk_bytes": _dir_bytes(d)}


def _run_worker(args: list[str], threads: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads), "AWQ_AO_BENCH_THREADS": str(threads)}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------


def _mib(n: float) -> str:
    return f"{n / 2**20:8.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/awq_ao_checkpoint_io", help="scratch directory")
    p.add_argument("--reuse", action="store_true", help="reuse <work>/awq_ao if present")
    p.add_argument("--n-samples", type=int, default=32, help="calibration sequences for quantize")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="loads per checkpoint")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads in the measured processes (default 1: on a shared machine, "
                        "OpenMP threads spin-waiting for a preempted partner inflate times many-fold)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "checkpoint_io.json"))
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        import torch

        torch.set_num_threads(int(os.environ.get("AWQ_AO_BENCH_THREADS", "1")))
        kind, work = args.worker[0], Path(args.worker[1])
        if kind == "save_fp":
            res = worker_save_fp(work)
        elif kind == "save":
            res = worker_save(work, args.worker[2])
        else:
            res = worker_load(work, args.worker[2])
        print(json.dumps(res))
        return

    import torch

    from devtools.shared_data import smollm2_path

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model_dir, _ = smollm2_path()
    report: dict = {
        "benchmark": "checkpoint_io",
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "versions": versions(),
        "model": f"SmolLM2-135M-Instruct ({model_dir}), float32 after GGUF dequantization",
        "quantization": {"bits": 4, "group_size": args.group_size, "zero_point": True,
                         "calibration": f"{args.n_samples} x {args.seq_len} tokens of wiki.valid.tokens"},
        "notes": [
            "each measurement in a fresh subprocess; seconds = wall time of the call only;"
            " cpu_seconds = process CPU time (user+sys, all threads) of the same call, which is"
            " less sensitive to other load on a shared machine",
            "peak = ru_maxrss of the process (includes mmapped file pages); rss = psutil RSS",
            "baseline (rss_before/peak_before) taken after importing torch/transformers/awq_ao",
            "save_quantized fsyncs every file; save_pretrained does not",
            "fp32 load = transformers from_pretrained of the save_pretrained safetensors directory;"
            " its tensors stay memory-mapped (pages are read on first use), so its RSS grows during"
            " the first forward: compare rss_after_first_forward_minus_before",
            f"torch threads in measured processes: {args.threads} (OMP_NUM_THREADS too)",
            "first forward = one [1, 64]-token forward right after loading",
            "load time includes building the model from config.json (transformers' lazy imports"
            " of the model class happen inside the timed call for every format)",
        ],
    }

    q = work / "awq_ao"
    if not (args.reuse and (q / "config.json").is_file()):
        cmd = [sys.executable, "-m", "awq_ao.cli", "quantize", str(model_dir), "--out", str(q),
               "--group-size", str(args.group_size), "--n-samples", str(args.n_samples),
               "--seq-len", str(args.seq_len), "--overwrite", "--no-progress"]
        print("quantizing:", " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if r.returncode != 0:
            raise SystemExit(f"quantize failed:\n{r.stderr[-3000:]}")
        report["quantize"] = {"command": " ".join(cmd), "seconds": time.perf_counter() - t0,
                              "stdout": r.stdout.strip().splitlines()}
        (work / "quantize.json").write_text(json.dumps(report["quantize"], indent=2))
        print(r.stdout)
    else:
        rec = work / "quantize.json"
        report["quantize"] = {"reused": str(q), **(json.loads(rec.read_text()) if rec.is_file() else {})}

    results = []
    print("saving fp32 ...", flush=True)
    results.append(_run_worker(["save_fp", str(work)], args.threads))
    for fmt in FORMATS:
        print(f"saving {fmt} ...", flush=True)
        results.append(_run_worker(["save", str(work), fmt], args.threads))
    for fmt in ("fp32", *FORMATS):
        for i in range(args.repeats):
            print(f"loading {fmt} ({i + 1}/{args.repeats}) ...", flush=True)
            res = _run_worker(["load", str(work), fmt], args.threads)
            res["repeat"] = i
            results.append(res)

    ref = torch.load(work / "logits-awq_ao.pt")
    summary = {}
    for fmt in ("fp32", *FORMATS):
        loads = [r for r in results if r["op"] == "load" and r["format"] == fmt]
        save = next(r for r in results if r["op"] == "save" and r["format"] == fmt)
        lg = torch.load(work / f"logits-{fmt}.pt")
        summary[fmt] = {
            "disk_bytes": save["disk_bytes"],
            "save_seconds": save["seconds"],
            "save_cpu_seconds": save["cpu_seconds"],
            "save_peak_rss_bytes": save["peak_after"],
            "save_rss_before_bytes": save["rss_before"],
            "load_seconds_median": statistics.median(r["seconds"] for r in loads),
            "load_seconds_all": [r["seconds"] for r in loads],
            "load_cpu_seconds_median": statistics.median(r["cpu_seconds"] for r in loads),
            "load_cpu_seconds_all": [r["cpu_seconds"] for r in loads],
            "first_forward_cpu_seconds_median": statistics.median(r["first_forward_cpu_seconds"] for r in loads),
            "load_peak_rss_bytes_max": max(r["peak_after"] for r in loads),
            "load_peak_rss_increase_bytes_max": max(r["peak_after"] - r["peak_before"] for r in loads),
            "load_rss_after_minus_before_bytes": statistics.median(r["rss_after"] - r["rss_before"] for r in loads),
            "rss_after_first_forward_minus_before_bytes": statistics.median(r["rss_after_forward"] - r["rss_before"] for r in loads),
            "first_forward_seconds_median": statistics.median(r["first_forward_seconds"] for r in loads),
            "max_abs_logit_diff_vs_awq_ao": float((lg - ref).abs().max()),
        }
    report["results"] = results
    report["summary"] = summary
    fp = summary["fp32"]
    for fmt in FORMATS:
        s = summary[fmt]
        s["load_speedup_vs_fp32"] = fp["load_seconds_median"] / s["load_seconds_median"]
        # fp32 stays memory-mapped until used, so compare resident memory after one forward
        s["rss_after_first_forward_ratio_vs_fp32"] = (
            s["rss_after_first_forward_minus_before_bytes"] / fp["rss_after_first_forward_minus_before_bytes"]
        )
        s["disk_ratio_vs_fp32"] = s["disk_bytes"] / fp["disk_bytes"]

    print()
    print(f"{'format':20s} {'disk MiB':>9s} {'save s':>7s} {'cpu s':>6s} {'load s':>7s} {'cpu s':>6s} {'load peak MiB':>14s} "
          f"{'peak +MiB':>10s} {'rss +MiB':>9s} {'+fwd MiB':>9s} {'logit diff':>11s}")
    for fmt, s in summary.items():
        print(f"{fmt:20s} {_mib(s['disk_bytes']):>9s} {s['save_seconds']:7.2f} {s['save_cpu_seconds']:6.2f} "
              f"{s['load_seconds_median']:7.2f} {s['load_cpu_seconds_median']:6.2f} "
              f"{_mib(s['load_peak_rss_bytes_max']):>14s} {_mib(s['load_peak_rss_increase_bytes_max']):>10s} "
              f"{_mib(s['load_rss_after_minus_before_bytes']):>9s} "
              f"{_mib(s['rss_after_first_forward_minus_before_bytes']):>9s} {s['max_abs_logit_diff_vs_awq_ao']:11.3g}")
    print("load peak = process ru_maxrss after loading; peak + / rss + = increase over the "
          "post-import baseline; +fwd = RSS increase after one forward pass")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
