"""W4A16 Triton kernels under Triton's CPU interpreter, against a float64 reference.

Triton picks interpreter or compiled mode when a kernel is *decorated*, so this module runs
the kernels in a fresh subprocess (this file executed as a script) with
``TRITON_INTERPRET=1`` in its environment: the result does not depend on what other test
modules imported first. The subprocess runs every case once and writes a JSON report; each
parametrized test below checks one case of it.

Pass criterion, element-wise (see ``w4a16_reference.py``)::

    |y - y_ref| <= (2u + u**2 + K * 2**-23) * (|x| @ |w_hat|.T + |bias|)

with ``u = 2**-11`` (float16) or ``2**-8`` (bfloat16: the interpreter truncates fp32 -> bf16).
Out-of-bounds accesses are checked directly: the worker hooks the interpreter's load, store
and atomic primitives and verifies that every unmasked address lies inside one of the
tensors handed to the kernel. In addition inputs and output are views into NaN-padded
buffers (guards must stay untouched), and every split-K launch must leave its workspace
all-zero.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
PAD = 64  # guard elements before and after every tensor


def _case(
    cid: str, m: int, n: int, k: int, gs: int, dtype: str = "fp16", bias: bool = True, **kw
) -> dict:
    return {"id": cid, "m": m, "n": n, "k": k, "gs": gs, "dtype": dtype, "bias": bias, **kw}


def _cases() -> list[dict]:
    """Hand-picked edge cases plus seeded random shapes (nothing a multiple of the blocks)."""
    cases = [
        # decode kernel (M <= 4)
        _case("gemv-m1-g32-aligned", 1, 40, 256, 32),
        _case("gemv-m1-kodd-g64-bf16", 1, 37, 257, 64, "bf16"),
        _case("gemv-m3-g128-ragged", 3, 70, 300, 128, bias=False),
        _case("gemv-m2-perchannel-bf16", 2, 45, 300, -1, "bf16"),
        _case("gemv-m4-g96", 4, 50, 300, 96),
        _case("gemv-m2-g48-bf16", 2, 50, 200, 48, "bf16"),
        _case(
            "gemv-splitk3-partial-groups",
            2,
            33,
            500,
            128,
            config={"BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 3},
        ),
        _case(
            "gemv-splitk-empty-splits-bf16",
            1,
            20,
            100,
            32,
            "bf16",
            config={"BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 8},
        ),
        _case("gemv-frac-zero", 2, 30, 256, 64, frac_zero=True, param_dtype="fp32"),
        _case("gemv-k1-n1", 1, 1, 1, 32),
        _case("gemv-group-gt-k", 1, 30, 50, 128, "bf16"),
        _case(
            "gemv-fp32-params-bf16", 3, 40, 160, 32, "bf16", param_dtype="fp32", bias_dtype="fp32"
        ),
        _case("gemv-u8-zero-noncontig", 4, 24, 96, 32, zero_dtype="u8", noncontig=True),
        _case(
            "gemv-repeat-splitk",
            1,
            64,
            512,
            64,
            repeat=True,
            config={"BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": 4},
        ),
        # tiled GEMM (M > 4)
        _case("gemm-m5-g32-bf16", 5, 33, 130, 32, "bf16"),
        _case("gemm-m20-kodd-g64", 20, 70, 257, 64),
        _case(
            "gemm-m20-g96-splitk4-bf16",
            20,
            70,
            300,
            96,
            "bf16",
            config={"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 4},
        ),
        _case("gemm-m33-perchannel", 33, 50, 200, -1, bias=False),
        _case(
            "gemm-m40-g32-bk128-bf16",
            40,
            48,
            300,
            32,
            "bf16",
            config={"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 128},
        ),
        _case("gemm-m200-no-split", 200, 40, 96, 32, "bf16"),
        _case(
            "gemm-m130-forced-split",
            130,
            20,
            200,
            64,
            config={"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 2},
        ),
        _case("gemm-forced-m1", 1, 40, 128, 32, kernel="gemm"),
        _case("gemv-forced-m11-bf16", 11, 40, 200, 64, "bf16", kernel="gemv"),
        _case("gemm-k1", 8, 10, 1, -1, "bf16"),
        _case("gemm-noncontig-bf16-params", 12, 36, 192, 64, param_dtype="bf16", noncontig=True),
        _case(
            "gemm-repeat-splitk-bf16",
            9,
            40,
            384,
            128,
            "bf16",
            repeat=True,
            config={"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": 3},
        ),
        _case("empty-m0", 0, 16, 64, 32),
        _case("empty-n0", 3, 0, 64, 32),
        _case("quant-math-g64-bf16", 6, 48, 320, 64, "bf16", quant_math=True),
    ]
    rng = random.Random(1234)
    for i in range(16):
        m = rng.choice([1, 2, 3, 4, rng.randint(5, 16), rng.randint(17, 80)])
        gs = rng.choice([32, 64, 128, -1])
        cases.append(
            _case(
                f"random{i}",
                m,
                rng.randint(1, 130),
                rng.randint(1, 520),
                gs,
                rng.choice(["fp16", "bf16"]),
                rng.random() < 0.5,
                param_dtype=rng.choice(["fp16", "bf16", "fp32"]),
                seed=i,
            )
        )
    return cases


CASES = _cases()


# ---------------------------------------------------------------------------------------
# Worker (runs in the TRITON_INTERPRET=1 subprocess)
# ---------------------------------------------------------------------------------------
def _guarded(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``t`` copied into the middle of a buffer padded with NaN (0xFF for uint8)."""
    fill = 0xFF if t.dtype == torch.uint8 else float("nan")
    buf = torch.full((t.numel() + 2 * PAD,), fill, dtype=t.dtype)
    view = buf[PAD : PAD + t.numel()].view(t.shape)
    view.copy_(t)
    return view, buf


