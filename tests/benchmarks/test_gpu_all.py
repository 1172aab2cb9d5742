"""benchmarks/gpu_all.sh and gpu_all.py on a machine without a GPU (issue 13, GPU one shot).

The script runs once on a lent GPU with nothing to fix things afterwards, so what can be
checked here is: its arguments, the wheel installation (only wheels whose distribution the
interpreter lacks, with pip --no-index into a fresh folder), each step's skip path and JSON,
the summary (timeouts, missing files) and the bookkeeping of the results.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_all  # noqa: E402

SCRIPT = ROOT / "benchmarks" / "gpu_all.sh"


def _make_wheel(folder: Path, dist: str, version: str) -> Path:
    """A minimal pure-Python wheel holding the module ``dist``."""
    tag = f"{dist}-{version}"
    path = folder / f"{tag}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{dist}/__init__.py", f"__version__ = '{version}'\n")
        z.writestr(f"{tag}.dist-info/METADATA",
                   f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        z.writestr(f"{tag}.dist-info/WHEEL",
                   "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{tag}.dist-info/RECORD", "")
    return path


def _run(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env={**__import__("os").environ, "OUT": ""})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU skip path")
def test_dry_run_skips_every_step_for_lack_of_a_gpu(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _make_wheel(wheels, "gpuall_probe", "0.1")  # missing here: installed
    _make_wheel(wheels, "pytest", "0.0.1")  # present here: never shadows the real one
    out = tmp_path / "out"
    res = _run(["--dry-run", "--python", sys.executable, "--wheels", str(wheels), "--out", str(out)])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    log = (out / "gpu_all.log").read_text()
    assert "installing into" in log and "gpuall_probe-0.1-py3-none-any.whl" in log
    assert "already there, not installed: pytest-0.0.1-py3-none-any.whl" in log
    assert "pip install failed" not in log
    summary = json.loads((out / "gpu_all.json").read_text())
    assert summary["dry_run"] is True and "--dry-run" in summary["command"]
    assert set(summary["steps"]) == set(gpu_all.STEPS)
    for step, entry in summary["steps"].items():
        assert entry["status"] == "skipped", (step, entry)
        assert entry["reason"].startswith("no CUDA GPU"), entry
        assert entry["rc"] == 0
        doc = json.loads((out / f"{step}.json").read_text())
        assert doc["status"] == "skipped" and doc["reason"] == entry["reason"]
        for key in ("machine", "command", "date"):
            assert doc[key], key
        assert doc["machine"]["versions"]["torch"] == torch.__version__
    # at most 8 files come back from the device, none in sub-folders
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["gpu_all.json", "gpu_all.log", *(f"{s}.json" for s in gpu_all.STEPS)])


@pytest.mark.parametrize("args, message", [
    (["--budget", "abc"], "whole seconds"),
    (["--budget", "30"], "at least 60"),
    (["--steps", "tests,bogus"], "unknown step 'bogus'"),
    (["--steps", ","], "names no step"),
    (["--frobnicate"], "unknown argument"),
    (["--python", "/nonexistent/python"], "no interpreter"),
    (["--out"], "needs a value"),
])
def test_bad_arguments_are_refused(args, message):
    res = _run(args, timeout=60)
    assert res.returncode == 2 and message in res.stderr, res.stderr


def test_help_shows_the_run_invocation():
    res = _run(["--help"], timeout=60)
    assert res.returncode == 0
    assert 'run(command="bash benchmarks/gpu_all.sh --budget 450"' in res.stdout
    assert 'carry=["benchmarks/.gpu_wheels"]' in res.stdout


def test_missing_wheels_and_names(tmp_path):
    assert gpu_all.wheel_distribution("torchao-0.18.0-cp310-abi3-manylinux_2_28_x86_64.whl") == "torchao"
    assert gpu_all.wheel_distribution("/x/typing_extensions-4.0-py3-none-any.whl") == "typing-extensions"
    wheels = [str(tmp_path / "pytest-0.1-py3-none-any.whl"), str(tmp_path / "no_such_dist-1.0-py3-none-any.whl")]
    assert gpu_all.missing_wheels(wheels) == wheels[1:]


def test_parse_pytest_outputs(tmp_path):
    lines = ["tests/test_a.py::test_x[1] PASSED    [ 50%]", "tests/test_a.py::test_y FAILED [100%]",
             "noise", "tests/test_b.py::test_z SKIPPED (needs a CUDA GPU) [ 10%]",
             "[gw1] [ 75%] PASSED tests/test_c.py::test_w[m1-n4096] "]
    res = gpu_all.parse_pytest_verbose(lines)
    assert res["counts"] == {"passed": 2, "failed": 1, "skipped": 1}
    assert res["outcomes"]["tests/test_c.py::test_w[m1-n4096]"] == "passed"
    junit = tmp_path / "j.xml"
    junit.write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_a" name="test_x" time="1.5"/>'
        '<testcase classname="tests.test_a" name="test_y" time="0.1"><failure message="boom">tb</failure></testcase>'
        '<testcase classname="tests.test_b" name="test_z" time="0"><skipped message="no"/></testcase>'
        "</testsuite></testsuites>")
    res = gpu_all.parse_junit(junit)
    assert res["counts"] == {"passed": 1, "failed": 1, "skipped": 1}
    assert res["failures"] == [{"test": "tests.test_a::test_y", "outcome": "failed", "message": "boom",
                                "text": "tb"}]


def test_kernel_targets_and_decode_summary():
    rows = [
        {"shape": "q", "M": 1, "speedup": {"vs_cublas_fp16": 3.2, "vs_torchao_int4": 0.9}, "copy_fraction": 0.7},
        {"shape": "q", "M": 16, "speedup": {"vs_cublas_fp16": 2.6}, "copy_fraction": 0.5},
        {"shape": "q", "M": 512, "speedup": {"vs_cublas_fp16": 0.95, "vs_cublas_bf16": 0.8}},
    ]
    t = {(r["M"], r["target"]): r["met"] for r in gpu_all.kernel_targets(rows, 3000.0)}
    assert t == {(1, "vs cuBLAS fp16"): True, (1, "fraction of copy bandwidth"): False,
                 (1, "vs torchao int4"): False, (16, "vs cuBLAS fp16"): True,
                 (512, "vs cuBLAS fp16"): True, (512, "vs cuBLAS bf16"): False}
    s = gpu_all.decode_summary([
        {"variant": "fp16_dense", "tokens_per_s": 100.0}, {"variant": "awq_ao_fp16", "tokens_per_s": 250.0},
        {"variant": "torchao_int4_bf16", "tokens_per_s": 200.0}, {"variant": "bf16_dense", "tokens_per_s": 80.0},
        {"variant": "awq_ao_bf16", "error": "x"}])
    assert s["vs_dense_same_dtype"] == {"awq_ao_fp16": 2.5, "torchao_int4_bf16": 2.5}
    assert s["vs_fp16_dense"]["bf16_dense"] == 0.8
    assert s["awq_ao_fp16_vs_torchao_int4_bf16"] == 1.25


def test_variant_caps_keep_time_for_the_required_variants():
    cap = gpu_all.variant_cap
    # nothing measured yet: 2 required variants after the first keep 2 x 50 s
    assert cap("fp16_dense", 200, [], ["awq_ao_fp16", "torchao_int4_bf16"], 25) == 100
    assert cap("fp16_dense", 120, [], ["awq_ao_fp16", "torchao_int4_bf16"], 25) == 60  # half at least
    assert cap("torchao_int4_bf16", 70, [60.0], ["awq_ao_bf16"], 25) == 70  # optional ones keep nothing
    assert cap("awq_ao_bf16", 50, [60.0, 70.0], [], 25) is None  # optional: a whole variant's time
    assert cap("awq_ao_fp16", 20, [], [], 25) is None


def test_summary_marks_timeouts_and_missing_files(tmp_path):
    out = tmp_path
    (out / "tests.json").write_text(json.dumps({"status": "ok", "reason": None, "counts": {"passed": 3}}))
    (out / "kernels.json").write_text(json.dumps({"status": "running", "reason": None, "rows": []}))
    state = out / "state.tsv"
    state.write_text("tests 0 40 100\nkernels 124 130 130\ndecode 1 5 150\n")
    rc = gpu_all.main(["summary", "--out", str(out), "--state", str(state), "--budget", "450"])
    s = json.loads((out / "gpu_all.json").read_text())
    assert rc == 1
    assert s["steps"]["tests"]["status"] == "ok" and s["highlights"]["tests"] == {"passed": 3}
    assert s["steps"]["kernels"]["status"] == "timeout"
    assert s["steps"]["decode"]["status"] == "no output"
    assert s["steps"]["quantize"]["status"] == "not selected"


def test_kernel_sweep_bookkeeping_on_cpu(tmp_path):
    """The kernel step's shape loop around gpu_kernels.run, through the Triton interpreter with
    a dummy timer (5 us for everything): rows, a failing shape, targets, the JSON."""
    code = f"""
