"""Profile one default awq_ao quantization of SmolLM2-135M (the main job's AWQ row).

    python -m devtools.profile_quantize [--n-samples 32] [--top 40] [--out prof.txt]
    python -m devtools.profile_quantize --no-profile --options '{"screen_rows": 2}' --jsonl runs.jsonl
    python -m devtools.profile_quantize --blocks 6 --top 30     # the first 6 blocks only

Prints the report's phase times and the cProfile functions with the most cumulative and
internal time, so that the slow part of a run is measured rather than guessed. ``--jsonl``
appends one line per run (options, times, every group's alpha and a SHA-256 of the quantized
model's logits on two calibration rows): two runs with the same fingerprint produced the same
model, so a speed change can be shown not to change the result.
"""
from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import hashlib
import io
import json
import pstats
import sys
import time

import torch

from awq_ao import quantize
from awq_ao.evaluation import batches, calibration_blocks
from devtools.machine_record import machine_info
from devtools.shared_data import calibration_text, first_blocks, load_smollm2


def main(argv: list[str] | None = None) -> None:
    """Run the profile and print it."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--search-samples", type=int, default=16)
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--blocks", type=int, default=None, help="keep only the model's first N blocks (a quicker profile)")
    ap.add_argument("--no-profile", action="store_true", help="phase times only (no cProfile overhead)")
    ap.add_argument("--out", default=None, help="also write the statistics to this file")
    ap.add_argument("--jsonl", default=None, help="append the run's times and model fingerprint to this file")
    ap.add_argument("--options", default="{}", help='more awq_config keywords as JSON, e.g. \'{"search_loss": "linear"}\'')
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model, tok = load_smollm2(torch.float32)
    if args.blocks is not None:
        first_blocks(model, args.blocks)
    calib = calibration_blocks(tok, calibration_text("wiki.valid.tokens"), args.n_samples, args.seq_len)
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    if not args.no_profile:
        prof.enable()
    report = quantize(model, list(batches(calib, 8)), bits=args.bits, group_size=args.group_size,
                      max_search_samples=args.search_samples, verbose=False, **json.loads(args.options))
    if not args.no_profile:
        prof.disable()
    total = time.perf_counter() - t0
    print(f"calibration + convert {total:.1f} s; convert phases: " + ", ".join(f"{k} {v:.1f} s" for k, v in report.times.items()))
    if args.jsonl:
        with torch.no_grad():
            logits = model(calib[:2, :256], use_cache=False).logits.float().contiguous()
        line = {"command": "python -m devtools.profile_quantize " + " ".join(argv if argv is not None else sys.argv[1:]),
                "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "machine": machine_info(),
                "options": json.loads(args.options), "profiled": not args.no_profile, "total_s": total,
                "times": report.times, "alphas": [g.alpha for g in report.groups],
                "logits_sha256": hashlib.sha256(logits.numpy().tobytes()).hexdigest()}
        with open(args.jsonl, "a") as f:
            f.write(json.dumps(line) + "\n")
    if args.no_profile:
        return
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("cumulative").print_stats(args.top)
    stats.sort_stats("tottime").print_stats(args.top)
    print(buf.getvalue())
    if args.out:
        with open(args.out, "w") as f:
            f.write(buf.getvalue())


if __name__ == "__main__":
    main()