def _guard_intact(buf: torch.Tensor, numel: int) -> bool:
    edges = torch.cat([buf[:PAD], buf[PAD + numel :]])
    return bool((edges == 0xFF).all()) if buf.dtype == torch.uint8 else bool(edges.isnan().all())


class _BoundsChecker:
    """Hooks Triton's interpreter memory primitives and records out-of-bounds accesses.

    ``ranges`` holds ``(start, end)`` byte ranges of the tensors passed to the current launch;
    every address a load / store / atomic really touches (mask on) must fit in one of them,
    else the access is refused with an ``AssertionError`` (the case fails, the worker lives).
    """

    def __init__(self) -> None:
        import numpy as np
        from triton.runtime import interpreter

        self.np = np
        self.ranges: list[tuple[int, int]] | None = None
        self.violations: list[str] = []
        builder = interpreter.InterpreterBuilder
        orig_load, orig_store = builder.create_masked_load, builder.create_masked_store
        orig_rmw = builder.create_atomic_rmw
        check = self.check

        def masked_load(b, ptrs, mask, other, cache_policy, is_volatile):
            check("load", ptrs, mask, ptrs.get_element_ty())
            return orig_load(b, ptrs, mask, other, cache_policy, is_volatile)

        def masked_store(b, ptrs, value, mask, cache_policy):
            check("store", ptrs, mask, value.dtype)
            return orig_store(b, ptrs, value, mask, cache_policy)

        def atomic_rmw(b, op, ptr, val, mask, sem, scope):
            check("atomic", ptr, mask, val.dtype)
            return orig_rmw(b, op, ptr, val, mask, sem, scope)

        builder.create_masked_load = masked_load
        builder.create_masked_store = masked_store
        builder.create_atomic_rmw = atomic_rmw

    def set_tensors(self, tensors) -> None:
        self.ranges = [
            (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size())
            for t in tensors
            if isinstance(t, torch.Tensor)
        ]

    def check(self, what: str, ptrs, mask, dtype) -> None:
        if self.ranges is None:
            return
        np = self.np
        addr = np.asarray(ptrs.data).astype(np.uint64)
        if mask is not None:
            addr = addr[np.broadcast_to(np.asarray(mask.data, dtype=bool), addr.shape)]
        addr = addr.reshape(-1)
        nbytes = max(1, getattr(dtype, "primitive_bitwidth", 8) // 8)
        ok = np.zeros(addr.shape, dtype=bool)
        for lo, hi in self.ranges:
            ok |= (addr >= lo) & (addr + nbytes <= hi)
        if not ok.all():
            msg = f"{what}: {int((~ok).sum())} out-of-bounds accesses"
            self.violations.append(msg)
            raise AssertionError(msg)  # never let the interpreter touch foreign memory


_CHECKER: _BoundsChecker | None = None


def _run_case(case: dict) -> dict:
    from w4a16_reference import DTYPES, error_ratio, make_inputs, pack_codes, unit_roundoff

    from awq_ao.kernels import w4a16

    kmod = w4a16._load_kernels()
    assert kmod.INTERPRET, "worker must run with TRITON_INTERPRET=1"
    m, n, k, gs = case["m"], case["n"], case["k"], case["gs"]
    dtype = DTYPES[case["dtype"]]
    inp = make_inputs(
        m,
        n,
        k,
        gs,
        dtype,
        case["bias"],
        param_dtype=DTYPES[case.get("param_dtype", "fp16")],
        zero_dtype=DTYPES[case["zero_dtype"]] if "zero_dtype" in case else None,
        frac_zero=case.get("frac_zero", False),
        bias_dtype=DTYPES[case["bias_dtype"]] if "bias_dtype" in case else None,
        seed=case.get("seed", 0),
    )
    if case.get("quant_math"):
        from awq_ao.lowering.quant_math import dequantize_codes, quantize

        w = torch.randn(n, k, generator=torch.Generator().manual_seed(7)) * 0.05
        codes, scale, zero = quantize(w, 4, gs, zero_point=True)
        inp["packed"] = pack_codes(codes)
        inp["scale"], inp["zero"] = scale.to(dtype), zero.to(dtype)
        w_hat = dequantize_codes(codes, inp["scale"], inp["zero"], gs, torch.float64)
        inp["ref"] = inp["x"].double() @ w_hat.T + inp["bias"].double()
        inp["abs_ref"] = inp["x"].double().abs() @ w_hat.abs().T + inp["bias"].double().abs()

    names = ["x", "packed", "scale", "zero"] + (["bias"] if inp["bias"] is not None else [])
    originals = {name: inp[name].clone() for name in names}
    guarded = {name: _guarded(inp[name]) for name in names}
    args = {name: view for name, (view, _) in guarded.items()}
    if case.get("noncontig") and m > 1:
        x_nc = torch.empty(k, m, dtype=dtype).t()
        x_nc.copy_(args["x"])
        args["x"] = x_nc
    out_buf = torch.full((m * n + 2 * PAD,), float("nan"), dtype=dtype)
    out = out_buf[PAD : PAD + m * n].view(m, n)

    paths = []
    real_launch = kmod.launch

    checker = _CHECKER
    checker.violations.clear()

    def recording_launch(path, x, w, s, z, bias, out, ws, cnt, *a, **kw):
        paths.append(path)
        checker.set_tensors([x, w, s, z, bias, out, ws, cnt])
        try:
            return real_launch(path, x, w, s, z, bias, out, ws, cnt, *a, **kw)
        finally:
            checker.ranges = None

    kmod.launch = recording_launch
    t0 = time.perf_counter()
    try:
        y = w4a16._w4a16_linear(
            args["x"],
            args["packed"],
            args["scale"],
            args["zero"],
            gs,
            args.get("bias"),
            kernel=case.get("kernel", "auto"),
            config=case.get("config"),
            out=out,
        )
        y_again = None
        if case.get("repeat"):
            y = y.clone()
            # another shape in between must not disturb the (shared) split-K workspace
            w4a16._w4a16_linear(
                args["x"][:, : k // 2 * 2],
                *_halfk(args, k, gs),
                gs,
                kernel=case.get("kernel", "auto"),
                config=case.get("config"),
            )
            y_again = w4a16._w4a16_linear(
                args["x"],
                args["packed"],
                args["scale"],
                args["zero"],
                gs,
                args.get("bias"),
                kernel=case.get("kernel", "auto"),
                config=case.get("config"),
            )
    finally:
        kmod.launch = real_launch
    seconds = time.perf_counter() - t0

    u = unit_roundoff(dtype, interpreter=True)
    ws_zero = all(bool((t == 0).all()) for pair in w4a16._WORKSPACE.values() for t in pair)
    return {
        "ratio": error_ratio(y, inp["ref"], inp["abs_ref"], k, u),
        "max_abs_err": float((y.double() - inp["ref"]).abs().max()) if y.numel() else 0.0,
        "shape_ok": tuple(y.shape) == (m, n) and y.dtype == dtype,
        "same_buffer": y.data_ptr() == out.data_ptr() if not case.get("repeat") else True,
        "out_guard_ok": _guard_intact(out_buf, m * n),
        "input_guards_ok": all(
            _guard_intact(buf, inp[name].numel()) for name, (_, buf) in guarded.items()
        ),
        "inputs_unchanged": all(torch.equal(guarded[name][0], originals[name]) for name in names),
        "ws_zero": ws_zero,
        "oob": list(checker.violations),
        "repeat_equal": (y_again is None) or torch.equal(y, y_again),
        "paths": paths,
        "seconds": seconds,
        "error": None,
    }


def _halfk(args: dict, k: int, gs: int) -> tuple:
    """Weights for the first ``2 * (k // 2)`` columns (a different problem, same rows)."""
    kk = k // 2 * 2
    g = -(-kk // (kk if gs == -1 else gs))
    return args["packed"][:, : kk // 2], args["scale"][:, :g], args["zero"][:, :g]


def _worker(cases_path: str, out_path: str) -> None:
    global _CHECKER
    torch.set_num_threads(1)
    _CHECKER = _BoundsChecker()
    cases = json.loads(Path(cases_path).read_text())
    results = {}
    for case in cases:
        try:
            results[case["id"]] = _run_case(case)
        except Exception:  # noqa: BLE001 - report every failure, keep going
            results[case["id"]] = {"error": traceback.format_exc()}
            from awq_ao.kernels import w4a16

            w4a16._WORKSPACE.clear()  # an aborted launch may leave it dirty
    Path(out_path).write_text(json.dumps(results))


# ---------------------------------------------------------------------------------------
# Tests (run in the pytest process)
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def interp_results() -> dict:
    """Run every case once in a ``TRITON_INTERPRET=1`` subprocess; return its report."""
    with tempfile.TemporaryDirectory() as tmp:
        cases_path = Path(tmp) / "cases.json"
        out_path = Path(tmp) / "results.json"
        cases_path.write_text(json.dumps(CASES))
        env = dict(os.environ, TRITON_INTERPRET="1")
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH")) if p
        )
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", str(cases_path), str(out_path)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        if proc.returncode != 0 or not out_path.exists():
            pytest.fail(
                f"interpreter worker failed (rc={proc.returncode}):\n"
                f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
            )
        return json.loads(out_path.read_text())


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_w4a16_matches_float64_reference(interp_results: dict, case: dict) -> None:
    r = interp_results[case["id"]]
    assert r["error"] is None, r["error"]
    assert r["shape_ok"], "wrong output shape or dtype"
    assert not r["oob"], r["oob"]
    assert r["ratio"] <= 1.0, f"error {r['ratio']:.3g} x the bound (max abs {r['max_abs_err']:.3g})"
    assert r["same_buffer"], "the out= buffer was not used"
    assert r["out_guard_ok"], "wrote outside the output"
    assert r["input_guards_ok"] and r["inputs_unchanged"], "wrote into an input or its guard"
    assert r["ws_zero"], "split-K workspace not restored to zero"
    assert r["repeat_equal"], "a second identical call gave a different result"
    if case["m"] and case["n"]:
        want = case.get("kernel", "auto")
        if want == "auto":
            want = "gemv" if case["m"] <= 4 else "gemm"
        assert r["paths"] and set(r["paths"]) == {want}, r["paths"]


def test_interpreter_suite_is_fast(interp_results: dict) -> None:
    """Guard the CI budget: all cases together stay well under a minute of kernel time."""
    total = sum(r.get("seconds", 0.0) for r in interp_results.values())
    assert total < 90, f"interpreter cases took {total:.1f}s"


# --- argument checking: fails before any kernel is imported, so no interpreter needed ----
def _valid(m: int = 2, n: int = 8, k: int = 64, gs: int = 32, dtype=torch.float16) -> list:
    g = -(-k // gs)
    return [
        torch.zeros(m, k, dtype=dtype),
        torch.zeros(n, (k + 1) // 2, dtype=torch.uint8),
        torch.ones(n, g, dtype=torch.float16),
        torch.zeros(n, g, dtype=torch.float16),
        gs,
    ]


def test_float32_activations_point_to_dequant_path() -> None:
    from awq_ao.kernels import w4a16_linear

    with pytest.raises(TypeError, match="dequant"):
        w4a16_linear(*_valid(dtype=torch.float32))


@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (lambda a: a.__setitem__(0, a[0].to(torch.int32)), TypeError, "float16 or bfloat16"),
        (lambda a: a.__setitem__(0, a[0][None]), ValueError, "2-D"),
        (lambda a: a.__setitem__(1, a[1][:, :-1]), ValueError, "ceil"),
        (lambda a: a.__setitem__(1, a[1].to(torch.int8)), TypeError, "uint8"),
        (lambda a: a.__setitem__(2, a[2][:, :1]), ValueError, "scale must have shape"),
        (lambda a: a.__setitem__(3, a[3][:-1]), ValueError, "zero must have shape"),
        (lambda a: a.__setitem__(4, 0), ValueError, "group_size"),
        (lambda a: a.__setitem__(4, 32.0), TypeError, "group_size"),
        (lambda a: a.__setitem__(2, a[2].to(torch.int32)), TypeError, "scale"),
    ],
    ids=[
        "int-x",
        "3d-x",
        "packed-width",
        "packed-dtype",
        "scale-shape",
        "zero-shape",
        "group-zero",
        "group-float",
        "scale-dtype",
    ],
)
def test_bad_arguments(mutate, exc, match) -> None:
    from awq_ao.kernels import w4a16_linear

    args = _valid()
    mutate(args)
    with pytest.raises(exc, match=match):
        w4a16_linear(*args)


def test_odd_group_size_bias_and_kernel_choice() -> None:
    from awq_ao.kernels import w4a16_linear

    x, p, _, _, _ = _valid(k=66)
    g = -(-66 // 33)
    s, z = torch.ones(8, g, dtype=torch.float16), torch.zeros(8, g, dtype=torch.float16)
    with pytest.raises(ValueError, match="odd"):
        w4a16_linear(x, p, s, z, 33)
    with pytest.raises(ValueError, match="bias"):
        w4a16_linear(*_valid(), bias=torch.zeros(7))
    with pytest.raises(ValueError, match="gemv"):
        w4a16_linear(*_valid(m=17), kernel="gemv")
    with pytest.raises(ValueError, match="kernel"):
        w4a16_linear(*_valid(), kernel="fast")


def test_empty_batch_returns_empty() -> None:
    from awq_ao.kernels import w4a16_linear

    y = w4a16_linear(*_valid(m=0, dtype=torch.bfloat16))
    assert y.shape == (0, 8) and y.dtype == torch.bfloat16


def test_is_available_is_bool() -> None:
    from awq_ao.kernels import is_available

    assert isinstance(is_available(), bool)


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--worker":
    _worker(sys.argv[2], sys.argv[3])
