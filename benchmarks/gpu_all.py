"""The one-shot GPU measurement of issue 13: the steps that ``benchmarks/gpu_all.sh`` runs.

Each step is one invocation of this file, run by the shell script under its own ``timeout``, and
writes one JSON file into ``--out`` (``$OUT`` on the lent GPU machine) with the step's status,
the machine (GPU name, driver, torch/triton/transformers/torchao versions), the command and the
date. A step that has no CUDA GPU writes ``"status": "skipped"`` with the reason and exits 0.

    tests     ``pytest -m gpu`` on the test files that hold GPU tests         -> tests.json
    kernels   benchmarks/gpu_kernels.py's measurement, one Llama-3-8B shape at
              a time (the JSON is rewritten after each shape)                 -> kernels.json
    decode    greedy decode tokens/s under torch.compile, one subprocess per
              variant (fp16 dense, awq_ao INT4, torchao int4, ...)            -> decode.json
    quantize  awq_ao.quantize(..., device="cuda") layer by layer: time, peak
              GPU memory (the JSON is rewritten after each block)             -> quantize.json
    summary   gpu_all.json (every step's status, exit code and time, and the
              headline numbers with issue 13's targets) and a short table    -> gpu_all.json

Helpers: ``info`` prints the machine as JSON; ``missing-wheels WHEEL...`` prints the wheels
whose distribution the running interpreter lacks (stdlib only: works without torch);
``decode-one`` measures one decode variant (run by ``decode`` in a subprocess).

``--device cpu`` (with the tiny model) runs ``decode`` and ``quantize`` on the CPU to test this
file's own logic; nothing it times means anything. The timing steps never run under
``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
STEPS = ("tests", "kernels", "decode", "quantize")

#: Model widths built from a config (random weights; speed and memory do not depend on them).
#: ``llama3-8b``: Llama-3-8B's widths; its vocabulary is cut to a quarter (32000) because
#: the benchmarks keep only some of the 32 layers: with 8 layers the head's share of the bytes
#: read per token is then that of the full model.
MODELS = {
    "llama3-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
                  "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 8192,
                  "rms_norm_eps": 1e-5, "tie_word_embeddings": False},
    "llama3.2-1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_attention_heads": 32,
                    "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 8192,
                    "rms_norm_eps": 1e-5, "tie_word_embeddings": True},
    "tiny": {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 1000, "max_position_embeddings": 1024,
             "tie_word_embeddings": False},
}
DECODE_VARIANTS = ("fp16_dense", "awq_ao_fp16", "torchao_int4_bf16", "awq_ao_bf16", "bf16_dense")
#: the decode variants issue 13 asks for; the others run only with time to spare
REQUIRED_VARIANTS = ("fp16_dense", "awq_ao_fp16", "torchao_int4_bf16")

#: Order in which the kernel benchmark takes the shapes (most common layers first).
KERNEL_SHAPES = ("q_proj/o_proj", "gate_proj/up_proj", "down_proj", "k_proj/v_proj",
                 "qkv_fused", "gate_up_fused")
KERNEL_M = (1, 2, 4, 8, 16, 32, 64, 128, 512, 2048)
#: do_bench settings of the kernel step (shorter than gpu_kernels.py's 25/100 ms: the whole
#: sweep has to fit a few minutes; each µs-scale call is still repeated hundreds of times)
BENCH_WARMUP_MS, BENCH_REP_MS = 10, 50


def variant_dtype_name(variant: str) -> str:
    """``"bf16"`` or ``"fp16"``: the activation dtype of a decode variant."""
    return "bf16" if "bf16" in variant else "fp16"


# ------------------------------------------------------------------------------------------
# Machine, reports
# ------------------------------------------------------------------------------------------
def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def nvidia_smi() -> list[dict] | dict:
    """One dict per GPU from ``nvidia-smi`` (name, driver, memory, clocks, power), or the error."""
    fields = ["name", "driver_version", "memory.total", "memory.used", "clocks.sm", "clocks.max.sm",
              "clocks.mem", "power.limit", "temperature.gpu", "compute_mode", "persistence_mode"]
    try:
        res = subprocess.run(["nvidia-smi", "--query-gpu=" + ",".join(fields),
                              "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    if res.returncode != 0:
        return {"error": (res.stderr or res.stdout).strip()[-500:]}
    return [dict(zip(fields, [v.strip() for v in line.split(",")], strict=False))
            for line in res.stdout.strip().splitlines() if line.strip()]


def _version(mod: str) -> str:
    try:
        m = __import__(mod)
    except Exception as exc:  # noqa: BLE001 - report, don't fail
        return f"unavailable ({type(exc).__name__}: {str(exc)[:200]})"
    return str(getattr(m, "__version__", "unknown"))


@functools.cache
def machine() -> dict:
    """GPU (nvidia-smi and torch), CPU, Python and library versions; works without torch.

    gpu_all.sh reads it once (``info --save``) and hands the file to the steps through
    ``GPU_ALL_MACHINE_JSON``, so a step that is skipped need not import every library."""
    saved = os.environ.get("GPU_ALL_MACHINE_JSON")
    if saved and Path(saved).is_file():
        try:
            return json.loads(Path(saved).read_text())
        except ValueError:
            pass
    return _read_machine()


def _read_machine() -> dict:
    info: dict = {"python": platform.python_version(), "executable": sys.executable,
                  "platform": platform.platform(), "cpu_count": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        info["cpu"] = platform.processor()
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    info["nvidia_smi"] = nvidia_smi()
    info["versions"] = {m: _version(m) for m in ("torch", "triton", "transformers", "torchao",
                                                  "safetensors", "numpy", "awq_ao")}
    try:
        import torch

        info["torch_cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(torch.cuda.current_device())
            info.update(gpu=p.name, gpu_capability=f"{p.major}.{p.minor}",
                        gpu_sm_count=p.multi_processor_count,
                        gpu_memory_gib=round(p.total_memory / 2**30, 1),
                        gpu_l2_mib=round(getattr(p, "L2_cache_size", 0) / 2**20, 1))
    except Exception as exc:  # noqa: BLE001
        info["torch_error"] = f"{type(exc).__name__}: {exc}"
    smi = info["nvidia_smi"]
    if isinstance(smi, list) and smi:
        info.setdefault("gpu", smi[0].get("name"))
        info["driver"] = smi[0].get("driver_version")
    info["env"] = {k: os.environ[k] for k in ("AWQ_AO_CPU_KERNELS", "AWQ_AO_DISABLE_KERNELS",
                                              "TRITON_INTERPRET", "PYTHONPATH", "CUDA_VISIBLE_DEVICES")
                   if k in os.environ}
    return info


def no_gpu_reason(args: argparse.Namespace) -> str | None:
    """Why this step cannot run on a GPU (``None``: it can), or a dry run's reason."""
    try:
        import torch
    except Exception as exc:  # noqa: BLE001
        reason = f"no CUDA GPU: torch is not importable ({type(exc).__name__}: {exc})"
    else:
        if torch.cuda.is_available():
            reason = None
        else:
            reason = (f"no CUDA GPU: torch.cuda.is_available() is False (torch {torch.__version__}, "
                      f"CUDA build {torch.version.cuda})")
    if reason is None and getattr(args, "dry_run", False):
        reason = "dry run (a CUDA GPU is present; nothing was measured)"
    return reason


