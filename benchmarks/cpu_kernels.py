"""Per-layer CPU matmul candidates for INT4 weights, measured interleaved on one machine.

For Llama-3.2-1B layer shapes and M = 1 ... 512 activation rows, in float32, bfloat16 and
float16: the dense matmul (``F.linear``), and awq_ao's ``Int4WeightTensor`` through each CPU
path forced (``ext``: awq_ao's C++ kernel; ``tinygemm``: ATen's ``_weight_int4pack_mm_for_cpu``
in bfloat16; ``dequant``: block dequantization + float32 matmul) and as chosen (``auto``).
Each configuration's candidates run round-robin (``--rounds`` rounds, median per candidate),
so they see the same machine load. These numbers choose the paths; ``docs/cpu_kernels.md``
holds the table.

    python benchmarks/cpu_kernels.py [--out benchmarks/results/cpu_kernels.json] [--ms 1,16,512]
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

from awq_ao.lowering import Int4WeightTensor, cpu_ext, cpu_kernels  # noqa: E402

SHAPES = [(2048, 2048), (8192, 2048), (2048, 8192)]  # (N, K): q/o, gate/up, down
MS = [1, 4, 16, 32, 64, 128, 256, 512]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _once(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(fns: dict, rounds: int, min_s: float) -> dict:
    """Median ms of each candidate; candidates alternate call by call, ``rounds`` rounds of
    about ``min_s`` seconds each (two warm-up calls each first)."""
    for fn in fns.values():
        fn()
        fn()
    times: dict = {k: [] for k in fns}
    for _ in range(rounds):
        t_end = time.perf_counter() + min_s
        while True:
            for k, fn in fns.items():
                times[k].append(_once(fn))
            if time.perf_counter() > t_end:
                break
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "cpu_kernels.json"))
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--dtypes", default="float32,bfloat16,float16")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--min-s", type=float, default=0.2)
    args = ap.parse_args(argv)
    gs = args.group_size
    ms = [int(m) for m in args.ms.split(",")]
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    rows = []
    torch.manual_seed(0)
    ext = cpu_ext.load()
    for n, k in SHAPES:
        w32 = torch.randn(n, k) * 0.02
        q = Int4WeightTensor.from_float(w32, 4, gs)
        assert q.pack_layout == "cpu_tinygemm", q.pack_layout
        for m in ms:
            for dtype in dtypes:
                x = torch.randn(m, k).to(dtype)
                wd = w32.to(dtype)
                fns = {"dense": lambda x=x, wd=wd: F.linear(x, wd)}
                for path in (["ext"] if ext else []) + ["tinygemm", "dequant"]:
                    def run(x=x, path=path, q=q):
                        with cpu_kernels.forced_path(path):
                            F.linear(x, q)
                    fns[path] = run
                fns["auto"] = lambda x=x, q=q: F.linear(x, q)
                t = interleaved(fns, args.rounds, args.min_s)
                r = {"N": n, "K": k, "M": m, "dtype": str(dtype).removeprefix("torch.")}
                r.update({f"{key}_ms": round(v, 3) for key, v in t.items()})
                r["auto_vs_dense"] = round(t["dense"] / t["auto"], 2)
                rows.append(r)
                print(json.dumps(r), flush=True)
    from awq_ao.lowering.cpu_kernels import chosen_paths

    out = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
           "date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine_info(),
           "versions": versions(), "group_size": gs, "threads": torch.get_num_threads(),
           "cpp_kernels": ext or cpu_ext.unavailable_reason(),
           "awq_ao_paths": {" ".join(map(str, k)): v for k, v in chosen_paths().items()}, "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    cols = ["dense", "ext", "tinygemm", "dequant", "auto"]
    print(f"\n{'N':>5} {'K':>5} {'M':>4} {'dtype':9} " + " ".join(f"{c:>9}" for c in cols) + "  auto vs dense")
    for r in rows:
        vals = " ".join(f"{r.get(c + '_ms', float('nan')):9.3f}" for c in cols)
        print(f"{r['N']:5} {r['K']:5} {r['M']:4} {r['dtype']:9} {vals}  {r['auto_vs_dense']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
