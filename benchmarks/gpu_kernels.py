"""W4A16 kernel benchmark: awq_ao's Triton kernels vs cuBLAS fp16/bf16 vs torchao int4.

Shapes are the linear layers of Llama-3-8B, written ``N x K`` with N = out_features (rows of
the weight, columns of the output) and K = in_features (the reduction dimension)::

    q_proj / o_proj   N=4096   K=4096
    k_proj / v_proj   N=1024   K=4096
    gate / up_proj    N=14336  K=4096
    down_proj         N=4096   K=14336
    qkv (fused)       N=6144   K=4096     (4096 + 2 * 1024)
    gate_up (fused)   N=28672  K=4096     (2 * 14336)

For every shape and M (tokens) in 1 2 4 8 16 32 64 128 512 2048, in the same process and on
the same weights, it times

* ``ours_fp16`` / ``ours_bf16``: :func:`awq_ao.kernels.w4a16_linear` (``kernel="auto"``),
  4-bit codes, group scales/zeros in the activation dtype;
* ``ours_gemv_*`` / ``ours_gemm_*`` (M <= 16): each kernel forced, to tune ``DECODE_MAX_M``;
* ``cublas_fp16`` / ``cublas_bf16``: ``F.linear`` with the dense weight;
* ``torchao_int4``: ``quantize_(linear, Int4WeightOnlyConfig(group_size,
  int4_packing_format="tile_packed_to_4d"))`` -- the tinygemm kernel
  (``aten._weight_int4pack_mm``), bf16 activations only;

with ``triton.testing.do_bench`` (CUDA events, L2 flushed before every call, median of the
repetitions), after one untimed call that triggers autotuning. It reports microseconds,
speedups (reference time / our time), achieved GB/s (bytes every method must move at least
once: weights + group parameters + activations + output, divided by time), TFLOP/s, and the
device's copy bandwidth, measured with a 1 GiB device-to-device copy (read + write bytes).
Each of our results is also checked against ``F.linear`` with the dequantized weight.

Prints a table and writes ``benchmarks/results/kernels-<gpu>.json`` with the command, the
machine, library versions and the date. Needs a CUDA GPU; exits with a message otherwise.

    python benchmarks/gpu_kernels.py                      # everything (a few minutes)
    python benchmarks/gpu_kernels.py --quick              # 3 shapes, M in 1 16 512
    python benchmarks/gpu_kernels.py --shapes down_proj --m 1 4 --dtypes bf16
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import re
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

#: name -> (N = out_features, K = in_features) of Llama-3-8B linear layers.
SHAPES: dict[str, tuple[int, int]] = {
    "q_proj/o_proj": (4096, 4096),
    "k_proj/v_proj": (1024, 4096),
    "gate_proj/up_proj": (14336, 4096),
    "down_proj": (4096, 14336),
    "qkv_fused": (6144, 4096),
    "gate_up_fused": (28672, 4096),
}
M_VALUES = [1, 2, 4, 8, 16, 32, 64, 128, 512, 2048]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


# ------------------------------------------------------------------------------------------
# Pieces that need no GPU (kept separate so they can be exercised anywhere)
# ------------------------------------------------------------------------------------------
def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """``uint8 [N, K]`` codes -> ``uint8 [N, ceil(K/2)]``, low nibble = even k."""
    n, k = codes.shape
    if k % 2:
        codes = torch.cat([codes, codes.new_zeros(n, 1)], dim=1)
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()


def quantize_weight(w: torch.Tensor, group_size: int) -> dict:
    """4-bit asymmetric group quantization with the package's own math.

    Returns ``packed``, fp32 ``scale``/``zero`` ``[N, G]`` and the fp32 dequantized weight.
    """
    from awq_ao.lowering.quant_math import dequantize_codes, quantize

    codes, scale, zero = quantize(w.float(), 4, group_size, zero_point=True)
    w_hat = dequantize_codes(codes, scale, zero, group_size, torch.float32)
    return {"packed": pack_codes(codes), "scale": scale, "zero": zero, "w_hat": w_hat}


def bytes_moved(
    method: str, m: int, n: int, k: int, group_size: int, act_bytes: int = 2, param_bytes: int = 2
) -> int:
    """Minimum bytes a method must move: weights, group params, activations, output."""
    g = math.ceil(k / (k if group_size == -1 else group_size))
    io = (m * k + m * n) * act_bytes
    if method.startswith("cublas"):
        return n * k * act_bytes + io
    if method.startswith("torchao"):  # int4 tiles + bf16 [G, N, 2] scales_and_zeros
        return n * k // 2 + g * n * 2 * 2 + io
    return n * ((k + 1) // 2) + 2 * n * g * param_bytes + io  # ours: codes + scale + zero


def slug(name: str) -> str:
    """File-name-safe lower-case version of ``name`` (e.g. a GPU name)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def machine_info() -> dict:
    """GPU, CPU and library versions for the JSON report."""
    info: dict = {"python": platform.python_version(), "platform": platform.platform()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        info["cpu"] = platform.processor()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info.update(
            gpu=props.name,
            gpu_sm_count=props.multi_processor_count,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            gpu_capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
        )
    versions = {"torch": torch.__version__}
    for mod in ("triton", "torchao", "awq_ao"):
        try:
            versions[mod] = getattr(__import__(mod), "__version__", "unknown")
        except Exception as exc:  # noqa: BLE001 - report, don't fail
            versions[mod] = f"unavailable ({type(exc).__name__})"
    info["versions"] = versions
    return info


def format_table(rows: list[dict], dtypes: list[str]) -> str:
    """Fixed-width table: per (shape, M) times in us, speedups and our GB/s."""
    head = ["shape (N x K)", "M"]
    for d in dtypes:
        head += [f"ours {d}", f"cuBLAS {d}", "x"]
    if "bf16" in dtypes:
        head += ["torchao int4", "x"]
    head += ["ours GB/s", "% copy"]
    lines = [head]

    def us(v):
        return "-" if v is None else f"{v:.1f}"

    def ratio(a, b):
        return "-" if a is None or b is None else f"{a / b:.2f}"

    for r in rows:
        t = r["times_us"]
        line = [f"{r['shape']} ({r['N']}x{r['K']})", str(r["M"])]
        for d in dtypes:
            line += [
                us(t.get(f"ours_{d}")),
                us(t.get(f"cublas_{d}")),
                ratio(t.get(f"cublas_{d}"), t.get(f"ours_{d}")),
            ]
        if "bf16" in dtypes:
            line += [us(t.get("torchao_int4")), ratio(t.get("torchao_int4"), t.get("ours_bf16"))]
        main = f"ours_{dtypes[0]}"
        gbps = r["gbps"].get(main)
        line += [
            "-" if gbps is None else f"{gbps:.0f}",
            "-" if r.get("copy_fraction") is None else f"{100 * r['copy_fraction']:.0f}",
        ]
        lines.append(line)
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    out = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


# ------------------------------------------------------------------------------------------
# GPU parts
# ------------------------------------------------------------------------------------------
def _bench_us(fn) -> float:
    """Median time of ``fn`` in microseconds (CUDA events, L2 flushed between calls)."""
    import triton.testing

    fn()  # autotuning / compilation / lazy init happen here, untimed
    torch.cuda.synchronize()
    ms = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5])
    return 1000.0 * (ms[0] if isinstance(ms, list | tuple) else ms)


