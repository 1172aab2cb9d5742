"""Applying the MoE experts search: fold, clip, round and store each 3-D weight (step 3 of :mod:`awq_ao.passes.experts`)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from awq_ao.config import AWQConfig
from awq_ao.lowering.int4_experts import IMPLEMENTATION
from awq_ao.lowering.int4_tensor import Int4WeightTensor, round_scale, scale_storage_dtype
from awq_ao.lowering.packing import choose_layout
from awq_ao.lowering.quant_math import quant_params
from awq_ao.passes.experts import MoEPlan, expert_rows, find_experts
from awq_ao.passes.fold import Transaction, _scale_along
from awq_ao.passes.rounding import error_feedback_codes
from awq_ao.passes.search import (
    apply_clip,
)

# --------------------------------------------------------------------------------------------
# apply
# --------------------------------------------------------------------------------------------


def _set_param(txn: Transaction, mod: nn.Module, attr: str, value: torch.Tensor, frozen: bool = False) -> None:
    if frozen:
        txn.record(mod, attr)
        mod._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        txn.set_param(mod, attr, value)


def _error_feedback_experts(
    w: torch.Tensor, target: torch.Tensor, grams: list[torch.Tensor | None], config: AWQConfig, transposed: bool
) -> Int4WeightTensor:
    """Round each expert ``[N, K]`` slab with error feedback, as a linear's weight is rounded:
    the grid (scale, zero) of the clipped slab ``w[e]``, the codes chosen on the unclipped
    scaled slab ``target[e]`` with the expert's input Gram (RTN for an expert without one)."""
    n, k = w.shape[1:]
    layout = choose_layout(w.device, config.bits, n, k, config.group_size)
    slabs = []
    for e in range(w.shape[0]):
        w_now = w[e].contiguous()
        if grams[e] is None:
            slabs.append(Int4WeightTensor.from_float(w_now, config.bits, config.group_size, config.zero_point, layout=layout))
            continue
        gs, zs = quant_params(w_now, config.bits, config.group_size, config.zero_point)
        gs = round_scale(gs, scale_storage_dtype(w_now.dtype, layout))
        codes = error_feedback_codes(
            target[e].to(w_now.dtype), gs, zs, grams[e].to(w_now.device), config.bits, config.group_size,
            damp=config.gptq_damp, act_order=config.gptq_act_order,
        )
        slabs.append(Int4WeightTensor.from_codes(codes, gs, zs, config.bits, config.group_size, w_now.dtype, layout=layout))
    return Int4WeightTensor.from_slabs(slabs, transposed)


