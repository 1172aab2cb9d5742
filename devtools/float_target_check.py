"""Where ``gptq_float_target`` goes wrong: per-linear and hidden-state errors on the first blocks.

    python -m devtools.float_target_check [--blocks 8] [--bits 4] [--group-size 128]
        [--out benchmarks/results/float_target_check.json]

SmolLM2 is cut to its first ``--blocks`` blocks and quantized (16 x 512 calibration tokens of
``wiki.valid.tokens``, layer by layer) once per variant:

* ``plain``: the defaults;
* ``float_target``: ``gptq_float_target=True``;
* ``float_target_qkv_gate_up``: the shift only for the linears reading the block's normed
  input (q/k/v, gate/up), not ``o_proj`` / ``down_proj``, whose cross Grams are taken with the
  block's earlier linears still in float (so their shift corrects again what q/k/v and
  gate/up already corrected);
* the same with the shift's damping raised to 1.0 (a ridge on the regression of the float
  output on the quantized input, against sampling noise in ``C``).

The two restricted variants patch :func:`awq_ao.passes.sequential.cross_grams` and
:func:`awq_ao.passes.apply.shifted_target` here (diagnostic only; not options). Measured per
variant: each linear's output error against the float model's, relative, on 4 calibration
rows (in sample; ``q/k/o/gate/down``, whose outputs no scale is folded into), and the last
hidden state's MSE against the float model's on the last 8 x 512 tokens of
``wiki.valid.tokens`` (held out). Rows are written one by one; ``--resume`` keeps those done.
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

import awq_ao.passes.apply as apply_mod
import awq_ao.passes.sequential as sequential_mod
from awq_ao import quantize
from awq_ao.evaluation import batches, calibration_blocks, text_ids
from devtools.machine_record import machine_info
from devtools.shared_data import calibration_text, first_blocks, load_model

LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"]
#: (name, gptq_float_target, linear-name suffixes left unshifted, damping of the shift or None)
VARIANTS: list[tuple[str, bool, tuple[str, ...], float | None]] = [
    ("plain", False, (), None),
    ("float_target", True, (), None),
    ("float_target_qkv_gate_up", True, ("o_proj", "down_proj"), None),
    ("float_target_qkv_gate_up_damp1", True, ("o_proj", "down_proj"), 1.0),
]

#: the pass's own functions, which every variant wraps
_ORIG = (sequential_mod.cross_grams, apply_mod.shifted_target)


def _patch(skip: tuple[str, ...], damp: float | None) -> None:
    """Route the float-target pass through the variant's restrictions."""
    cross, shift = _ORIG

    def cross_grams(*a: Any, **k: Any) -> Any:
        c, nxt = cross(*a, **k)
        return {n: v for n, v in c.items() if not (skip and n.endswith(skip))}, nxt

    def shifted_target(w: torch.Tensor, c: torch.Tensor, full: torch.Tensor, d: float) -> torch.Tensor:
        return shift(w, c, full, d if damp is None else damp)

    sequential_mod.cross_grams = cross_grams
    apply_mod.shifted_target = shifted_target


def _outputs(model: torch.nn.Module, ids: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Each listed linear's output and the last hidden state of ``model`` on ``ids``."""
    outs: dict[str, torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        for n in LINEARS:
            def hook(mod: Any, a: Any, o: torch.Tensor, key: str = f"{i}.{n}") -> None:
                outs[key] = o.detach().float()
            handles.append(layer.get_submodule(n).register_forward_hook(hook))
    try:
        with torch.no_grad():
            last = model.model(ids).last_hidden_state.float()
    finally:
        for h in handles:
            h.remove()
    return outs, last


def main(argv: list[str] | None = None) -> None:
    """Run the variants and write one JSON row each."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--out", default="benchmarks/results/float_target_check.json")
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model, tok = load_model("smollm2", torch.float32)
    first_blocks(model, args.blocks)
    calib = calibration_blocks(tok, calibration_text("wiki.valid.tokens"), 16, 512)
    in_sample = calib[:4].reshape(4, 512)
    held_out = text_ids(tok, calibration_text("wiki.valid.tokens"), None)[-8 * 512:].view(8, 512)
    ref_lin, _ = _outputs(model, in_sample)
    _, ref_last = _outputs(model, held_out)
    out = Path(args.out)
    doc = json.loads(out.read_text()) if args.resume and out.exists() else {}
    doc.update({"command": "python -m devtools.float_target_check " + " ".join(sys.argv[1:] if argv is None else argv),
                "date": dt.date.today().isoformat(), "machine": machine_info(),
                "setting": {"blocks": args.blocks, "bits": args.bits, "group_size": args.group_size,
                            "calibration": "16 x 512 tokens of wiki.valid.tokens",
                            "held_out": "last 8 x 512 tokens of wiki.valid.tokens"}})
    rows = doc.setdefault("rows", {})
    for name, ft, skip, damp in VARIANTS:
        if name in rows:
            continue
        _patch(skip, damp)
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        quantize(m, list(batches(calib, 8)), bits=args.bits, group_size=args.group_size, verbose=False,
                 progress=False, gptq_float_target=ft)
        secs = time.perf_counter() - t0
        lin, _ = _outputs(m, in_sample)
        _, last = _outputs(m, held_out)
        err = ((last - ref_last) ** 2).mean(-1)
        rows[name] = {
            "unshifted": list(skip), "shift_damp": damp, "seconds": round(secs, 1),
            "held_out_last_hidden_mse": float(err.mean()), "held_out_last_hidden_mse_median": float(err.median()),
            "in_sample_relative_linear_error": {k: float(((lin[k] - r) ** 2).mean() / (r**2).mean())
                                                for k, r in ref_lin.items()},
        }
        print(name, "held-out last-hidden MSE", rows[name]["held_out_last_hidden_mse"], flush=True)
        out.write_text(json.dumps(doc, indent=1) + "\n")
        del m
    _patch((), None)


if __name__ == "__main__":
    main()
