"""One awq_ao setting on SmolLM2-135M (or Gemma 3 270M): quantize, then WikiText-2 perplexity (40 windows).

Used to choose the library defaults; each call appends one JSON line::

    python benchmarks/settings_sweep.py NAME '{"sequential": true, "max_search_samples": 16}' [N_CALIB] [WINDOWS] [VAL_WINDOWS] [--model gemma3] [--calib-offset N]

``--model gemma3`` (default smollm2) runs Gemma 3 270M (``bash benchmarks/peers/second_model_setup.sh``)
and appends to ``settings_sweep_gemma3.jsonl``; its windows and calibration blocks each start with
the tokenizer's ``<bos>`` (as in benchmarks/quality.py). Every line records its model.

Besides the WikiText-2 test perplexity it measures a held-out *validation* perplexity on the
last VAL_WINDOWS (default 20) 2048-token windows of ``wiki.valid.tokens``, whose beginning is
the calibration text: choose settings on this one, report the test one. ``--calib-offset N``
takes the calibration blocks after the first N (another draw from the same text, still clear
of the validation tail), to see how much a result moves with the calibration sample.

Options not given take the library defaults *of the commit that ran it*: record them when
defaults change (benchmarks/results/settings_sweep.jsonl lists the effective settings).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # devtools/
from awq_ao.api import quantize  # noqa: E402
from awq_ao.evaluation import batches, calibration_blocks, leading_bos, perplexity, text_ids  # noqa: E402
from devtools.shared_data import calibration_text, load_model, wikitext_test  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
OUT = {"smollm2": RESULTS / "settings_sweep.jsonl", "gemma3": RESULTS / "settings_sweep_gemma3.jsonl"}


def held_out_tail(tok: object, text: str, calib_tokens: int, n_tokens: int,
                  bos_token_id: int | None = None) -> torch.Tensor:
    """The last ``n_tokens`` token ids of ``text``; raises if they reach the calibration prefix."""
    ids = text_ids(tok, text, bos_token_id)
    if ids.numel() - n_tokens < 2 * calib_tokens:  # margin: calibration tokenizes a prefix
        raise ValueError(f"validation text too short: {ids.numel()} tokens for {calib_tokens} + {n_tokens}")
    return ids[-n_tokens:].clone()


def main() -> None:
    """Run one setting and append its result line."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name")
    ap.add_argument("opts", type=json.loads, help="awq_ao.quantize options (JSON)")
    ap.add_argument("n_calib", type=int, nargs="?", default=64)
    ap.add_argument("windows", type=int, nargs="?", default=40)
    ap.add_argument("val_windows", type=int, nargs="?", default=20)
    ap.add_argument("--model", choices=sorted(OUT), default="smollm2")
    ap.add_argument("--calib-offset", type=int, default=0,
                    help="skip this many calibration blocks first: another calibration draw (default 0)")
    args = ap.parse_args()
    name, opts, n_calib, windows, val_windows = args.name, args.opts, args.n_calib, args.windows, args.val_windows
    torch.manual_seed(0)
    model, tok = load_model(args.model, torch.float32)
    bos = leading_bos(tok)  # None for SmolLM2 (unchanged windows and blocks)
    ids = text_ids(tok, wikitext_test(), bos)
    valid_text = calibration_text("wiki.valid.tokens")
    calib = calibration_blocks(tok, valid_text, n_calib, 512, bos_token_id=bos, offset=args.calib_offset)
    stride = 2048 if bos is None else 2047  # text tokens per window
    val_ids = held_out_tail(tok, valid_text, (args.calib_offset + n_calib) * 512, val_windows * stride, bos)
    o = dict(bits=4, group_size=64, verbose=False, progress=False)
    o.update(opts)
    t = time.perf_counter()
    report = quantize(model, list(batches(calib, 8)), **o)
    quant_s = time.perf_counter() - t
    ppl, n = perplexity(model, ids, 2048, windows, bos_token_id=bos)
    val_ppl, val_n = perplexity(model, val_ids, 2048, val_windows, bos_token_id=bos)
    res = dict(name=name, model=args.model, opts=o, n_calib=n_calib, calib_offset=args.calib_offset, ppl=ppl, windows=n, val_ppl=val_ppl,
               val_windows=val_n, quant_s=quant_s, times=report.times)
    if report.clip_after_rounding_rows:  # rows that kept the searched / half / no clipping
        res["clip_after_rounding_rows"] = report.clip_after_rounding_rows
    if report.float_targets:  # linears rounded toward the float model's output (gptq_float_target)
        res["float_targets"] = report.float_targets
    print(json.dumps(res), flush=True)
    with OUT[args.model].open("a") as f:
        f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
