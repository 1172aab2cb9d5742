"""How well a few calibration rows rank the AWQ scale candidates (a diagnostic, not a test).

Quantizes SmolLM2-135M (or Gemma 3 270M) with the library defaults and records, for every
group scored on its enclosing module's output, each candidate's squared output error per
search row (RTN first, then the alpha grid in order). It then replays cheaper selection rules
offline on those numbers and reports, per rule, how often it picks the same candidate as the
full search, the search loss it gives up, and its cost in row-forwards:

* ``screen R top K``: rank every candidate on the first R rows, score the best K on all rows;
* ``halving``: successive halving, e.g. all candidates on 4 rows, the best 8 on 8 rows, the
  best 4 on every row (rows are cumulative, so the survivors end with the full loss).
* ``linear top K``: rank the candidates by the consumers' own output error through their
  input's Gram, with the weights rounded as the search rounds them (no module forward; with
  ``search_rounding="gptq"`` the error-feedback rounded weights the search computes anyway),
  then apply a module-loss rule to the best K only.
* ``refine``: every second alpha on every row, then the best one's two neighbours (the
  ``search_refine`` option's rule); ``refine by 4``: every fourth, then the neighbours two
  and one step away.

The full search is forced (``screen_rows=None``) so that every candidate has every row.

Groups scored through their input's Gram (``v -> o``, ``up -> down``: every candidate rounded
with error feedback and scored by ``tr((Q - W) H (Q - W)^T)``) are recorded too, as each
candidate's loss per chunk of weight rows (row ``r`` in chunk ``r % 16``): the output rows
round independently, so the same rules replay a screen that rounds every candidate on a few
row chunks and only the survivors on all of them (``gram_records`` / ``gram_summary``).

    python -m devtools.search_rank_check [--model gemma3] [--bits 3] [--group-size 64] [--layers N] [--out FILE.json]
    python -m devtools.search_rank_check --replay FILE.json [FILE.json ...] [--out FILE.json]

``--replay`` reads the records of earlier runs instead of quantizing and summarizes each file
with the current rules (seconds).

The whole-model numbers come from one full default quantization (about 10 minutes for
SmolLM2 on 2 cores).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import torch

import awq_ao.passes.rounded_candidates as rounded_mod
import awq_ao.passes.search as search_mod
from awq_ao.api import quantize
from awq_ao.evaluation import batches, calibration_blocks, leading_bos
from devtools.machine_record import machine_info
from devtools.shared_data import calibration_text, load_model

RECORDS: list[dict] = []
GRAM_RECORDS: list[dict] = []  # Gram-scored groups: per candidate, the loss per weight-row chunk
_current: list[torch.Tensor] | None = None
_linear: list[float] | None = None
_gram_rows: list[torch.Tensor] | None = None
#: weight rows of a Gram-scored group are bucketed by ``row % GRAM_CHUNKS``
GRAM_CHUNKS = 16


def _wrap_rounded(orig):
    """Record each candidate's linear loss, ``sum_i tr((Q_i - W_i) H (Q_i - W_i)^T)``, in call order."""

    def wrapped(self, s):
        out = orig(self, s)
        if _linear is not None:
            h = self.gram.double()
            total = 0.0
            for q, w, t in zip(out, self.weights, self.transpose, strict=True):
                d = (q.t() if t else q).double() - w.double()
                total += float(((d @ h) * d).sum())
            _linear.append(total)
        return out

    return wrapped


def _recording_mse(a: torch.Tensor, b: torch.Tensor) -> float:
    d = (a.double() - b.double()).pow(2)
    if _current is not None:
        _current.append(d.reshape(d.shape[0], -1).sum(dim=1).cpu())
    return float((a.float() - b.float()).pow(2).mean())


def _recording_gram_losses(weights, scales, gram, config):
    """rounded_gram_losses (the same float32 losses), also recording each candidate's loss per
    chunk of weight rows (rows ``r`` with ``r % GRAM_CHUNKS == j``): output rows round
    independently, so a screen over weight rows is replayed like one over search rows."""
    out = []
    per_sweep = rounded_mod._per_sweep(weights)
    for b0 in range(0, len(scales), per_sweep):
        for q, w, h in rounded_mod.rounded_scaled(weights, scales[b0 : b0 + per_sweep], gram, config):
            d = q - w
            out.append(float(((d @ h) * d).sum()) / max(w.shape[0], 1))
            if _gram_rows is not None:
                dd = d.double()
                per_row = ((dd @ h.double()) * dd).sum(dim=1).cpu()
                bucket = torch.arange(per_row.numel()) % GRAM_CHUNKS
                _gram_rows.append(torch.zeros(GRAM_CHUNKS, dtype=torch.float64).index_add_(0, bucket, per_row))
    return out


