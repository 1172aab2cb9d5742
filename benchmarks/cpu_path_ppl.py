"""Perplexity of one INT4 model through each CPU kernel path, forced for every M.

The CPU decode paths do not compute exactly what the float32 dequantizing path computes:
awq_ao's C++ kernel rounds activations to int16 per (row, group), ATen's tinygemm to
bfloat16. Issue 13's bar: a path may change the perplexity by less than 0.1%. This runs
SmolLM2-135M (real weights, ../shared), INT4 round-to-nearest at ``--group-size``, on the
first ``--windows`` WikiText-2 test windows of 2048 tokens, with every linear forced through
``dequant`` (float32 reference), ``ext`` (C++ kernel) and ``tinygemm`` (ATen, bfloat16).
With ``--heads keep,int8`` the paths are measured again after the tied embedding/head is stored
in 8 bits (``awq_ao.quantize_head``; the head follows the forced path too: ``ext`` is the C++
int8 kernel, ``tinygemm`` leaves it on its default, dequantization at these M).

    python benchmarks/cpu_path_ppl.py [--windows 8] [--group-size 64] [--heads keep,int8]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cpu_decode import machine_info, to_awq_ao, versions  # noqa: E402

from awq_ao.evaluation import perplexity, text_ids  # noqa: E402
from awq_ao.lowering import cpu_kernels  # noqa: E402
from awq_ao.lowering.head import quantize_head  # noqa: E402
from devtools.shared_data import load_smollm2, wikitext_test  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--paths", default="dequant,ext,tinygemm")
    ap.add_argument("--heads", default="keep", help="keep and/or int8 (in that order)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "cpu_path_ppl.json"))
    args = ap.parse_args(argv)
    model, tok = load_smollm2(torch.float32)
    to_awq_ao(model, args.group_size)
    ids = text_ids(tok, wikitext_test())
    rows: list[dict] = []
    with torch.no_grad():
        for head in args.heads.split(","):
            if head == "int8":
                quantize_head(model)
            elif head != "keep":
                raise SystemExit(f"--heads: keep or int8, got {head!r}")
            for path in args.paths.split(","):
                t0 = time.perf_counter()
                with cpu_kernels.forced_path(path):
                    ppl, n = perplexity(model, ids, max_windows=args.windows)
                rows.append({"path": path, "head": head, "perplexity": round(ppl, 4), "windows": n,
                             "seconds": round(time.perf_counter() - t0, 1)})
                print(json.dumps(rows[-1]), flush=True)
                _write(args, argv, rows)  # after every row: a stopped run keeps what it measured
    return 0


def _write(args, argv, rows: list[dict]) -> None:
    ref = next((r["perplexity"] for r in rows if r["path"] == "dequant" and r.get("head", "keep") == "keep"), None)
    for r in rows:
        if ref:
            r["change_vs_dequant_pct"] = round(100 * (r["perplexity"] / ref - 1), 4)
    out = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "versions": versions(),
        "model": "SmolLM2-135M-Instruct (shared Q4_1 GGUF, dequantized to float32)",
        "quantization": f"INT4 g{args.group_size} round-to-nearest (awq_ao quantize_linear_module)",
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
