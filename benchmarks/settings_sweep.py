"""One awq_ao setting on SmolLM2-135M: quantize, then WikiText-2 perplexity (40 windows).

Used to choose the library defaults; each call appends one JSON line::

    python benchmarks/settings_sweep.py NAME '{"sequential": true, "max_search_samples": 16}' [N_CALIB] [WINDOWS] [VAL_WINDOWS]

Besides the WikiText-2 test perplexity it measures a held-out *validation* perplexity on the
last VAL_WINDOWS (default 20) 2048-token windows of ``wiki.valid.tokens``, whose beginning is
the calibration text: choose settings on this one, report the test one.

Options not given take the library defaults *of the commit that ran it*: record them when
defaults change (benchmarks/results/settings_sweep.jsonl lists the effective settings).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # devtools/
from awq_ao.api import quantize  # noqa: E402
from awq_ao.evaluation import batches, calibration_blocks, perplexity  # noqa: E402
from devtools.shared_data import calibration_text, load_smollm2, wikitext_test  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "settings_sweep.jsonl"


def held_out_tail(tok: object, text: str, calib_tokens: int, n_tokens: int) -> torch.Tensor:
    """The last ``n_tokens`` token ids of ``text``; raises if they reach the calibration prefix."""
    ids = tok(text, return_tensors="pt", verbose=False).input_ids[0]  # type: ignore[operator]
    if ids.numel() - n_tokens < 2 * calib_tokens:  # margin: calibration tokenizes a prefix
        raise ValueError(f"validation text too short: {ids.numel()} tokens for {calib_tokens} + {n_tokens}")
    return ids[-n_tokens:].clone()


def main() -> None:
    """Run one setting and append its result line."""
    name, opts = sys.argv[1], json.loads(sys.argv[2])
    n_calib = int(sys.argv[3]) if len(sys.argv) > 3 else 64
    windows = int(sys.argv[4]) if len(sys.argv) > 4 else 40
    val_windows = int(sys.argv[5]) if len(sys.argv) > 5 else 20
    torch.manual_seed(0)
    model, tok = load_smollm2(torch.float32)
    ids = tok(wikitext_test(), return_tensors="pt", verbose=False).input_ids[0]
    valid_text = calibration_text("wiki.valid.tokens")
    calib = calibration_blocks(tok, valid_text, n_calib, 512)
    val_ids = held_out_tail(tok, valid_text, n_calib * 512, val_windows * 2048)
    o = dict(bits=4, group_size=64, verbose=False, progress=False)
    o.update(opts)
    t = time.perf_counter()
    report = quantize(model, list(batches(calib, 8)), **o)
    quant_s = time.perf_counter() - t
    ppl, n = perplexity(model, ids, 2048, windows)
    val_ppl, val_n = perplexity(model, val_ids, 2048, val_windows)
    res = dict(name=name, opts=o, n_calib=n_calib, ppl=ppl, windows=n, val_ppl=val_ppl,
               val_windows=val_n, quant_s=quant_s, times=report.times)
    print(json.dumps(res), flush=True)
    with OUT.open("a") as f:
        f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
