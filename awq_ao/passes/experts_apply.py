"""Applying the search to MoE experts: fold the experts' scales, then clip, round and store each
3-D weight, one expert slab at a time, with the linears' own clip and rounding code
(:mod:`awq_ao.passes.apply`). Every edit goes through the convert transaction.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from awq_ao.config import AWQConfig
from awq_ao.lowering.int4_experts import IMPLEMENTATION
from awq_ao.lowering.int4_tensor import Int4WeightTensor
from awq_ao.lowering.packing import choose_layout
from awq_ao.passes.experts import ExpertsInfo, expert_rows, find_experts
from awq_ao.passes.fold import Transaction
from awq_ao.passes.group_types import ExpertSlabs
from awq_ao.report import ConvertReport, GroupReport

__all__ = ["ExpertScales", "fold_experts", "quantize_experts"]


class ExpertScales:
    """The scales found for one experts module: its input (every expert's gate_up) and each
    expert's up -> down pair, with the searches' losses for the report."""

    def __init__(self) -> None:
        self.s_in: torch.Tensor | None = None
        self.s_down: dict[int, torch.Tensor] = {}
        self.searched = 0
        self.loss_rtn = 0.0
        self.loss_best = 0.0

    def of(self, slab: ExpertSlabs, e: int) -> torch.Tensor | None:
        """The scale folded into the input channels of expert ``e``'s slab."""
        return self.s_down.get(e) if slab.attr == "down_proj" else self.s_in


def _set_param(txn: Transaction, mod: nn.Module, attr: str, value: torch.Tensor, frozen: bool = False) -> None:
    if frozen:
        txn.record(mod, attr)
        mod._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        txn.set_param(mod, attr, value)


def fold_experts(mod: nn.Module, info: ExpertsInfo, scales: ExpertScales, txn: Transaction) -> None:
    """Fold an experts module's scales into its weights, in float64, one cast at the end:
    every expert's gate_up input channels times ``s_in``; expert e's up rows (and bias) divided
    by ``s_down[e]`` and its down slab's input channels multiplied by it."""
    if scales.s_in is None and not scales.s_down:
        return
    w_up = getattr(mod, info.up_attr)
    up = expert_rows(w_up.detach().double(), info.transposed).clone()
    if scales.s_in is not None:
        up = up * scales.s_in.to(up.device, torch.float64)
    b_attr = f"{info.up_attr}_bias"
    b_up = getattr(mod, b_attr, None) if info.has_bias else None
    if scales.s_down:
        dn = expert_rows(mod.down_proj.detach().double(), info.transposed).clone()
        ui = info.up_index.to(up.device)
        new_b = None if b_up is None else b_up.detach().double().clone()
        for e, s in scales.s_down.items():
            s64 = s.to(up.device, torch.float64)
            up[e, ui] = up[e, ui] / s64[:, None]
            dn[e] = dn[e] * s64
            if new_b is not None:
                new_b[e, ui] = new_b[e, ui] / s64
        _set_param(txn, mod, "down_proj", _logical(dn, info).to(mod.down_proj.dtype))
        if new_b is not None:
            _set_param(txn, mod, b_attr, new_b.to(b_up.dtype))
    _set_param(txn, mod, info.up_attr, _logical(up, info).to(w_up.dtype))


def _logical(rows: torch.Tensor, info: ExpertsInfo) -> torch.Tensor:
    return (rows.transpose(1, 2) if info.transposed else rows).contiguous()


def _quantize_weight(
    mod: nn.Module, name: str, info: ExpertsInfo, attr: str, grams: dict[str, torch.Tensor],
    scales: ExpertScales, config: AWQConfig,
) -> tuple[Int4WeightTensor, bool, bool]:
    """One 3-D weight: per expert slab, clip and round exactly as a linear is (the slab's
    input Gram scaled by the slab's scale). Returns ``(weight, clipped, error feedback)``."""
    from awq_ao.passes.apply import clip_weight, grid_params, input_grams, round_weights

    w = expert_rows(getattr(mod, attr).detach(), info.transposed)
    slab = ExpertSlabs(name, attr, info.transposed)
    n, k = w.shape[1:]
    layout = choose_layout(w.device, config.bits, n, k, config.group_size)
    grids: list[torch.Tensor] = []
    fulls: list[torch.Tensor | None] = []
    clipped = False
    for e in range(info.num_experts):
        group_gram, full = input_grams(grams.get(slab.key(e)), scales.of(slab, e), w.device, config.group_size)
        w_grid = w[e]
        if config.clip and group_gram is not None:
            w_grid = clip_weight(w[e], group_gram, config)
            clipped = True
        grids.append(w_grid)
        fulls.append(full)
    if not any(f is not None for f in fulls):  # round to nearest on each (clipped) slab's grid
        logical = _logical(torch.stack(grids), info)
        q = Int4WeightTensor.from_float(logical, config.bits, config.group_size, config.zero_point, transposed=info.transposed)
        return q, clipped, False
    slabs = []
    for e, (w_grid, full) in enumerate(zip(grids, fulls, strict=True)):
        if full is None:  # an expert without a Gram: round to nearest
            slabs.append(Int4WeightTensor.from_float(w_grid.contiguous(), config.bits, config.group_size, config.zero_point, layout=layout))
            continue
        params = grid_params(w_grid, config)
        codes, params = round_weights([w[e]], [params], full, config, grams.get(slab.key(e)), scales.of(slab, e))[0]
        slabs.append(Int4WeightTensor.from_codes(codes, *params, config.bits, config.group_size, w.dtype, layout=layout))
    return Int4WeightTensor.from_slabs(slabs, info.transposed), clipped, True


def quantize_experts(
    root: nn.Module,
    experts: dict[str, ExpertsInfo] | None,
    scales: dict[str, ExpertScales],
    grams: dict[str, torch.Tensor],
    tokens: dict[str, list[int]],
    config: AWQConfig,
    txn: Transaction,
    report: ConvertReport,
    prefix: str = "",
) -> None:
    """Clip, round and store every experts module's 3-D weights as INT4 (scales already folded;
    without ``experts``, those of ``root`` to round to nearest) and switch its forward to the
    ``"awq_ao_int4"`` implementation."""
    if experts is None:
        experts = find_experts(root, config)
    for name, info in experts.items():
        mod = root.get_submodule(name)
        found = scales.get(name) or ExpertScales()
        rounded = "nearest"
        for attr in (info.up_attr, "down_proj"):
            q, clipped, ef = _quantize_weight(mod, name, info, attr, grams, found, config)
            report.clipped += int(clipped)
            if ef:
                report.error_feedback += info.num_experts
                rounded = "error feedback (gptq)"
            _set_param(txn, mod, attr, q, frozen=True)
            report.experts_quantized.append(f"{prefix}{name}.{attr}")
        cfg_copy = copy.copy(mod.config)
        cfg_copy._experts_implementation_internal = IMPLEMENTATION
        txn.record(mod, "config")
        mod.config = cfg_copy
        counts = tokens.get(name)
        if counts is None:
            if config.scale_search or config.clip:
                report.warnings.append(f"{prefix}{name}: the experts module never ran during the search; "
                                       "its experts were rounded to nearest without scales or clipping")
            continue
        _report_experts(report, prefix, name, info, found, counts, rounded)


def _report_experts(report: ConvertReport, prefix: str, name: str, info: ExpertsInfo, found: ExpertScales,
                    counts: list[int], rounded: str) -> None:
    empty = sum(1 for t in counts if t == 0)
    report.experts_no_tokens += empty
    if empty:
        report.warnings.append(
            f"{prefix}{name}: {empty} of {info.num_experts} experts received no calibration tokens in the "
            "search rows; their scale search fell back to the statistics of the whole block (all of "
            "its tokens), and so did their clipping and rounding unless the other kept rows routed "
            "tokens to them; calibrate with more or more varied data (or a larger "
            "max_search_samples) to cover them"
        )
    scaled = len(found.s_down)
    note = (f"per-expert up->down: {scaled} scaled, {info.num_experts - scaled} unscaled; "
            f"{empty} without tokens (whole-block statistics); rounded with {rounded}")
    if info.fold_note:
        note = f"{info.fold_note}; rounded with {rounded}"
    searched = info.up_index is not None and found.searched > 0
    report.groups.append(GroupReport(
        "experts", f"{prefix}{name}.{info.up_attr}", [f"{prefix}{name}.down_proj"], prefix + name, None,
        found.loss_rtn if searched else None, found.loss_best if searched else None, note,
    ))


def experts_scales(analysis: Any, results: dict[int, Any]) -> dict[str, ExpertScales]:
    """``{experts module: ExpertScales}`` from the search results of the experts' groups."""
    out: dict[str, ExpertScales] = {}
    for gi, g in enumerate(analysis.groups):
        if not g.slabs:
            continue
        res = results.get(gi)
        sc = out.setdefault(g.slabs[0].module, ExpertScales())
        idx = g.slabs[0].index
        if idx is not None and res is not None and res.loss_rtn is not None:
            sc.searched += 1
            sc.loss_rtn += res.loss_rtn
            sc.loss_best += res.loss_best if res.loss_best is not None else res.loss_rtn
        if res is None or res.scales is None:
            continue
        if idx is None:
            if g.foldable:  # the producer fold (fold_scales) goes with it
                sc.s_in = res.scales
        else:
            sc.s_down[idx] = res.scales
    return out
