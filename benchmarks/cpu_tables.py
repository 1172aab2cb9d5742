"""Markdown tables from benchmarks/results/cpu_decode.json and cpu_kernels.json (for the docs).

    python benchmarks/cpu_tables.py
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


ORDER = ["fp32", "bf16", "awq_fp32", "awq_bf16", "torchao_bf16", "llamacpp_q4_0"]


def decode_table(path: Path = RESULTS / "cpu_decode.json") -> str:
    """Decode and prefill tokens/s per (model, variant, mode), with the ratios of the JSON.

    llama.cpp runs in one mode of its own (``native``); its ratio cells compare it with the
    dense model's eager run, and every other row's ``vs llama.cpp`` compares it with llama.cpp.
    """
    d = json.loads(path.read_text())
    m = d["machine"]
    lines = [f"Machine: {m.get('cpu')}, {m.get('cpu_count')} cores, ISA {m.get('isa')}"
             f" (ATen capability {m.get('aten_cpu_capability')}, tinygemm variant {m.get('tinygemm_variant')})"
             + (f", limited by {m['isa_limits']}" if m.get("isa_limits") else "")
             + f"; torch {d['versions']['torch']}; {d['date']}.", "",
             "| model | variant | mode | decode tok/s | vs fp32 dense | vs bf16 dense | vs llama.cpp "
             "| prefill tok/s | vs fp32 dense | vs bf16 dense | vs llama.cpp |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    res = {(r["model"], r["variant"], r["mode"], r["metric"]): r for r in d["results"]}
    keys = sorted({(r["model"], r["variant"], r["mode"]) for r in d["results"]},
                  key=lambda k: (k[0], ORDER.index(k[1]) if k[1] in ORDER else 9, k[2]))
    for model, variant, mode in keys:
        cells = [model, variant, mode]
        for metric in ("decode", "prefill"):
            r = res.get((model, variant, mode, metric))
            if r is None:
                cells += ["-"] * 4
                continue
            fp = r.get("vs_fp32_dense", r.get("vs_fp32_dense_eager", ""))
            bf = r.get("vs_bf16_dense", r.get("vs_bf16_dense_eager", ""))
            cells += [f"{r['median_tok_s']:.2f}", str(fp), str(bf), str(r.get("vs_llamacpp", ""))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def kernels_table(path: Path = RESULTS / "cpu_kernels.json") -> str:
    d = json.loads(path.read_text())
    lines = ["| N x K | M | dtype | dense ms | ATen tinygemm, same dtype, ms | awq_ao ms | awq_ao speed-up |",
             "|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        tg = "-" if r["tinygemm_same_dtype_ms"] is None else f"{r['tinygemm_same_dtype_ms']:.3f}"
        lines.append(f"| {r['N']} x {r['K']} | {r['M']} | {r['dtype']} | {r['dense_ms']:.3f} | {tg} | "
                     f"{r['awq_ao_ms']:.3f} | {r['awq_ao_vs_dense']:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    for name, fn in (("cpu_decode", decode_table), ("cpu_kernels", kernels_table)):
        try:
            print(f"<!-- {name} -->\n{fn()}\n")
        except FileNotFoundError as e:
            print(f"<!-- {name}: {e} -->")
