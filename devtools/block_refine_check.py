"""Does a block-output refinement after awq_ao's rounding close the gap to AutoRound?

AutoRound tunes each block's rounding and quantization ranges by signed gradient descent on
the block's output error against the float model. awq_ao's codes come from AWQ scales,
clipping and error-feedback rounding, each linear on its own output. This check starts from
an awq_ao checkpoint (``awq_ao.save_quantized``) and, block by block, tunes

* an offset ``V`` per weight on top of its code (the code is ``round(code0 + V)``,
  straight-through gradient; ``|V|`` bounded by ``--vmax``), and
* a multiplier ``m`` per group on its scale (bounded to ``[1 - mrange, 1 + mrange]``),

by signed gradient steps (``lr`` decaying linearly to 0) on the mean squared error between
the quantized block's output on the quantized model's stream and a target: the float
block's output on the float model's own stream (``--target float``, AutoRound's and the
library's ``block_refine_steps``) or on the quantized stream (``--target own``). A block keeps
the result only where it lowers the error on all calibration rows
(:func:`awq_ao.passes.block_refine.refine_block`, the library's code). It refines a saved
checkpoint, so settings can be compared without quantizing again. The model is then evaluated on the WikiText-2 test windows
and on the held-out tail of wiki.valid.tokens (choose on the latter).

    python -m devtools.block_refine_check --ckpt /tmp/int3_g64 --steps 48 --out benchmarks/results/block_refine.jsonl

The checkpoint: ``awq_ao.quantize(model, calibration, bits=3, group_size=64,
max_search_samples=16)`` on the 32 x 512 calibration blocks of benchmarks/quality.py, saved.
Each run appends one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from awq_ao.checkpoint.load import load_quantized  # noqa: E402
from awq_ao.evaluation import calibration_blocks, perplexity, text_ids  # noqa: E402
from awq_ao.observers.activation import first_tensor  # noqa: E402
from awq_ao.passes.block_refine import refine_block  # noqa: E402
from awq_ao.passes.sequential import _block_output, _with_hidden, record_block_calls  # noqa: E402
from devtools.shared_data import calibration_text, load_model, wikitext_test  # noqa: E402


def main() -> None:
    """Refine an awq_ao checkpoint block by block and evaluate it; append one JSON line."""
    from settings_sweep import held_out_tail

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--name", default="refine")
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--vmax", type=float, default=1.0)
    ap.add_argument("--mrange", type=float, default=0.2)
    ap.add_argument("--target", choices=("float", "own"), default="float")
    ap.add_argument("--n-calib", type=int, default=32)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--val-windows", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    fp, tok = load_model("smollm2", torch.float32)
    q = load_quantized(args.ckpt, dtype=torch.float32)
    fp.eval()
    q.eval()
    valid_text = calibration_text("wiki.valid.tokens")
    calib = calibration_blocks(tok, valid_text, args.n_calib, 512, bos_token_id=None, offset=0)
    rows = calib.shape[0]
    fb, qb = list(fp.model.layers), list(q.model.layers)
    calls_f = record_block_calls(fp, fb, (calib,), {"use_cache": False})
    calls_q = record_block_calls(q, qb, (calib,), {"use_cache": False})
    h_f = first_tensor(calls_f[0]).detach()
    h_q = first_tensor(calls_q[0]).detach()
    per_block = []
    t0 = time.perf_counter()
    for i in range(len(qb)):
        y_f = _block_output(fb[i], *_with_hidden(calls_f[i], h_f), rows, 8)
        if args.target == "float":
            tgt = y_f
        else:
            tgt = _block_output(fb[i], *_with_hidden(calls_f[i], h_q), rows, 8)
        call = _with_hidden(calls_q[i], h_q)
        res = refine_block(qb[i], call, rows, tgt, args.steps, args.lr, args.batch, seed=i, vmax=args.vmax,
                           m_range=args.mrange) if args.steps > 0 else None
        rec = dataclasses.asdict(res) if res is not None else {}
        h_q = _block_output(qb[i], *call, rows, 8)
        h_f = y_f
        rec["block"] = i
        rec["stream_mse"] = float(((h_q - h_f) ** 2).mean())
        per_block.append(rec)
        print(json.dumps(rec), flush=True)
    refine_s = time.perf_counter() - t0
    ids = text_ids(tok, wikitext_test(), None)
    ppl, n = perplexity(q, ids, 2048, args.windows)
    val_ids = held_out_tail(tok, valid_text, args.n_calib * 512, args.val_windows * 2048, None)
    val_ppl, vn = perplexity(q, val_ids, 2048, args.val_windows)
    res = {"name": args.name, "ckpt": args.ckpt, "opts": {k: v for k, v in vars(args).items() if k not in ("out",)},
           "ppl": ppl, "windows": n, "val_ppl": val_ppl, "val_windows": vn, "refine_s": refine_s,
           "torch_threads": torch.get_num_threads(), "blocks": per_block}
    print(json.dumps({k: v for k, v in res.items() if k != "blocks"}), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