import argparse, os, sys
os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, {str(ROOT / "benchmarks")!r})
import gpu_all
args = argparse.Namespace(out={str(tmp_path)!r}, budget=300.0, kernel_shapes=["tiny", "broken"],
                          m=[1, 20], dtypes=["fp16", "bf16"])
rep = gpu_all.Report("kernels", args)
status = gpu_all.kernel_sweep(args, rep, lambda fn: (fn(), 5.0)[1], "not in this test", device="cpu",
                              shape_table={{"tiny": (64, 256), "broken": (64, -5)}})
print("STATUS", status)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "STATUS partial" in res.stdout
    doc = json.loads((tmp_path / "kernels.json").read_text())
    assert doc["status"] == "partial" and "broken" in doc["errors"] and "broken" in doc["reason"]
    assert [(r["shape"], r["M"]) for r in doc["rows"]] == [("tiny", 1), ("tiny", 20)]
    row = doc["rows"][0]
    assert set(row["times_us"]) == {"ours_fp16", "ours_gemv_fp16", "ours_gemm_fp16", "cublas_fp16",
                                    "ours_bf16", "ours_gemv_bf16", "ours_gemm_bf16", "cublas_bf16"}
    assert all(e < 2e-2 for e in row["rel_err_fro"].values()), row["rel_err_fro"]
    assert row["speedup"]["vs_cublas_fp16"] == 1.0
    assert doc["targets_met"] == "0/2"  # M=1: 1.0x < 3x, copy fraction of a 5 us dummy < 75%
    assert doc["machine"]["versions"]["torch"] == torch.__version__