def quantize_experts(
    root: nn.Module,
    analysis: Any,
    config: AWQConfig,
    txn: Transaction,
    report: Any,
    prefix: str = "",
    quantize: bool = True,
) -> None:
    """Fold the experts' scales, clip, and store their 3-D weights as INT4 (RTN without a plan).

    ``quantize=False`` only folds the scales (float weights; for tests of the fold).
    """
    from awq_ao.report import GroupReport

    plan: MoEPlan | None = getattr(analysis, "moe", None) if analysis is not None else None
    if plan is None:
        experts = find_experts(root, config)
        if not experts:
            return
        plan = MoEPlan(experts)
    group_of = {g.experts: g for g in plan.groups}
    for note in plan.notes:
        report.warnings.append(prefix + note)
    for name, info in plan.experts.items():
        mod = root.get_submodule(name)
        res = plan.results.get(name)
        g = group_of.get(name)
        s_in = g.result.scales if g is not None and g.result is not None else None
        if s_in is not None:
            for pname, dim in g.rescaled_params:  # routers: kept in full precision
                owner, _, attr = pname.rpartition(".")
                pm = root.get_submodule(owner)
                txn.set_param(pm, attr, _scale_along(getattr(pm, attr), s_in, dim, divide=False))
            report.groups.append(GroupReport(
                "norm", prefix + g.producer.module if g.producer.module else None,
                [f"{prefix}{name}.{info.up_attr}"] + [prefix + p for p, _ in g.rescaled_params],
                prefix + g.inspect, g.result.alpha, g.result.loss_rtn, g.result.loss_best,
                "MoE block input: router rescaled, kept in full precision",
            ))
        w_up = getattr(mod, info.up_attr)
        w_dn = mod.down_proj
        up = expert_rows(w_up.detach().double(), info.transposed).clone()
        dn = expert_rows(w_dn.detach().double(), info.transposed).clone()
        b_attr = f"{info.up_attr}_bias"
        b_up = getattr(mod, b_attr, None) if info.has_bias else None
        new_b = None if b_up is None else b_up.detach().double().clone()
        if s_in is not None:
            up = up * s_in.to(up.device, torch.float64)
        for e in range(info.num_experts):
            s_e = res.s_down[e] if res is not None else None
            if s_e is not None and info.up_index is not None:
                s64 = s_e.to(up.device, torch.float64)
                ui = info.up_index.to(up.device)
                up[e, ui] = up[e, ui] / s64[:, None]
                if new_b is not None:
                    new_b[e, ui] = new_b[e, ui] / s64
                dn[e] = dn[e] * s64
        up_t = up.to(w_up.dtype)
        dn_t = dn.to(w_dn.dtype)
        if res is not None:
            for e in range(info.num_experts):
                if res.clip_up[e] is not None:
                    up_t[e] = apply_clip(up_t[e], res.clip_up[e], config.group_size, config.clip_mode)
                if res.clip_down[e] is not None:
                    dn_t[e] = apply_clip(dn_t[e], res.clip_down[e], config.group_size, config.clip_mode)
            if any(c is not None for c in res.clip_up):
                report.clipped += 2
        if new_b is not None and res is not None and any(s is not None for s in res.s_down):
            _set_param(txn, mod, b_attr, new_b.to(b_up.dtype))
        if not quantize:
            for attr, w in ((info.up_attr, up), ("down_proj", dn)):
                logical = w.transpose(1, 2) if info.transposed else w
                _set_param(txn, mod, attr, logical.contiguous().to(getattr(mod, attr).dtype))
            continue
        grams = {info.up_attr: res.gram_up if res is not None else [], "down_proj": res.gram_down if res is not None else []}
        for attr, w, target in ((info.up_attr, up_t, up), ("down_proj", dn_t, dn)):
            if config.rounding == "gptq" and any(g is not None for g in grams[attr]):
                q = _error_feedback_experts(w, target, grams[attr], config, info.transposed)
                report.error_feedback += info.num_experts
            else:
                logical = w.transpose(1, 2) if info.transposed else w
                q = Int4WeightTensor.from_float(logical.contiguous(), config.bits, config.group_size, config.zero_point, transposed=info.transposed)
            _set_param(txn, mod, attr, q, frozen=True)
            report.experts_quantized.append(f"{prefix}{name}.{attr}")
        cfg_copy = copy.copy(mod.config)
        cfg_copy._experts_implementation_internal = IMPLEMENTATION
        txn.record(mod, "config")
        mod.config = cfg_copy
        if res is not None:
            empty = sum(1 for t in res.tokens if t == 0)
            report.experts_no_tokens += empty
            if empty:
                report.warnings.append(
                    f"{prefix}{name}: {empty} of {info.num_experts} experts received no calibration tokens; "
                    "their scale search and clipping fell back to the statistics of the whole block "
                    "(all of the block's calibration tokens); calibrate with more or more varied data "
                    "to cover them"
                )
            rounded = "error feedback (gptq)" if any(g is not None for g in res.gram_up) else "nearest"
            note = (f"per-expert up->down: {res.scaled} scaled, {info.num_experts - res.scaled} unscaled; "
                    f"{empty} without tokens (whole-block statistics); rounded with {rounded}")
            if info.fold_note:
                note = f"{info.fold_note}; rounded with {rounded}"
            report.groups.append(GroupReport(
                "experts", f"{prefix}{name}.{info.up_attr}", [f"{prefix}{name}.down_proj"], prefix + name,
                None, res.loss_rtn if info.up_index is not None else None,
                res.loss_best if info.up_index is not None else None, note,
            ))
