"""One awq_ao setting on SmolLM2-135M: quantize, then WikiText-2 perplexity (40 windows).

Used to choose the library defaults; each call appends one JSON line::

    python benchmarks/settings_sweep.py NAME '{"sequential": true, "max_search_samples": 16}' [N_CALIB] [WINDOWS]

Options not given take the library defaults *of the commit that ran it*: record them when
defaults change (benchmarks/results/settings_sweep.jsonl lists the effective settings).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from awq_ao.api import quantize
from awq_ao.evaluation import (
    batches,
    calibration_blocks,
    calibration_text,
    load_smollm2,
    perplexity,
    wikitext_test_text,
)

OUT = Path(__file__).resolve().parent / "results" / "settings_sweep.jsonl"


def main() -> None:
    """Run one setting and append its result line."""
    name, opts = sys.argv[1], json.loads(sys.argv[2])
    n_calib = int(sys.argv[3]) if len(sys.argv) > 3 else 64
    windows = int(sys.argv[4]) if len(sys.argv) > 4 else 40
    torch.manual_seed(0)
    model, tok = load_smollm2(torch.float32)
    ids = tok(wikitext_test_text(), return_tensors="pt").input_ids[0]
    calib = calibration_blocks(tok, calibration_text("wiki.valid.tokens"), n_calib, 512)
    o = dict(bits=4, group_size=64, verbose=False, progress=False)
    o.update(opts)
    t = time.perf_counter()
    quantize(model, list(batches(calib, 8)), **o)
    quant_s = time.perf_counter() - t
    ppl, n = perplexity(model, ids, 2048, windows)
    res = dict(name=name, opts=o, n_calib=n_calib, ppl=ppl, windows=n, quant_s=quant_s)
    print(json.dumps(res), flush=True)
    with OUT.open("a") as f:
        f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