def _wrap_search(orig):
    def wrapped(self, g, call, x, rows_call=None):
        global _current, _linear, _gram_rows
        _current, _linear, _gram_rows = [], [], []
        try:
            return orig(self, g, call, x, rows_call)
        finally:
            if _current:
                rec = {"inspect": g.inspect, "consumers": list(g.consumers), "rows": torch.stack(_current).tolist()}
                if len(_linear) == len(_current):
                    rec["linear"] = _linear
                RECORDS.append(rec)
            if _gram_rows:
                GRAM_RECORDS.append({"consumers": list(g.consumers), "rows": torch.stack(_gram_rows).tolist()})
            _current, _linear, _gram_rows = None, None, None

    return wrapped


def pick(losses: list[float]) -> int:
    """Index of the smallest loss; candidate 0 (RTN) wins ties, then the earlier alpha."""
    best = 0
    for i in range(1, len(losses)):
        if losses[i] < losses[best]:
            best = i
    return best


def simulate(rows: torch.Tensor, schedule: list[tuple[int, int]], prescreen: tuple[list[float], int] | None = None
             ) -> tuple[int, int]:
    """``rows [C, R]``: per-candidate, per-row errors (candidate 0 = RTN, always kept).

    ``schedule``: ``[(rows, keep)]`` stages; after a stage on the first ``rows`` rows, the best
    ``keep`` alpha candidates survive (RTN is scored on every row regardless). ``prescreen``:
    ``(loss per candidate, K)``: only the K alpha candidates of smallest such loss enter the
    stages. Returns the chosen candidate and the cost in row-forwards."""
    c, r = rows.shape
    alive = list(range(1, c))
    if prescreen is not None:
        pre, k = prescreen
        alive = sorted(sorted(alive, key=lambda i: (pre[i], i))[:k])
    cost = r  # RTN on every row
    done = 0
    for n_rows, keep in schedule:
        cost += len(alive) * (min(n_rows, r) - done)
        done = min(n_rows, r)
        part = rows[:, :done].sum(dim=1)
        alive = sorted(alive, key=lambda i: (float(part[i]), i))[:keep]
    if done < r:
        cost += len(alive) * (r - done)
    full = rows.sum(dim=1)
    cands = [0, *sorted(alive)]
    chosen = cands[pick([float(full[i]) for i in cands])]
    return chosen, cost


def refine_pick(full: list[float], step: int) -> tuple[int, int]:
    """``full``: per-candidate full losses (0 = RTN, then the alpha grid). Every ``step``-th
    alpha, then the neighbours of the best (for ``step=4``: two steps away, then one step
    around the best so far); returns the chosen candidate and how many alphas were scored."""
    n = len(full) - 1

    def best_of(idx: set[int]) -> int:
        return min(idx, key=lambda i: (full[i + 1], i))

    seen = set(range(0, n, step))
    radii = [1] if step == 2 else [2, 1]
    for r in radii:
        j = best_of(seen)
        seen |= {i for i in (j - r, j + r) if 0 <= i < n}
    cands = [0, *(i + 1 for i in sorted(seen))]
    return cands[pick([full[c] for c in cands])], len(seen)