class Report:
    """The JSON file of one step, rewritten atomically whenever :meth:`write` is called."""

    def __init__(self, step: str, args: argparse.Namespace, name: str | None = None):
        self.path = Path(args.out) / f"{name or step}.json"
        self.t0 = time.perf_counter()
        self.doc: dict = {"step": step, "status": "running", "reason": None,
                          "command": shlex.join([sys.executable, *sys.argv]),
                          "date": now_iso(), "budget_s": getattr(args, "budget", None)}

    def write(self, status: str | None = None, **fields) -> Path:
        if status is not None:
            self.doc["status"] = status
        self.doc.update(fields)
        self.doc["elapsed_s"] = round(time.perf_counter() - self.t0, 2)
        self.doc["machine"] = machine()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.doc, indent=2, default=str) + "\n")
        os.replace(tmp, self.path)
        return self.path

    def fail(self, exc: BaseException) -> int:
        tb = traceback.format_exc()
        print(tb, file=sys.stderr, flush=True)
        self.write("error", reason=f"{type(exc).__name__}: {str(exc)[:2000]}", traceback=tb[-8000:])
        return 1


_CHILD_GROUPS: set[int] = set()


def _kill_children_and_exit(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
    """SIGTERM from gpu_all.sh's ``timeout``: the children run in their own process groups (so
    that a child's timeout kills all of its processes), so end them too before exiting."""
    for pgid in list(_CHILD_GROUPS):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    sys.exit(128 + signum)


def run_streaming(cmd: list[str], timeout: float, env: dict | None = None,
                  cwd: Path = ROOT) -> tuple[int | None, list[str]]:
    """Run ``cmd`` in its own process group, echo and keep its output; ``(rc, lines)``, with
    ``rc=None`` when it was killed at ``timeout`` seconds (the whole group is killed)."""
    signal.signal(signal.SIGTERM, _kill_children_and_exit)
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", bufsize=1, start_new_session=True)
    _CHILD_GROUPS.add(proc.pid)
    lines: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            print(line, end="", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc: int | None = proc.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        print(f"[gpu_all] {shlex.join(cmd[:4])}... killed after {timeout:.0f} s", flush=True)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=10)
                break
            except subprocess.TimeoutExpired:
                continue
        rc = None
    _CHILD_GROUPS.discard(proc.pid)
    reader.join(timeout=10)
    return rc, lines


# ------------------------------------------------------------------------------------------
# Step: tests
# ------------------------------------------------------------------------------------------
def gpu_test_files() -> list[str]:
    """Test files that hold GPU tests (a ``pytest.mark.gpu`` mark)."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
                  if re.search(r"\bpytest\.mark\.gpu\b", p.read_text(errors="replace")))


_OUTCOMES = "PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS"
#: ``tests/x.py::t PASSED [ 5%]`` and, with pytest-xdist, ``[gw0] [ 5%] PASSED tests/x.py::t``
_VERBOSE_LINES = (re.compile(rf"^(?P<id>\S+::\S+)\s+(?P<outcome>{_OUTCOMES})\b"),
                  re.compile(rf"^\[gw\d+\]\s+\[\s*\d+%\]\s+(?P<outcome>{_OUTCOMES})\s+(?P<id>\S+::\S+)"))


def parse_pytest_verbose(lines: list[str]) -> dict:
    """Outcomes from ``pytest -v`` lines (what is left when pytest was killed)."""
    outcomes: dict[str, str] = {}
    for line in lines:
        for pattern in _VERBOSE_LINES:
            m = pattern.match(line.strip())
            if m:
                outcomes[m["id"]] = m["outcome"].lower()
                break
    counts: dict[str, int] = {}
    for o in outcomes.values():
        counts[o] = counts.get(o, 0) + 1
    return {"counts": counts, "outcomes": outcomes}


def parse_junit(path: Path) -> dict:
    """Counts, per-test outcomes and failure messages from a JUnit XML file."""
    import xml.etree.ElementTree as ET

    outcomes: dict[str, str] = {}
    failures: list[dict] = []
    durations: dict[str, float] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        cid = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                if child.tag != "skipped":
                    failures.append({"test": cid, "outcome": outcome,
                                     "message": (child.get("message") or "")[:1000],
                                     "text": (child.text or "")[-3000:]})
                break
        outcomes[cid] = outcome
        durations[cid] = float(case.get("time") or 0.0)
    counts: dict[str, int] = {}
    for o in outcomes.values():
        counts[o] = counts.get(o, 0) + 1
    slowest = sorted(durations.items(), key=lambda kv: -kv[1])[:10]
    return {"counts": counts, "outcomes": outcomes, "failures": failures,
            "slowest_s": {k: round(v, 2) for k, v in slowest}}


def step_tests(args: argparse.Namespace) -> int:
    rep = Report("tests", args)
    # --device cpu runs pytest all the same: the GPU tests skip, the plumbing is exercised
    reason = None if args.device == "cpu" else no_gpu_reason(args)
    files = gpu_test_files()
    if reason:
        print(f"[tests] skipped: {reason}", flush=True)
        rep.write("skipped", reason=reason, files=files)
        return 0
    try:
        import importlib.util

        junit = Path(tempfile.mkdtemp(prefix="gpu_all_tests_")) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-v", "-p", "no:cacheprovider",
               "--continue-on-collection-errors", "-o", "junit_family=xunit2",
               f"--junitxml={junit}", "-rfE", *files]
        if importlib.util.find_spec("pytest_timeout") is not None:
            cmd += ["--timeout", str(args.test_timeout)]
        if args.test_workers > 1 and importlib.util.find_spec("xdist") is not None:
            cmd += ["-n", str(args.test_workers)]  # Triton compiles are CPU-bound: run them side by side
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET", None)
        rep.write(files=files, pytest_command=shlex.join(cmd))
        rc, lines = run_streaming(cmd, args.budget, env=env)
        if junit.exists():
            res = parse_junit(junit)
        else:
            res = parse_pytest_verbose(lines)
        status = "timeout" if rc is None else ("ok" if rc == 0 else "failed")
        reason = None
        if rc is None:
            reason = f"pytest killed after the step's {args.budget:.0f} s; outcomes from its -v output"
        elif rc != 0:
            reason = f"pytest exit code {rc}"
        rep.write(status, reason=reason, pytest_rc=rc, **res, output_tail=lines[-60:])
        return 0 if status == "ok" else 1
    except Exception as exc:  # noqa: BLE001
        return rep.fail(exc)


# ------------------------------------------------------------------------------------------
# Step: kernels
# ------------------------------------------------------------------------------------------
def kernel_targets(rows: list[dict], copy_gbps: float | None) -> list[dict]:
    """Issue 13's kernel targets, checked row by row (fp16 and bf16 where measured).

    M=1: >= 3x cuBLAS fp16 and >= 75% of copy bandwidth; M=16: >= 2.5x; M >= 512: >= 0.9x
    cuBLAS; M <= 64: faster than torchao int4 (bf16)."""
    out: list[dict] = []

    def add(r: dict, target: str, value: float | None, need: float) -> None:
        if value is not None:
            out.append({"shape": r["shape"], "M": r["M"], "target": target,
                        "value": round(value, 3), "need": need, "met": bool(value >= need)})

    for r in rows:
        sp, m = r.get("speedup", {}), r["M"]
        if m == 1:
            add(r, "vs cuBLAS fp16", sp.get("vs_cublas_fp16"), 3.0)
            add(r, "fraction of copy bandwidth", r.get("copy_fraction"), 0.75)
        if m == 16:
            add(r, "vs cuBLAS fp16", sp.get("vs_cublas_fp16"), 2.5)
        if m >= 512:
            for d in ("fp16", "bf16"):
                add(r, f"vs cuBLAS {d}", sp.get(f"vs_cublas_{d}"), 0.9)
        if m <= 64:
            add(r, "vs torchao int4", sp.get("vs_torchao_int4"), 1.0)
    return out


def _torchao_int4_importable() -> str | None:
    """``None`` if torchao's int4 weight-only config imports, else why not."""
    try:
        from torchao.quantization import Int4WeightOnlyConfig  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"
    return None


def step_kernels(args: argparse.Namespace) -> int:
    rep = Report("kernels", args)
    reason = "not run with --device cpu (timings of the interpreter mean nothing)" \
        if args.device == "cpu" else no_gpu_reason(args)
    if reason:
        print(f"[kernels] skipped: {reason}", flush=True)
        rep.write("skipped", reason=reason)
        return 0
    try:
        os.environ.pop("TRITON_INTERPRET", None)
        import torch
        import triton.testing

        def timer(fn) -> float:
            fn()  # autotuning / compilation happen here, untimed
            torch.cuda.synchronize()
            ms = triton.testing.do_bench(fn, warmup=BENCH_WARMUP_MS, rep=BENCH_REP_MS, quantiles=[0.5])
            return 1000.0 * (ms[0] if isinstance(ms, list | tuple) else ms)

        ao_missing = None if args.no_torchao else _torchao_int4_importable()
        if ao_missing:
            print(f"[kernels] torchao int4 baseline unavailable: {ao_missing}", flush=True)
        status = kernel_sweep(args, rep, timer, ao_missing)
        return 0 if status == "ok" else 1
    except Exception as exc:  # noqa: BLE001
        return rep.fail(exc)


def kernel_sweep(args: argparse.Namespace, rep: Report, timer, ao_missing: str | None,
                 device: str = "cuda", shape_table: dict | None = None) -> str:
    """benchmarks/gpu_kernels.py's ``run`` shape by shape, within ``args.budget`` seconds;
    ``rep`` is rewritten after each shape. Returns the status. (``device="cpu"`` with
    ``TRITON_INTERPRET=1``, a dummy timer and tiny shapes tests the bookkeeping.)"""
    import torch

    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import gpu_kernels as gk

    table = shape_table or gk.SHAPES
    shapes = list(args.kernel_shapes)
    settings = {"group_size": 128, "dtypes": list(args.dtypes), "m": list(args.m),
                "shapes": {s: {"N": table[s][0], "K": table[s][1]} for s in shapes},
                "timer": f"triton.testing.do_bench median, L2 flushed, warmup={BENCH_WARMUP_MS} "
                         f"rep={BENCH_REP_MS} (ms)",
                "torchao_int4": ao_missing or "tile_packed_to_4d, bf16 activations"}
    rows: list[dict] = []
    copies: list[float] = []
    shape_s: dict[str, float] = {}
    errors: dict[str, str] = {}
    not_run: list[str] = []
    t0 = time.perf_counter()
    for name in shapes:
        spent = time.perf_counter() - t0
        guess = max(shape_s.values(), default=0.0)
        if spent + guess > args.budget:
            not_run.append(name)
            print(f"[kernels] {name}: not run, {spent:.0f} s spent of {args.budget:.0f}", flush=True)
            continue
        ns = argparse.Namespace(m=list(args.m), shapes=[name], dtypes=list(args.dtypes),
                                group_size=128, no_torchao=bool(ao_missing), shape_table=table)
        ts = time.perf_counter()
        try:
            res = gk.run(ns, device=device, timer=timer)
        except Exception as exc:  # noqa: BLE001 - one shape's failure doesn't lose the rest
            traceback.print_exc()
            errors[name] = f"{type(exc).__name__}: {str(exc)[:1500]}"
            if device == "cuda":
                torch.cuda.empty_cache()
        else:
            rows += res["rows"]
            copies.append(res["copy_bandwidth_gbps"])
        shape_s[name] = round(time.perf_counter() - ts, 1)
        copy = sorted(copies)[len(copies) // 2] if copies else None
        rep.write(settings=settings, copy_bandwidth_gbps=copy, copy_bandwidth_runs_gbps=copies,
                  shape_seconds=shape_s, errors=errors, rows=rows)
    copy = sorted(copies)[len(copies) // 2] if copies else None
    targets = kernel_targets(rows, copy)
    if rows:
        print("\n" + gk.format_table(rows, list(args.dtypes)), flush=True)
        print(f"\ncopy bandwidth (1 GiB device-to-device, read+write): {copy:.0f} GB/s", flush=True)
    status = "ok" if rows and not errors and not not_run else ("partial" if rows else "failed")
    reason = "; ".join(filter(None, [
        f"shapes not run (out of time): {not_run}" if not_run else "",
        f"errors in {sorted(errors)}: {next(iter(errors.values()))}" if errors else ""])) or None
    rep.write(status, reason=reason, settings=settings, copy_bandwidth_gbps=copy,
              copy_bandwidth_runs_gbps=copies, shape_seconds=shape_s, errors=errors, rows=rows,
              not_run=not_run, targets=targets,
              targets_met=f"{sum(t['met'] for t in targets)}/{len(targets)}",
              notes="times in microseconds; speedup = reference time / ours; gbps = minimum bytes "
                    "moved / time; copy_fraction = ours (first dtype) GB/s / device copy GB/s")
    return status


# ------------------------------------------------------------------------------------------
# Models shared by decode and quantize
# ------------------------------------------------------------------------------------------
def build_llama(model: str, layers: int, dtype, device):
    """A random-weight ``LlamaForCausalLM`` built directly in ``dtype`` on ``device``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(num_hidden_layers=layers, **MODELS[model])
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            net = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    return net.eval()


def linear_names(model) -> list[str]:
    import torch

    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]


def to_awq_ao(model, group_size: int = 128):
    """Round-to-nearest INT4 with awq_ao's tensor (speed does not depend on how codes were chosen)."""
    from awq_ao.lowering.swap import quantize_linear_module

    for name in linear_names(model):
        mod = model.get_submodule(name)
        new = quantize_linear_module(mod, 4, group_size, True)
        if new is not mod:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, new)
    return model


def to_torchao(model, group_size: int = 128):
    """torchao's int4 weight-only (tinygemm, ``tile_packed_to_4d``; bf16 activations)."""
    import torch
    from torchao.quantization import Int4WeightOnlyConfig, quantize_

    names = set(linear_names(model))
    quantize_(model, Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d"),
              filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and fqn in names)
    return model


def weight_bytes(model) -> dict:
    """Bytes of the weights a decode step reads: everything but the embedding (a gather)."""
    quant, other, embed = 0, 0, 0
    seen: set[int] = set()
    emb = model.get_input_embeddings().weight
    for p in list(model.parameters()) + list(model.buffers()):
        if id(p) in seen:
            continue
        seen.add(id(p))
        if hasattr(p, "__tensor_flatten__"):
            names, _ = p.__tensor_flatten__()
            quant += sum(getattr(p, n).numel() * getattr(p, n).element_size() for n in names
                         if getattr(p, n) is not None)
        elif p is emb:
            embed += p.numel() * p.element_size()
        else:
            other += p.numel() * p.element_size()
    return {"quantized": quant, "other": other, "embedding": embed, "read_per_token": quant + other}


# ------------------------------------------------------------------------------------------
# Step: decode (one subprocess per variant) and decode-one
# ------------------------------------------------------------------------------------------
def _count_triton_calls(model, ids, cache_kwargs) -> int:
    """Calls of awq_ao's Triton kernel in one eager forward (0: it fell back to dequantize)."""
    import awq_ao.kernels as kernels_pkg
    import awq_ao.lowering.ops as ops

    original = kernels_pkg.w4a16_linear
    calls = [0]

    def counting(*a, **k):
        calls[0] += 1
        return original(*a, **k)

    ops._cuda_kernel.cache_clear()
    kernels_pkg.w4a16_linear = counting
    try:
        model(ids, **cache_kwargs)
    finally:
        kernels_pkg.w4a16_linear = original
        ops._cuda_kernel.cache_clear()
    return calls[0]


def decode_one(args: argparse.Namespace) -> dict:
    """Build, quantize and time one decode variant; returns the result row."""
    import torch
    from transformers import StaticCache

    variant = args.variant
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if variant_dtype_name(variant) == "bf16" else torch.float16
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    row: dict = {"variant": variant, "model": args.model, "layers": args.layers, "dtype": str(dtype),
                 "prompt": args.prompt, "new_tokens": args.new_tokens, "device": str(dev)}
    t = time.perf_counter()
    model = build_llama(args.model, args.layers, dtype, dev)
    sync()
    row["build_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    if variant.startswith("awq_ao"):
        to_awq_ao(model)
    elif variant.startswith("torchao"):
        to_torchao(model)
    sync()
    row["quantize_s"] = round(time.perf_counter() - t, 2)
    wb = weight_bytes(model)
    row["weight_bytes"] = wb
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    cfg = model.config
    vocab = cfg.vocab_size
    gen = torch.Generator(device="cpu").manual_seed(1)
    prompt = torch.randint(0, vocab, (1, args.prompt), generator=gen).to(dev)
    max_len = args.prompt + args.warmup + args.new_tokens + args.eager_tokens + 8

    def step(model, tok, pos, cache):
        logits = model(tok, position_ids=pos.unsqueeze(0), cache_position=pos, past_key_values=cache,
                       use_cache=True, return_dict=False)[0]
        return torch.argmax(logits[:, -1], dim=-1, keepdim=True)

    def fresh():
        cache = StaticCache(config=cfg, max_cache_len=max_len)
        pos = torch.arange(args.prompt, device=dev)
        with torch.no_grad():
            logits = model(prompt, position_ids=pos.unsqueeze(0), cache_position=pos,
                           past_key_values=cache, use_cache=True, return_dict=False)[0]
        tok = torch.argmax(logits[:, -1], dim=-1, keepdim=True)
        return cache, tok, torch.tensor([args.prompt], device=dev)

    def timed(fn, cache, tok, pos, n: int) -> tuple[float, torch.Tensor, torch.Tensor]:
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            for _ in range(n):
                tok = fn(model, tok, pos, cache).clone()
                pos += 1
        sync()
        return time.perf_counter() - t0, tok, pos

    if variant.startswith("awq_ao") and cuda:
        cache, tok, pos = fresh()
        with torch.no_grad():
            row["triton_kernel_calls_per_step"] = _count_triton_calls(
                model, tok, {"position_ids": pos.unsqueeze(0), "cache_position": pos,
                             "past_key_values": cache, "use_cache": True})
        row["linears"] = len(linear_names(model))
        if row["triton_kernel_calls_per_step"] < row["linears"]:
            print(f"[decode] WARNING: {row['triton_kernel_calls_per_step']} Triton kernel calls for "
                  f"{row['linears']} INT4 linears: the others fell back to dequantize + F.linear", flush=True)
    # eager decode (also runs any Triton autotuning for M=1 before a CUDA graph is captured)
    cache, tok, pos = fresh()
    timed(step, cache, tok, pos, 2)
    secs, tok, pos = timed(step, cache, tok, pos, args.eager_tokens)
    row["eager_tokens_per_s"] = round(args.eager_tokens / secs, 2)
    # compiled decode: reduce-overhead (CUDA graphs) first, plain inductor if that fails
    modes = [args.mode] if args.mode != "auto" else (["reduce-overhead", "default"] if cuda else ["default"])
    row["compile_errors"] = {}
    for mode in modes:
        torch._dynamo.reset()
        try:
            compiled = torch.compile(step, mode=None if mode == "default" else mode, fullgraph=True,
                                     dynamic=False)
            cache, tok, pos = fresh()
            row["compile_and_warmup_s"], tok, pos = timed(compiled, cache, tok, pos, args.warmup)
            secs, tok, pos = timed(compiled, cache, tok, pos, args.new_tokens)
        except Exception as exc:  # noqa: BLE001 - record, try the next mode
            traceback.print_exc()
            row["compile_errors"][mode] = f"{type(exc).__name__}: {str(exc)[:1500]}"
            continue
        row["compile_mode"] = mode
        try:  # CUDA graphs that inductor declined (mutated inputs, CPU ops, ...): 0 is expected
            from torch._dynamo.utils import counters

            row["cudagraph_skips"] = dict(counters["inductor"]).get("cudagraph_skips", 0)
        except Exception:  # noqa: BLE001 - informational
            pass
        row["tokens_per_s"] = round(args.new_tokens / secs, 2)
        row["ms_per_token"] = round(1000 * secs / args.new_tokens, 4)
        row["weights_gbps"] = round(wb["read_per_token"] * args.new_tokens / secs / 1e9, 1)
        break
    if cuda:
        row["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return row


def cmd_decode_one(args: argparse.Namespace) -> int:
    try:
        row = decode_one(args)
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        row = {"variant": args.variant, "error": f"{type(exc).__name__}: {str(exc)[:2000]}"}
    print("RESULT " + json.dumps(row, default=str), flush=True)
    return 0 if "error" not in row and "tokens_per_s" in row else 1


def decode_summary(rows: list[dict]) -> dict:
    """Tokens/s ratios against the dense model of the same dtype and against fp16 dense."""
    tps = {r["variant"]: r.get("tokens_per_s") for r in rows if r.get("tokens_per_s")}
    out: dict = {"tokens_per_s": tps}
    for v, val in tps.items():
        dense = f"{variant_dtype_name(v)}_dense"
        if v != dense and dense in tps:  # awq_ao/torchao vs the dense model of their dtype
            out.setdefault("vs_dense_same_dtype", {})[v] = round(val / tps[dense], 3)
        if v != "fp16_dense" and "fp16_dense" in tps:
            out.setdefault("vs_fp16_dense", {})[v] = round(val / tps["fp16_dense"], 3)
    if "awq_ao_bf16" in tps and "torchao_int4_bf16" in tps:
        out["awq_ao_bf16_vs_torchao_int4"] = round(tps["awq_ao_bf16"] / tps["torchao_int4_bf16"], 3)
    if "awq_ao_fp16" in tps and "torchao_int4_bf16" in tps:
        out["awq_ao_fp16_vs_torchao_int4_bf16"] = round(tps["awq_ao_fp16"] / tps["torchao_int4_bf16"], 3)
    return out


def step_decode(args: argparse.Namespace) -> int:
    rep = Report("decode", args)
    reason = None if args.device == "cpu" else no_gpu_reason(args)
    settings = {"model": args.model, "widths": MODELS[args.model], "layers": args.layers,
                "prompt": args.prompt, "warmup": args.warmup, "new_tokens": args.new_tokens,
                "eager_tokens": args.eager_tokens, "mode": args.mode, "variants": list(args.variants),
                "int4": "round to nearest, group 128, asymmetric; lm_head and embedding stay dense",
                "timing": "greedy argmax decode with a static KV cache, torch.compile(fullgraph) of one "
                          "decode step; tokens/s over new_tokens steps after warmup, CUDA synchronized"}
    if reason:
        print(f"[decode] skipped: {reason}", flush=True)
        rep.write("skipped", reason=reason, settings=settings)
        return 0
    try:
        rows: list[dict] = []
        t0 = time.perf_counter()
        variants = list(args.variants)
        ao_missing = _torchao_int4_importable()
        runnable = [v for v in variants if not (v.startswith("torchao") and ao_missing)]
        walls: list[float] = []
        for v in variants:
            if v not in runnable:
                rows.append({"variant": v, "skipped": f"torchao unavailable: {ao_missing}"})
                continue
            left = args.budget - (time.perf_counter() - t0) - 3
            cap = variant_cap(v, left, walls, runnable[runnable.index(v) + 1:], args.min_variant_s)
            if cap is None:
                rows.append({"variant": v, "skipped": f"out of time ({left:.0f} s left)"})
                print(f"[decode] {v}: not run, {left:.0f} s left", flush=True)
                continue
            cmd = [sys.executable, str(Path(__file__).resolve()), "decode-one", "--variant", v,
                   "--model", args.model, "--layers", str(args.layers), "--prompt", str(args.prompt),
                   "--warmup", str(args.warmup), "--new-tokens", str(args.new_tokens),
                   "--eager-tokens", str(args.eager_tokens), "--mode", args.mode,
                   "--device", args.device, "--out", str(args.out)]
            print(f"[decode] {v} (up to {cap:.0f} s)", flush=True)
            ts = time.perf_counter()
            rc, lines = run_streaming(cmd, cap)
            row = next((json.loads(ln[len("RESULT "):]) for ln in reversed(lines)
                        if ln.startswith("RESULT ")), None)
            if row is None:
                row = {"variant": v, "error": "timeout" if rc is None else f"exit code {rc}, no result",
                       "output_tail": lines[-30:]}
            row["wall_s"] = round(time.perf_counter() - ts, 1)
            walls.append(row["wall_s"])
            rows.append(row)
            rep.write(settings=settings, rows=rows, summary=decode_summary(rows))
        summary = decode_summary(rows)
        measured = [r for r in rows if r.get("tokens_per_s")]
        failed = [r["variant"] for r in rows if "error" in r or ("skipped" not in r and not r.get("tokens_per_s"))]
        status = "ok" if measured and not failed else ("partial" if measured else "failed")
        print("\n" + format_decode(rows), flush=True)
        rep.write(status, reason=f"failed: {failed}" if failed else None, settings=settings, rows=rows,
                  summary=summary)
        return 0 if status == "ok" else 1
    except Exception as exc:  # noqa: BLE001
        return rep.fail(exc)


def variant_cap(variant: str, left: float, walls: list[float], after: list[str],
                min_s: float) -> float | None:
    """Seconds one decode variant may take, or ``None`` (not started).

    Each required variant still to come keeps a reserve of the time one variant took so far
    (the median; ``2 * min_s`` before the first), but a variant always gets half of what is
    left; an optional one starts only if a whole variant's time is left."""
    expected = sorted(walls)[len(walls) // 2] if walls else 2 * min_s
    if left < min_s or (variant not in REQUIRED_VARIANTS and left < expected):
        return None
    reserve = expected * sum(1 for v in after if v in REQUIRED_VARIANTS)
    return max(left - reserve, left / 2, min(left, min_s))


def format_decode(rows: list[dict]) -> str:
    lines = [f"{'variant':<20} {'tok/s':>9} {'ms/tok':>8} {'GB/s':>7} {'eager tok/s':>11} {'mode':>15}"]
    for r in rows:
        if r.get("tokens_per_s"):
            lines.append(f"{r['variant']:<20} {r['tokens_per_s']:>9.1f} {r['ms_per_token']:>8.3f} "
                         f"{r.get('weights_gbps', 0):>7.0f} {r.get('eager_tokens_per_s', 0):>11.1f} "
                         f"{r.get('compile_mode', ''):>15}")
        else:
            why = r.get("skipped") or r.get("error") or "no result"
            lines.append(f"{r['variant']:<20} {str(why)[:90]}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# Step: quantize
# ------------------------------------------------------------------------------------------
def _rss_peak_mib() -> float | None:
    try:
        import resource

        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0)
    except Exception:  # noqa: BLE001
        return None


def step_quantize(args: argparse.Namespace) -> int:
    rep = Report("quantize", args)
    reason = None if args.device == "cpu" else no_gpu_reason(args)
    settings = {"model": args.quant_model, "widths": MODELS[args.quant_model], "layers": args.quant_layers,
                "dtype": args.quant_dtype, "calibration": f"{args.samples} x {args.seq_len} random tokens",
                "options": {"bits": 4, "group_size": 128, "device": args.device, "sequential": True,
                            "other options": "awq_ao defaults"},
                "where": "model kept on the CPU; each decoder block visits the device in turn"}
    if reason:
        print(f"[quantize] skipped: {reason}", flush=True)
        rep.write("skipped", reason=reason, settings=settings)
        return 0
    try:
        import torch

        import awq_ao
        import awq_ao.passes.sequential as seq

        dev = torch.device(args.device)
        cuda = dev.type == "cuda"
        dtype = getattr(torch, args.quant_dtype)
        t = time.perf_counter()
        model = build_llama(args.quant_model, args.quant_layers, dtype, "cpu")
        build_s = round(time.perf_counter() - t, 2)
        vocab = model.config.vocab_size
        gen = torch.Generator().manual_seed(0)
        batch = min(8, args.samples)
        data = [torch.randint(0, vocab, (batch, args.seq_len), generator=gen)
                for _ in range(max(1, args.samples // batch))]
        probe = data[0][:1, :64]
        # reference logits of the float model (on the device, then the model goes back to the CPU)
        with torch.no_grad():
            ref = model.to(dev)(probe.to(dev), use_cache=False).logits.float().cpu()
        model.to("cpu")
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        timeline: list[dict] = []
        t0 = time.perf_counter()
        release = getattr(seq, "release_freed_memory", None)

        def traced_release() -> None:
            if release is not None:
                release()
            point = {"t_s": round(time.perf_counter() - t0, 2), "rss_mib": None}
            try:
                point["rss_mib"] = round(int(Path("/proc/self/statm").read_text().split()[1])
                                         * os.sysconf("SC_PAGE_SIZE") / 2**20)
            except (OSError, ValueError, IndexError):
                pass
            if cuda:
                point["gpu_allocated_mib"] = round(torch.cuda.memory_allocated() / 2**20)
                point["gpu_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
            timeline.append(point)
            rep.write(settings=settings, build_s=build_s, timeline=timeline)

        if release is not None:
            seq.release_freed_memory = traced_release
        rep.write(settings=settings, build_s=build_s, timeline=timeline)
        try:
            report = awq_ao.quantize(model, data, bits=4, group_size=128, device=args.device,
                                     sequential=True, progress=False, verbose=False)
        finally:
            if release is not None:
                seq.release_freed_memory = release
        if cuda:
            torch.cuda.synchronize()
        quant_s = round(time.perf_counter() - t0, 2)
        result: dict = {"quantize_s": quant_s, "build_s": build_s, "peak_rss_mib_process": _rss_peak_mib()}
        if cuda:
            result.update(peak_gpu_allocated_mib=round(torch.cuda.max_memory_allocated() / 2**20),
                          peak_gpu_reserved_mib=round(torch.cuda.max_memory_reserved() / 2**20))
        result["report"] = {"mode": getattr(report, "mode", ""), "quantized": len(report.quantized),
                            "kept": len(report.kept), "kind_counts": report.kind_counts(),
                            "clipped": report.clipped, "error_feedback": report.error_feedback,
                            "fallback_multiplies": report.fallback_multiplies,
                            "times_s": {k: round(v, 2) for k, v in report.times.items()},
                            "warnings": report.warnings[:20],
                            "size_before_mib": round(report.size_before / 2**20, 1),
                            "size_after_mib": round(report.size_after / 2**20, 1)}
        print(f"[quantize] {quant_s:.1f} s, report: {result['report']['mode']}", flush=True)
        # the quantized model on the device: INT4 logits vs the float model's
        t = time.perf_counter()
        model.to(dev)
        with torch.no_grad():
            y = model(probe.to(dev), use_cache=False).logits.float().cpu()
        result["to_device_and_forward_s"] = round(time.perf_counter() - t, 2)
        result["logits_rel_err_vs_float"] = round(float((y - ref).norm() / ref.norm().clamp_min(1e-30)), 5)
        result["logits_finite"] = bool(torch.isfinite(y).all())
        print(f"[quantize] logits relative error vs the float model: {result['logits_rel_err_vs_float']}",
              flush=True)
        rep.write("ok", settings=settings, timeline=timeline, **result)
        return 0
    except Exception as exc:  # noqa: BLE001
        return rep.fail(exc)


# ------------------------------------------------------------------------------------------
# Summary
# ------------------------------------------------------------------------------------------
def read_state(path: Path | None) -> dict[str, dict]:
    """``step rc seconds cap`` lines written by gpu_all.sh."""
    out: dict[str, dict] = {}
    if path is None or not path.exists():
        return out
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 4:
            out[parts[0]] = {"rc": int(parts[1]), "wall_s": int(parts[2]), "cap_s": int(parts[3])}
    return out


def step_summary(args: argparse.Namespace) -> int:
    out = Path(args.out)
    state = read_state(Path(args.state) if args.state else None)
    steps: dict[str, dict] = {}
    highlights: dict = {}
    for step in STEPS:
        path = out / f"{step}.json"
        doc = None
        if path.exists():
            try:
                doc = json.loads(path.read_text())
            except ValueError as exc:
                doc = {"status": "unreadable", "reason": str(exc)}
        st = state.get(step)
        entry: dict = {"file": path.name if path.exists() else None}
        if st:
            entry.update(st)
        if doc is None:
            entry["status"] = "not selected" if st is None else "no output"
            if st and st["rc"] in (124, 137):
                entry["status"] = "timeout"
        else:
            entry["status"] = doc.get("status")
            entry["reason"] = doc.get("reason")
            if st and st["rc"] in (124, 137) and doc.get("status") == "running":
                entry["status"] = "timeout"
                entry["reason"] = f"killed at its {st['cap_s']} s cap; {path.name} holds what was done"
        steps[step] = entry
        if not doc:
            continue
        if step == "tests" and doc.get("counts") is not None:
            highlights["tests"] = doc["counts"]
        elif step == "kernels" and doc.get("rows"):
            highlights["kernels"] = {
                "copy_bandwidth_gbps": doc.get("copy_bandwidth_gbps"),
                "targets_met": doc.get("targets_met"),
                "targets_missed": [t for t in doc.get("targets", []) if not t["met"]][:40],
                "rows": [{"shape": r["shape"], "M": r["M"], "us": r["times_us"].get("ours_fp16"),
                          "vs_cublas_fp16": r["speedup"].get("vs_cublas_fp16"),
                          "vs_torchao_int4": r["speedup"].get("vs_torchao_int4"),
                          "copy_fraction": r.get("copy_fraction")}
                         for r in doc["rows"] if r["M"] in (1, 16, 64, 512, 2048)]}
        elif step == "decode" and doc.get("rows"):
            highlights["decode"] = doc.get("summary")
        elif step == "quantize" and doc.get("quantize_s") is not None:
            highlights["quantize"] = {k: doc.get(k) for k in ("quantize_s", "peak_gpu_allocated_mib",
                                                              "peak_gpu_reserved_mib", "logits_rel_err_vs_float")}
    summary = {"benchmark": "gpu_all (issue 13, GPU one shot)",
               "command": os.environ.get("GPU_ALL_COMMAND", shlex.join([sys.executable, *sys.argv])),
               "date": now_iso(), "budget_s": args.budget, "dry_run": bool(args.dry_run),
               "machine": machine(), "nvidia_smi_at_end": nvidia_smi(), "steps": steps,
               "highlights": highlights}
    (out / "gpu_all.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(format_summary(summary), flush=True)
    print(f"wrote {out / 'gpu_all.json'}", flush=True)
    bad = [s for s, e in steps.items() if e["status"] not in ("ok", "skipped", "not selected")]
    return 1 if bad else 0


def format_summary(s: dict) -> str:
    m = s["machine"]
    v = m.get("versions", {})
    lines = [f"gpu_all: {m.get('gpu', 'no GPU')} (driver {m.get('driver', '-')}), torch {v.get('torch')}, "
             f"triton {v.get('triton')}, transformers {v.get('transformers')}, torchao {v.get('torchao')}"]
    for step, e in s["steps"].items():
        extra = f" rc={e['rc']} {e['wall_s']}s/{e['cap_s']}s" if "rc" in e else ""
        reason = f": {e['reason']}" if e.get("reason") else ""
        lines.append(f"  {step:<9} {e['status']}{extra}{reason}"[:300])
    h = s["highlights"]
    if "tests" in h:
        lines.append(f"tests: {h['tests']}")
    if "kernels" in h:
        k = h["kernels"]
        lines.append(f"kernels: copy {k['copy_bandwidth_gbps']:.0f} GB/s, targets met {k['targets_met']}")
        lines.append(f"  {'shape':<18} {'M':>5} {'ours fp16 us':>12} {'x cuBLAS':>9} {'x torchao':>9} {'% copy':>7}")

        def f(x, spec):
            return "-" if x is None else format(x, spec)

        for r in k["rows"]:
            lines.append(f"  {r['shape']:<18} {r['M']:>5} {f(r['us'], '12.1f')} {f(r['vs_cublas_fp16'], '9.2f')} "
                         f"{f(r['vs_torchao_int4'], '9.2f')} "
                         f"{f(None if r['copy_fraction'] is None else 100 * r['copy_fraction'], '7.0f')}")
    if "decode" in h:
        lines.append(f"decode tokens/s: {h['decode'].get('tokens_per_s')}; vs dense same dtype: "
                     f"{h['decode'].get('vs_dense_same_dtype')}")
    if "quantize" in h:
        lines.append(f"quantize: {h['quantize']}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# Wheels, info
# ------------------------------------------------------------------------------------------
def wheel_distribution(filename: str) -> str:
    """Distribution name of a wheel file, normalized (``torchao-0.18.0-cp310-...whl`` -> torchao)."""
    name = Path(filename).name.split("-", 1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def missing_wheels(wheels: list[str]) -> list[str]:
    """The wheels whose distribution this interpreter does not have (any version)."""
    from importlib import metadata

    out = []
    for w in wheels:
        try:
            metadata.version(wheel_distribution(w))
        except metadata.PackageNotFoundError:
            out.append(w)
    return out


# ------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("command", choices=[*STEPS, "summary", "info", "missing-wheels", "decode-one"])
    p.add_argument("wheels", nargs="*", help="missing-wheels: wheel files")
    p.add_argument("--out", default=os.environ.get("OUT") or "/tmp/gpu_all", help="folder for the JSON files")
    p.add_argument("--budget", type=float, default=120.0, help="seconds this step may take")
    p.add_argument("--dry-run", action="store_true", help="skip every measurement, even on a GPU")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu: run decode/quantize on the CPU to test this file (timings meaningless)")
    p.add_argument("--state", default=None, help="summary: the step/exit-code file of gpu_all.sh")
    p.add_argument("--save", default=None, help="info: also write the machine JSON to this file")
    # tests
    p.add_argument("--test-timeout", type=int, default=180, help="pytest-timeout per test (s)")
    p.add_argument("--test-workers", type=int, default=4, help="pytest-xdist workers (if installed)")
    # kernels
    p.add_argument("--kernel-shapes", nargs="+", default=list(KERNEL_SHAPES), choices=list(KERNEL_SHAPES))
    p.add_argument("--m", type=int, nargs="+", default=list(KERNEL_M))
    p.add_argument("--dtypes", nargs="+", default=["fp16", "bf16"], choices=["fp16", "bf16"])
    p.add_argument("--no-torchao", action="store_true")
    # decode
    p.add_argument("--variants", nargs="+", default=list(DECODE_VARIANTS), choices=list(DECODE_VARIANTS))
    p.add_argument("--variant", choices=list(DECODE_VARIANTS), help="decode-one: the variant")
    p.add_argument("--model", default="llama3-8b", choices=list(MODELS))
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--eager-tokens", type=int, default=16)
    p.add_argument("--mode", default="auto", choices=["auto", "reduce-overhead", "default"])
    p.add_argument("--min-variant-s", type=float, default=25.0,
                   help="decode: a variant with less time left than this is not started")
    # quantize
    p.add_argument("--quant-model", default="llama3-8b", choices=list(MODELS))
    p.add_argument("--quant-layers", type=int, default=3)
    p.add_argument("--quant-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "missing-wheels":
        for w in missing_wheels(args.wheels):
            print(w)
        return 0
    if args.command == "info":
        text = json.dumps(_read_machine(), indent=2, default=str)
        print(text)
        if args.save:
            Path(args.save).write_text(text + "\n")
        return 0
    if args.command == "decode-one":
        if not args.variant:
            raise SystemExit("decode-one needs --variant")
        return cmd_decode_one(args)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if os.environ.get("GPU_ALL_TEST_HANG") == args.command:  # tests/benchmarks/test_gpu_all.py: a hung step
        Report(args.command, args).write()
        time.sleep(10**6)
    return {"tests": step_tests, "kernels": step_kernels, "decode": step_decode,
            "quantize": step_quantize, "summary": step_summary}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
