"""Per-layer CPU matmul candidates for INT4 weights, measured interleaved on one machine.

For Llama-3.2-1B layer shapes and M = 1 ... 512 activation rows, in float32, bfloat16 and
float16: the dense matmul (``F.linear``), ATen's tinygemm ``_weight_int4pack_mm_for_cpu`` in
each activation dtype, and awq_ao's ``Int4WeightTensor`` (which picks its path by M; see
``awq_ao/lowering/cpu_kernels.py``). These numbers choose the paths; ``docs/cpu_kernels.md``
holds the table.

    python benchmarks/cpu_kernels.py [--out benchmarks/results/cpu_kernels.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_decode import machine_info, versions  # noqa: E402

from awq_ao.lowering import Int4WeightTensor  # noqa: E402

SHAPES = [(2048, 2048), (8192, 2048), (2048, 8192)]  # (N, K): q/o, gate/up, down
MS = [1, 4, 16, 32, 64, 128, 512]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def bench(fn, min_s: float = 0.3) -> float:
    """Median ms of ``fn`` over runs filling ``min_s`` (after two warm-up calls)."""
    fn()
    fn()
    times = []
    t_end = time.perf_counter() + min_s
    while time.perf_counter() < t_end or len(times) < 3:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "cpu_kernels.json"))
    ap.add_argument("--group-size", type=int, default=128)
    args = ap.parse_args(argv)
    gs = args.group_size
    rows = []
    torch.manual_seed(0)
    for n, k in SHAPES:
        w32 = torch.randn(n, k) * 0.02
        dense = {dt: w32.to(dt) for dt in DTYPES}
        q = Int4WeightTensor.from_float(w32, 4, gs)
        assert q.pack_layout == "cpu_tinygemm", q.pack_layout
        sz = {dt: q.scales_and_zeros.to(dt) for dt in DTYPES}
        tg = gs
        for m in MS:
            for dtype in DTYPES:
                x = torch.randn(m, k).to(dtype)
                wd, szd = dense[dtype], sz[dtype]
                r = {"N": n, "K": k, "M": m, "dtype": str(dtype).removeprefix("torch.")}
                r["dense_ms"] = bench(lambda x=x, wd=wd: F.linear(x, wd))
                # ATen's float32 / float16 tinygemm take seconds per call at large M: M <= 16 only
                r["tinygemm_same_dtype_ms"] = bench(
                    lambda x=x, q=q, szd=szd, tg=tg: torch.ops.aten._weight_int4pack_mm_for_cpu(x, q.packed, tg, szd)
                ) if dtype == torch.bfloat16 or m <= 16 else None
                r["awq_ao_ms"] = bench(lambda x=x, q=q: F.linear(x, q))
                r["awq_ao_vs_dense"] = round(r["dense_ms"] / r["awq_ao_ms"], 2)
                for key in ("dense_ms", "tinygemm_same_dtype_ms", "awq_ao_ms"):
                    r[key] = None if r[key] is None else round(r[key], 3)
                rows.append(r)
                print(json.dumps(r), flush=True)
    from awq_ao.lowering.cpu_kernels import chosen_paths

    out = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
           "date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine_info(),
           "versions": versions(), "group_size": gs,
           "awq_ao_paths": {" ".join(map(str, k)): v for k, v in chosen_paths().items()}, "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"\n{'N':>5} {'K':>5} {'M':>4} {'dtype':9} {'dense':>8} {'tg same':>8} {'awq_ao':>8}  speed-up")
    for r in rows:
        tg_ms = "-" if r["tinygemm_same_dtype_ms"] is None else f"{r['tinygemm_same_dtype_ms']:.3f}"
        print(f"{r['N']:5} {r['K']:5} {r['M']:4} {r['dtype']:9} {r['dense_ms']:8.3f} "
              f"{tg_ms:>8} {r['awq_ao_ms']:8.3f}  {r['awq_ao_vs_dense']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