def summarize(records: list[dict]) -> dict:
    """Per selection rule: same picks as the full search, cost, search loss given up."""
    rules: dict[str, list[tuple[int, int]]] = {
        "full": [],
        "screen 4 top 3": [(4, 3)],
        "screen 4 top 5": [(4, 5)],
        "screen 4 top 8": [(4, 8)],
        "screen 2 top 5": [(2, 5)],
        "screen 8 top 3": [(8, 3)],
        "halving 4/8, 8/4": [(4, 8), (8, 4)],
        "halving 4/10, 8/5 (= the nearest default 2/20, 4/10, 8/5)": [(4, 10), (8, 5)],
        "halving 2/8, 4/4, 8/2": [(2, 8), (4, 4), (8, 2)],
        "halving 4/6, 8/3": [(4, 6), (8, 3)],
        "halving 4/5, 8/2": [(4, 5), (8, 2)],
        "halving 4/7, 8/3 (the rounded default until 2026-12-07)": [(4, 7), (8, 3)],
        "halving 2/12, 4/6, 8/3 (the rounded default)": [(2, 12), (4, 6), (8, 3)],
        "halving 2/10, 4/5, 8/2": [(2, 10), (4, 5), (8, 2)],
        "halving 2/14, 4/7, 8/3": [(2, 14), (4, 7), (8, 3)],
        "halving 2/20, 4/10, 8/5": [(2, 20), (4, 10), (8, 5)],
    }
    pre_rules: dict[str, tuple[int, list[tuple[int, int]]]] = {
        "linear top 5, full": (5, []),
        "linear top 8, full": (8, []),
        "linear top 10, full": (10, []),
        "linear top 10, halving 4/5, 8/3": (10, [(4, 5), (8, 3)]),
        "linear top 12, halving 4/6, 8/3": (12, [(4, 6), (8, 3)]),
    }
    if not all("linear" in rec for rec in records):
        pre_rules = {}
    summary = {}
    for name, rule in [*((n, (None, sc)) for n, sc in rules.items()), *pre_rules.items()]:
        top, sched = rule
        same, cost, full_cost, excess = 0, 0, 0, []
        for rec in records:
            rows = torch.tensor(rec["rows"], dtype=torch.float64)
            ref, _ = simulate(rows, [])
            got, c = simulate(rows, sched, None if top is None else (rec["linear"], top))
            full = rows.sum(dim=1)
            same += int(got == ref)
            cost += c
            full_cost += rows.numel()
            excess.append(float(full[got] / full[ref] - 1))
        summary[name] = {"same_pick": same, "groups": len(records), "cost_vs_full": cost / max(full_cost, 1),
                         "mean_loss_excess": sum(excess) / max(len(excess), 1), "max_loss_excess": max(excess, default=0.0)}
        _print_rule(name, summary[name])
    for step in (2, 4):
        same, cost, full_cost, excess = 0, 0, 0, []
        for rec in records:
            rows = torch.tensor(rec["rows"], dtype=torch.float64)
            full = rows.sum(dim=1)
            ref, _ = simulate(rows, [])
            got, scored = refine_pick(full.tolist(), step)
            same += int(got == ref)
            cost += (1 + scored) * rows.shape[1]
            full_cost += rows.numel()
            excess.append(float(full[got] / full[ref] - 1))
        name = "refine" if step == 2 else "refine by 4"
        summary[name] = {"same_pick": same, "groups": len(records), "cost_vs_full": cost / max(full_cost, 1),
                         "mean_loss_excess": sum(excess) / max(len(excess), 1), "max_loss_excess": max(excess, default=0.0)}
        _print_rule(name, summary[name])
    return summary


def _print_rule(name: str, r: dict) -> None:
    print(f"{name:32s} same {r['same_pick']}/{r['groups']}  cost {r['cost_vs_full']:.2f}x  "
          f"loss excess mean {r['mean_loss_excess']:.2e} max {r['max_loss_excess']:.2e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "gemma3"])
    ap.add_argument("--n-calib", type=int, default=32)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--out", default=None)
    ap.add_argument("--layers", type=int, default=None, help="keep only the first N decoder blocks (a quick check)")
    ap.add_argument("--replay", nargs="+", default=None, metavar="FILE", help="summarize stored records instead")
    args = ap.parse_args()
    if args.replay:
        replays = {}
        for f in args.replay:
            stored = json.loads(Path(f).read_text())
            print(f)
            replays[f] = summarize(stored["records"])
            if stored.get("gram_records"):
                print(f"{f}: Gram-scored groups, screened over weight-row chunks")
                replays[f + " (gram)"] = summarize(stored["gram_records"])
        if args.out:
            Path(args.out).write_text(json.dumps({"command": " ".join(["python -m devtools.search_rank_check", *sys.argv[1:]]),
                                                  "date": dt.date.today().isoformat(), "replays": replays}, indent=1))
        return
    search_mod.ScaleSearch._search = _wrap_search(search_mod.ScaleSearch._search)
    search_mod._mse = _recording_mse
    search_mod.RoundedWeights.__call__ = _wrap_rounded(search_mod.RoundedWeights.__call__)
    rounded_mod.rounded_gram_losses = _recording_gram_losses
    torch.manual_seed(0)
    model, tok = load_model(args.model, torch.float32)
    if args.layers is not None:
        inner = model.model if hasattr(model, "model") else model
        inner.layers = inner.layers[: args.layers]
        model.config.num_hidden_layers = args.layers
    bos = leading_bos(tok)
    calib = calibration_blocks(tok, calibration_text("wiki.valid.tokens"), args.n_calib, 512, bos_token_id=bos)
    t = time.perf_counter()
    quantize(model, list(batches(calib, 8)), bits=args.bits, group_size=args.group_size, verbose=False, progress=False,
             screen_rows=None)  # every candidate on every row
    quant_s = time.perf_counter() - t

    summary = summarize(RECORDS)
    gram_summary = None
    if GRAM_RECORDS:
        print("Gram-scored groups, screened over weight-row chunks:")
        gram_summary = summarize(GRAM_RECORDS)
    if args.out:
        Path(args.out).write_text(json.dumps({"command": " ".join(["python -m devtools.search_rank_check", *sys.argv[1:]]),
                                              "date": dt.date.today().isoformat(), "machine": machine_info(),
                                              "model": args.model, "n_calib": args.n_calib, "bits": args.bits,
                                              "group_size": args.group_size, "quant_s": quant_s,
                                              "summary": summary, "records": RECORDS,
                                              "gram_summary": gram_summary, "gram_records": GRAM_RECORDS}))


if __name__ == "__main__":
    main()
