"""Time loading the SmolLM2 GGUF: transformers' GGUF loader vs devtools.gguf_llama, interleaved.

Each load runs in a fresh Python process (imports excluded from the timing), alternating the
two loaders ``--reps`` times; writes the seconds of every load and the ratio of the medians.

    python benchmarks/gguf_load.py [--reps 3] [--out benchmarks/results/gguf_load.json] [--note TEXT]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from devtools.machine_record import machine_info  # noqa: E402
from devtools.shared_data import smollm2_path  # noqa: E402

_CODE = {
    "transformers": (
        "import os, time, torch; os.environ['HF_HUB_OFFLINE'] = '1'\n"
        "from transformers import AutoModelForCausalLM\n"
        "t = time.perf_counter()\n"
        "AutoModelForCausalLM.from_pretrained({d!r}, gguf_file={f!r}, dtype=torch.float32)\n"
        "print(time.perf_counter() - t)"
    ),
    "gguf_llama": (
        "import time, torch\n"
        "from devtools.gguf_llama import load_llama_gguf\n"
        "t = time.perf_counter()\n"
        "load_llama_gguf({p!r}, torch.float32)\n"
        "print(time.perf_counter() - t)"
    ),
}


def main() -> None:
    """Run the interleaved loads and write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gguf_load.json"))
    ap.add_argument("--note", default="", help="what else ran on the machine, if anything")
    args = ap.parse_args()
    folder, name = smollm2_path()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rows = []
    for rep in range(args.reps):
        for loader, code in _CODE.items():
            src = code.format(d=str(folder), f=name, p=str(folder / name))
            out = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True, cwd=ROOT, env=env,
                                 check=True)
            rows.append({"loader": loader, "rep": rep, "seconds": float(out.stdout.strip().splitlines()[-1])})
            print(rows[-1], flush=True)
    med = {k: statistics.median(r["seconds"] for r in rows if r["loader"] == k) for k in _CODE}
    res = {"command": "python benchmarks/gguf_load.py " + " ".join(sys.argv[1:]),
           "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "machine": machine_info(),
           "model": str(folder / name), "note": args.note, "rows": rows, "median_s": med,
           "ratio_transformers_over_gguf_llama": med["transformers"] / med["gguf_llama"]}
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(json.dumps(med), f"ratio {res['ratio_transformers_over_gguf_llama']:.2f}")


if __name__ == "__main__":
    main()
