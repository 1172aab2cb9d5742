"""How good is the one progress bar's ETA? Quantize SmolLM2-135M and compare its predictions.

The run's bar (``awq_ao.progress``) predicts the total time at every update as
``elapsed / fraction done``. This benchmark runs the main job's quantization (calibration
included) inside one run, then reports the predicted total's error against the real total at
10, 25, 50 and 75% of the real time, and each phase's planned share of the work against its
real share of the time (what the cost model's constants should be).

    python benchmarks/progress_eta.py [--n-samples 32] [--options '{"search_loss": "linear"}']
        [--out benchmarks/results/progress_eta.json] [--name NAME]

Rows are appended to the JSON file's ``runs`` list (one per invocation).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import awq_ao  # noqa: E402
from awq_ao.evaluation import batches, calibration_blocks  # noqa: E402
from awq_ao.progress import run_progress  # noqa: E402
from benchmarks.machine import machine_info  # noqa: E402
from devtools.shared_data import calibration_text, load_smollm2  # noqa: E402


def phase_times(timeline: list[tuple[float, float, str]]) -> dict[str, float]:
    """Real seconds per phase: from a phase's first update to the next phase's first update."""
    firsts: list[tuple[float, str]] = []
    for t, _f, ph in timeline:
        if ph and (not firsts or firsts[-1][1] != ph):
            firsts.append((t, ph))
    out: dict[str, float] = {}
    end = timeline[-1][0] if timeline else 0.0
    for i, (t, ph) in enumerate(firsts):
        nxt = firsts[i + 1][0] if i + 1 < len(firsts) else end
        out[ph] = out.get(ph, 0.0) + nxt - t
    return out


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; return (and append to ``--out``) its row."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--options", default="{}", help="more awq_config keywords, as JSON")
    ap.add_argument("--name", default="defaults")
    ap.add_argument("--out", default="benchmarks/results/progress_eta.json")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model, tok = load_smollm2(torch.float32)
    calib = calibration_blocks(tok, calibration_text("wiki.valid.tokens"), args.n_samples, args.seq_len)
    opts = dict(group_size=args.group_size, verbose=False, **json.loads(args.options))
    t0 = time.perf_counter()
    with run_progress(True) as (run, _owned):
        report = awq_ao.quantize(model, list(batches(calib, 8)), **opts)
    total = time.perf_counter() - t0
    tl = run.timeline
    checks = {}
    for q in (0.1, 0.25, 0.5, 0.75):
        t_q = q * total
        pts = [(t, f) for t, f, _ in tl if t <= t_q and f > 0]
        if pts:
            t, f = pts[-1]
            checks[f"{int(q * 100)}%"] = {"elapsed_s": t, "fraction": f, "predicted_total_s": t / f,
                                          "error": (t / f - total) / total}
    planned = {k: v / sum(run.totals.values()) for k, v in run.totals.items()}
    real = phase_times(tl)
    row = {
        "name": args.name,
        "command": "python " + " ".join([Path(__file__).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
        "options": opts, "calibration": f"{args.n_samples} x {args.seq_len}",
        "total_s": total, "report_times": report.times,
        "eta_checks": checks,
        "planned_share": planned,
        "real_share": {k: v / total for k, v in real.items()},
        "planned_s": dict(run.totals), "real_s": real,
        "machine": machine_info(), "threads": torch.get_num_threads(),
    }
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.exists() else {"runs": []}
    data["runs"].append(row)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n")
    for k, v in checks.items():
        print(f"at {k} of the real time: predicted total {v['predicted_total_s']:.0f}s vs real {total:.0f}s "
              f"({100 * v['error']:+.0f}%)")
    for k in run.totals:
        print(f"{k}: planned {100 * planned[k]:.0f}% of the work, real {100 * real.get(k, 0) / total:.0f}% "
              f"of the time ({real.get(k, 0):.0f}s, planned {run.totals[k]:.0f} estimated s)")
    return row


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