def test_run_streaming_kills_a_child_at_its_timeout():
    import time

    t0 = time.perf_counter()
    rc, lines = gpu_all.run_streaming(
        [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(600)"], 3)
    assert rc is None and lines == ["started"] and time.perf_counter() - t0 < 30


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU skip path")
def test_a_hung_step_is_killed_at_its_cap_and_the_others_still_run(tmp_path):
    out = tmp_path / "out"
    import os

    env = {**os.environ, "OUT": "", "GPU_ALL_TEST_HANG": "tests"}
    res = subprocess.run(["bash", str(SCRIPT), "--budget", "60", "--steps", "tests,quantize", "--python",
                          sys.executable, "--wheels", str(tmp_path), "--out", str(out)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert res.returncode == 1, res.stdout[-3000:]
    s = json.loads((out / "gpu_all.json").read_text())
    assert s["steps"]["tests"]["status"] == "timeout" and s["steps"]["tests"]["rc"] == 124
    assert s["steps"]["tests"]["wall_s"] <= s["steps"]["tests"]["cap_s"] + 12
    assert s["steps"]["quantize"]["status"] == "skipped"
    assert s["steps"]["kernels"]["status"] == "not selected"


def test_count_triton_calls_patches_and_restores_the_kernel():
    """decode's check that awq_ao's INT4 linears reach the Triton kernel (interpreter, CPU)."""
    code = f"""
import sys, torch
sys.path.insert(0, {str(ROOT / "benchmarks")!r})
import gpu_all
import awq_ao.kernels as kernels
import awq_ao.lowering.ops as ops
from awq_ao.lowering import Int4WeightTensor
t = Int4WeightTensor.from_float(torch.randn(64, 96, dtype=torch.float16), 4, 32, layout="nibble")

def model(x, **kw):
    for _ in range(2):
        ops._w4a16_linear_cuda(x, t.packed, t.scale, t.zero, None, 4, 32, 96, "nibble", "", None)

original = kernels.w4a16_linear
n = gpu_all._count_triton_calls(model, torch.randn(1, 96, dtype=torch.float16), {{}})
assert n == 2, n
assert kernels.w4a16_linear is original and ops._cuda_kernel() is original
print("OK")
"""
    import os

    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]
