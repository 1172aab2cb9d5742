"""Main job: quantize SmolLM2-135M with awq_ao and report FP vs AWQ perplexity, size and speed.

Run: ``python -m devtools.main_job [--bits 4] [--group-size 64] [--windows 40] [--rtn]``.
``--rtn`` adds the round-to-nearest row and the share of the RTN-FP gap AWQ closes (one more
40-window evaluation: about 4 minutes on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import sys
import time
from pathlib import Path

import torch

from awq_ao.api import quantize
from awq_ao.evaluation import batches, calibration_blocks, perplexity
from awq_ao.lowering.swap import footprint, model_size_bytes
from devtools.machine_record import machine_info
from devtools.shared_data import calibration_text, load_smollm2, wikitext_test


def main(argv: list[str] | None = None) -> dict:
    """Run the job; print a table and return the results as a dict."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--windows", type=int, default=40, help="2048-token WikiText-2 windows")
    ap.add_argument("--n-samples", type=int, default=32,
                    help="calibration sequences (32: the quality benchmark's; 64 measured the same perplexity, 22.857, and costs ~50 s more)")
    ap.add_argument("--seq-len", type=int, default=512, help="calibration sequence length")
    ap.add_argument("--search-samples", type=int, default=16, help="sequences used by the search")
    ap.add_argument("--in-memory", action="store_true",
                    help="search on the whole model at once instead of layer by layer (sequential)")
    ap.add_argument("--calib", default="wiki.valid.tokens", help="calibration text file")
    ap.add_argument("--rounding", choices=["nearest", "gptq"], default="gptq",
                    help="codes on the AWQ grid: gptq error feedback (the library default) or nearest (plain AWQ)")
    ap.add_argument("--rtn", action="store_true",
                    help="also quantize by round-to-nearest and evaluate it (the gap-closed figure; ~4 min more on 2 cores)")
    ap.add_argument("--json", default=None, help="also write results to this JSON file")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, tok = load_smollm2(torch.float32)
    load_s = time.perf_counter() - t0
    ids = tok(wikitext_test(), return_tensors="pt", verbose=False).input_ids[0]
    calib = calibration_blocks(tok, calibration_text(args.calib), args.n_samples, args.seq_len)
    print(f"SmolLM2-135M loaded in {load_s:.1f}s; WikiText-2 test: {ids.numel()} tokens; "
          f"calibration: {calib.shape[0]} x {calib.shape[1]} tokens from {args.calib}")
    rows = []

    def evaluate(name: str, m: torch.nn.Module, qtime: float | None) -> None:
        t = time.perf_counter()
        ppl, n = perplexity(m, ids, 2048, args.windows, progress=True)
        eval_s = time.perf_counter() - t
        fp = footprint(m)
        rows.append({"method": name, "perplexity": ppl, "windows": n,
                     "size_mib": model_size_bytes(m) / 2**20, "quant_s": qtime, "eval_s": eval_s,
                     "prefill_tok_s": n * 2048 / eval_s, "decode_tok_s": _decode_speed(m, ids),
                     "bits_per_weight": fp["bits_per_weight"],
                     "full_precision_mib": fp["full_precision_bytes"] / 2**20})
        r = rows[-1]
        bpw = f", {r['bits_per_weight']:.2f} bits/weight" if r["bits_per_weight"] else ""
        print(f"  {name:5s} ppl {ppl:8.3f} ({n} windows)  size {r['size_mib']:.1f} MiB{bpw}  "
              f"prefill {r['prefill_tok_s']:.0f} tok/s  decode {r['decode_tok_s']:.1f} tok/s"
              + (f"  quantized in {qtime:.0f}s" if qtime is not None else ""), flush=True)

    evaluate("FP32", model, None)
    opts = dict(bits=args.bits, group_size=args.group_size, verbose=False)
    if args.rtn:
        rtn = copy.deepcopy(model)
        t = time.perf_counter()
        quantize(rtn, None, scale_search=False, clip=False, **opts)
        evaluate("RTN", rtn, time.perf_counter() - t)
        del rtn
    awq = copy.deepcopy(model)
    t = time.perf_counter()
    report = quantize(awq, list(batches(calib, 8)), max_search_samples=args.search_samples,
                      sequential=False if args.in_memory else "auto", rounding=args.rounding, **opts)
    qtime = time.perf_counter() - t
    print(report.summary(max_rows=5))
    evaluate("AWQ", awq, qtime)
    fp, a = rows[0]["perplexity"], rows[-1]["perplexity"]
    line = f"\nINT{args.bits} g{args.group_size}: FP {fp:.3f} | "
    closed = None
    if args.rtn:
        r = rows[1]["perplexity"]
        closed = (r - a) / (r - fp) if r != fp else float("nan")
        line += f"RTN {r:.3f} | awq_ao {a:.3f} -> closes {100 * closed:.0f}% of the RTN-FP gap"
    else:
        line += f"awq_ao {a:.3f} ({100 * (a / fp - 1):+.1f}% perplexity; --rtn adds the round-to-nearest row)"
    print(f"{line}; total time {time.perf_counter() - t0:.0f}s")
    f32, q = rows[0], rows[-1]
    print(f"speed (eager, this CPU): decode {q['decode_tok_s']:.1f} vs {f32['decode_tok_s']:.1f} tok/s "
          f"({q['decode_tok_s'] / f32['decode_tok_s']:.2f}x), prefill {q['prefill_tok_s']:.0f} vs "
          f"{f32['prefill_tok_s']:.0f} tok/s; size {q['size_mib']:.1f} vs {f32['size_mib']:.1f} MiB")
    out = {"command": "python -m devtools.main_job " + " ".join(argv if argv is not None else sys.argv[1:]),
           "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "machine": machine_info(),
           "bits": args.bits, "group_size": args.group_size, "rows": rows, "gap_closed": closed,
           "quantize_phases_s": report.times, "total_s": time.perf_counter() - t0}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


def _decode_speed(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int = 64) -> float:
    """Greedy decode tokens/s (eager, 16-token prompt) after one warm-up call."""
    prompt = ids[:16].unsqueeze(0)
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
        t = time.perf_counter()
        model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       pad_token_id=0)
    return new_tokens / (time.perf_counter() - t)


if __name__ == "__main__":
    main()