def copy_bandwidth_gbps(nbytes: int = 1 << 30, device: str = "cuda", timer=None) -> float:
    """Device-to-device copy bandwidth in GB/s, counting read + write bytes."""
    timer = timer or _bench_us
    buffers = {"src": torch.empty(nbytes, dtype=torch.uint8, device=device)}
    buffers["dst"] = torch.empty_like(buffers["src"])
    t_us = timer(lambda: buffers["dst"].copy_(buffers["src"]))
    buffers.clear()
    if device == "cuda":
        torch.cuda.empty_cache()
    return 2 * nbytes / (t_us * 1e-6) / 1e9


def _torchao_int4(w: torch.Tensor, group_size: int):
    """A bf16 ``nn.Linear`` converted by torchao's int4 weight-only (tinygemm) config."""
    from torchao.quantization import Int4WeightOnlyConfig, quantize_

    n, k = w.shape
    lin = torch.nn.Linear(k, n, bias=False, device=w.device, dtype=torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(w.to(torch.bfloat16))
    quantize_(
        lin, Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d")
    )
    return lin


def run(args: argparse.Namespace, device: str = "cuda", timer=None) -> dict:
    """Benchmark every shape x M; ``device``/``timer`` exist so the bookkeeping can be
    dry-run on CPU with ``TRITON_INTERPRET=1`` and a dummy timer (tiny shapes only)."""
    from awq_ao.kernels import w4a16_linear

    timer = timer or _bench_us
    dtypes = args.dtypes
    shapes = getattr(args, "shape_table", SHAPES)
    copy_gbps = copy_bandwidth_gbps(
        device=device, timer=timer, **({} if device == "cuda" else {"nbytes": 1 << 20})
    )
    name = torch.cuda.get_device_name() if device == "cuda" else device
    print(f"device: {name}  copy bandwidth: {copy_gbps:.0f} GB/s", flush=True)
    rows: list[dict] = []
    for name in args.shapes:
        n, k = shapes[name]
        gen = torch.Generator(device=device).manual_seed(0)
        w = torch.randn(n, k, device=device, generator=gen) * 0.02
        q = quantize_weight(w, args.group_size)
        w_dense = {d: w.to(DTYPES[d]) for d in dtypes}
        params = {d: (q["scale"].to(DTYPES[d]), q["zero"].to(DTYPES[d])) for d in dtypes}
        ao_lin, ao_error = None, None
        if "bf16" in dtypes and not args.no_torchao:
            try:
                ao_lin = _torchao_int4(w, args.group_size)
            except Exception as exc:  # noqa: BLE001 - record and go on
                ao_error = f"{type(exc).__name__}: {exc}"
                print(f"torchao int4 unavailable for {name}: {ao_error}", flush=True)
        for m in args.m:
            row = {
                "shape": name,
                "N": n,
                "K": k,
                "M": m,
                "group_size": args.group_size,
                "times_us": {},
                "gbps": {},
                "tflops": {},
                "speedup": {},
                "rel_err_fro": {},
            }
            x32 = torch.randn(m, k, device=device, generator=gen)
            for d in dtypes:
                x = x32.to(DTYPES[d])
                s, z = params[d]
                ref = F.linear(x.float(), q["w_hat"])
                kernels = [("auto", f"ours_{d}")]
                if m <= 16:
                    kernels += [("gemv", f"ours_gemv_{d}"), ("gemm", f"ours_gemm_{d}")]
                for kern, key in kernels:

                    def ours(x=x, p=q["packed"], s=s, z=z, kern=kern):
                        return w4a16_linear(x, p, s, z, args.group_size, kernel=kern)

                    y = ours()
                    err = ((y.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
                    row["rel_err_fro"][key] = err
                    if not err < 2e-2:
                        print(f"WARNING: {key} {name} M={m}: relative error {err:.3g}")
                    row["times_us"][key] = timer(ours)
                wd = w_dense[d]
                row["times_us"][f"cublas_{d}"] = timer(lambda x=x, wd=wd: F.linear(x, wd))
                if d == "bf16" and ao_lin is not None:
                    try:
                        with torch.no_grad():
                            row["times_us"]["torchao_int4"] = timer(lambda x=x, lin=ao_lin: lin(x))
                    except Exception as exc:  # noqa: BLE001
                        row["torchao_error"] = f"{type(exc).__name__}: {exc}"
            if ao_error is not None:
                row["torchao_error"] = ao_error
            for key, t in row["times_us"].items():
                method = key.replace("ours_gemv", "ours").replace("ours_gemm", "ours")
                nbytes = bytes_moved(method, m, n, k, args.group_size)
                row["gbps"][key] = nbytes / (t * 1e-6) / 1e9
                row["tflops"][key] = 2 * m * n * k / (t * 1e-6) / 1e12
            t = row["times_us"]
            for d in dtypes:
                if f"ours_{d}" in t:
                    row["speedup"][f"vs_cublas_{d}"] = t[f"cublas_{d}"] / t[f"ours_{d}"]
            if "torchao_int4" in t and "ours_bf16" in t:
                row["speedup"]["vs_torchao_int4"] = t["torchao_int4"] / t["ours_bf16"]
            main = f"ours_{dtypes[0]}"
            row["copy_fraction"] = row["gbps"][main] / copy_gbps
            rows.append(row)
            print(format_table([row], dtypes).splitlines()[-1], flush=True)
        del w, q, w_dense, params, ao_lin
        if device == "cuda":
            torch.cuda.empty_cache()
    return {"copy_bandwidth_gbps": copy_gbps, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--m", type=int, nargs="+", default=M_VALUES, help="token counts M")
    parser.add_argument(
        "--shapes",
        nargs="+",
        default=list(SHAPES),
        choices=list(SHAPES),
        metavar="SHAPE",
        help=f"subset of {list(SHAPES)}",
    )
    parser.add_argument("--dtypes", nargs="+", default=["fp16", "bf16"], choices=list(DTYPES))
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--no-torchao", action="store_true", help="skip the torchao baseline")
    parser.add_argument(
        "--quick", action="store_true", help="q_proj, k_proj and down_proj shapes at M = 1, 16, 512"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON path (default benchmarks/results/kernels-<gpu>.json)",
    )
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.quick:
        args.shapes = ["q_proj/o_proj", "k_proj/v_proj", "down_proj"]
        args.m = [1, 16, 512]

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit(
            "benchmarks/gpu_kernels.py: TRITON_INTERPRET is set; timings of the CPU "
            "interpreter mean nothing. Unset it and run on a CUDA GPU."
        )
    if not torch.cuda.is_available():
        sys.exit(
            "benchmarks/gpu_kernels.py needs a CUDA GPU: torch.cuda.is_available() is False "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda}). "
            "Nothing was measured."
        )

    started = _dt.datetime.now(_dt.UTC)
    result = run(args)
    report = {
        "benchmark": "w4a16 kernels",
        "command": shlex.join([sys.executable, str(Path(__file__).relative_to(ROOT)), *argv]),
        "date": started.isoformat(timespec="seconds"),
        "machine": machine_info(),
        "settings": {
            "group_size": args.group_size,
            "dtypes": args.dtypes,
            "m": args.m,
            "shapes": {s: {"N": SHAPES[s][0], "K": SHAPES[s][1]} for s in args.shapes},
            "timer": "triton.testing.do_bench median, L2 flushed, warmup=25 rep=100",
        },
        "notes": (
            "times in microseconds; speedup = reference time / ours; gbps = minimum "
            "bytes moved / time; copy_fraction = ours GB/s / device copy GB/s"
        ),
        **result,
    }
    print()
    print(format_table(result["rows"], args.dtypes))
    print(
        f"\ncopy bandwidth (1 GiB device-to-device, read+write): "
        f"{result['copy_bandwidth_gbps']:.0f} GB/s"
    )
    out = args.out or ROOT / "benchmarks" / "results" / (
        f"kernels-{slug(report['machine'].get('gpu', 'gpu'))}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
