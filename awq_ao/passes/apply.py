"""Apply what the search found: fold the scales, then clip, round and pack each linear.

Every edit goes through the convert :class:`~awq_ao.passes.fold.Transaction`, so a failure
anywhere leaves the model as it was. Names are relative to the root being quantized (a whole
model or one decoder block); report rows get ``prefix`` + name.
"""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.nn import functional as F

from awq_ao.config import AWQConfig
from awq_ao.lowering.int4_tensor import Int4WeightTensor, round_scale, scale_storage_dtype
from awq_ao.lowering.packing import choose_layout
from awq_ao.lowering.quant_math import quant_params
from awq_ao.lowering.scaled_input import ScaledInputLinear
from awq_ao.passes.clip_choice import CLIP_STRENGTHS, clip_alternatives, round_choosing_rows
from awq_ao.passes.float_target import shifted_target
from awq_ao.passes.fold import Transaction, fold_group, scale_consumer
from awq_ao.passes.groups import GraphAnalysis
from awq_ao.passes.rounded_candidates import shared_base
from awq_ao.passes.rounding import (
    error_feedback_codes,
    group_blocks,
    inverse_factor,
    scale_full_gram,
    scaled_factor,
)
from awq_ao.passes.scale_refit import alternate_grid
from awq_ao.passes.search import GroupResult, apply_clip, clip_ratios, scale_gram, weight_2d
from awq_ao.progress import current
from awq_ao.report import ConvertReport, GroupReport


def add_time(report: ConvertReport, key: str, dt: float) -> None:
    """Accumulate ``dt`` seconds under ``report.times[key]``."""
    report.times[key] = report.times.get(key, 0.0) + dt


# --------------------------------------------------------------------------------------------
# fold
# --------------------------------------------------------------------------------------------


def fold_scales(
    root: nn.Module,
    analysis: GraphAnalysis,
    results: dict[int, GroupResult],
    config: AWQConfig,
    txn: Transaction,
    report: ConvertReport,
    prefix: str = "",
) -> dict[str, torch.Tensor]:
    """Fold each group's scales into its producer, or scale its consumers where no fold is legal.

    Returns ``{consumer: scale}`` for the consumers that need an explicit input multiply
    (they become :class:`ScaledInputLinear` when packed). Adds the report's group rows.
    """
    input_scale: dict[str, torch.Tensor] = {}
    for gi, g in enumerate(analysis.groups):
        res = results.get(gi)
        if g.searched and res is None and config.scale_search:
            res = GroupResult(None, note="its enclosing module never ran during the search")
        expert_pair = bool(g.slabs) and g.slabs[0].index is not None  # folded by fold_experts
        if res is not None and res.scales is not None and not expert_pair:
            if g.foldable:
                fold_group(root, g, res.scales, txn)
            else:
                for c in g.consumers:
                    scale_consumer(root.get_submodule(c), g.consumer_is_conv1d.get(c, False), res.scales, txn)
                    input_scale[c] = res.scales
                report.fallback_multiplies += len(g.consumers)
        if g.searched and not expert_pair:
            names = [prefix + c for c in g.consumers] + [prefix + s.module + "." + s.attr for s in g.slabs]
            note = (res.note if res else "") or g.reason
            if g.rescaled_params:
                names += [prefix + p for p, _ in g.rescaled_params]
                note = note or "MoE block input: router rescaled, kept in full precision"
            report.groups.append(
                GroupReport(
                    g.kind,
                    prefix + g.producer.module if g.producer.module else None,
                    names,
                    prefix + g.inspect if g.inspect else None,
                    res.alpha if res else None,
                    res.loss_rtn if res else None,
                    res.loss_best if res else None,
                    note,
                )
            )
            if res is not None and res.note and config.scale_search:
                report.warnings.append(f"{prefix}{', '.join(names)}: {res.note}")
    for name in analysis.shared_calls:
        report.warnings.append(f"{prefix}{name} is called more than once per forward: not scaled")
    report.unseen += [prefix + u for u in analysis.unseen]
    return input_scale


def scales_by_consumer(analysis: GraphAnalysis, results: dict[int, GroupResult]) -> dict[str, torch.Tensor]:
    """``{consumer linear: the scale folded into its input}``."""
    out: dict[str, torch.Tensor] = {}
    for gi, g in enumerate(analysis.groups):
        res = results.get(gi)
        if res is not None and res.scales is not None:
            for c in g.consumers:
                out[c] = res.scales
    return out


# --------------------------------------------------------------------------------------------
# one linear: clip -> round -> pack
# --------------------------------------------------------------------------------------------


def input_grams(
    gram: torch.Tensor | None, scale: torch.Tensor | None, device: torch.device, group_size: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The search's input Gram of one linear, for its *scaled* inputs.

    Returns ``(per-group Gram [K/g, g, g] for the clipping search, full [K, K] Gram for
    error-feedback rounding or None)``. The search keeps a full Gram when rounding is
    ``"gptq"`` and only the per-group blocks otherwise.
    """
    if gram is None:
        return None, None
    gram = gram.to(device, torch.float32)
    if gram.dim() == 2:
        full = scale_full_gram(gram, scale) if scale is not None else gram
        return group_blocks(full, group_size), full
    return (scale_gram(gram, scale) if scale is not None else gram), None


def clip_weight(w: torch.Tensor, group_gram: torch.Tensor, config: AWQConfig) -> torch.Tensor:
    """The weight ``[N, K]`` with each group's range shrunk by the clipping search."""
    ratios = clip_ratios(
        w, group_gram, config.bits, config.group_size, config.zero_point,
        config.clip_grid, config.max_shrink, mode=config.clip_mode,
    )
    return apply_clip(w, ratios, config.group_size, config.clip_mode)


@torch.no_grad()
def custom_linear_handling(mod: nn.Linear, config: AWQConfig) -> str:
    """How to quantize an ``nn.Linear`` subclass with its own ``forward``:

    * ``"plain"``: its forward computes ``F.linear`` (checked on random inputs; e.g.
      FalconLinear's ``x @ W.T + b``): it becomes a plain ``nn.Linear`` holding the INT4 weight;
    * ``"in_place"``: otherwise, if its forward runs with an INT4 weight (e.g. MoE routers that
      call ``F.linear`` and return a tuple): the weight is replaced in place, the class kept;
    * ``"keep"``: neither; the layer stays in full precision.

    ``mod`` is left as it was.
    """
    w = mod.weight
    b = getattr(mod, "bias", None)
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(3, 2, mod.in_features, generator=g, dtype=torch.float32).to(device=w.device, dtype=w.dtype)
    try:
        got = mod(x)
    except Exception:  # noqa: BLE001 - a forward that fails on a float input is not F.linear
        got = None
    want = F.linear(x, w, b)
    tol = 1e-5 if w.dtype in (torch.float32, torch.float64) else 2e-2
    if isinstance(got, torch.Tensor) and got.shape == want.shape and torch.allclose(
        got.float(), want.float(), rtol=tol, atol=tol * float(want.abs().max().clamp(min=1))
    ):
        return "plain"
    saved = mod._parameters["weight"]
    try:
        q = Int4WeightTensor.from_float(w.detach(), config.bits, config.group_size, config.zero_point)
        mod._parameters["weight"] = nn.Parameter(q, requires_grad=False)
        mod(x)
        return "in_place"
    except Exception:  # noqa: BLE001 - e.g. x @ W.T on the INT4 weight
        return "keep"
    finally:
        mod._parameters["weight"] = saved


def has_custom_forward(mod: nn.Module) -> bool:
    """An ``nn.Linear`` subclass with its own ``forward`` (Conv1D is handled as a linear)."""
    if type(mod).__name__ == "Conv1D":
        return False
    return isinstance(mod, nn.Linear) and type(mod).forward is not nn.Linear.forward


def _plain_linear(mod: nn.Linear) -> nn.Linear:
    b = getattr(mod, "bias", None)
    plain = nn.Linear(mod.in_features, mod.out_features, bias=b is not None, device="meta", dtype=mod.weight.dtype)
    plain.weight = mod.weight
    if b is not None:
        plain.bias = mod.bias
    plain.train(mod.training)
    return plain


def pack_linear(
    root: nn.Module,
    name: str,
    handling: str,
    codes: torch.Tensor | None,
    params: tuple[torch.Tensor, torch.Tensor] | None,
    input_scale: torch.Tensor | None,
    config: AWQConfig,
    txn: Transaction,
) -> None:
    """Swap linear ``name`` to its INT4 weight (``codes`` on ``params``, else round to nearest)."""
    from awq_ao.lowering import swap

    mod = root.get_submodule(name)
    # quantize_linear_module may assign the weight in place; record it first
    txn.record(mod, "weight")
    if getattr(mod, "bias", None) is not None:
        txn.record(mod, "bias")
    # an nn.Linear subclass whose forward computes F.linear (FalconLinear: x @ W.T + b)
    # becomes a plain nn.Linear: the INT4 weight runs through F.linear
    target = _plain_linear(mod) if handling == "plain" else mod
    new = swap.quantize_linear_module(target, config.bits, config.group_size, config.zero_point,
                                      params=params, codes=codes)
    if input_scale is not None:
        new = ScaledInputLinear(new, 1.0 / input_scale)
    if new is not mod:
        txn.set_module(root, name, new)


def grid_params(w_grid: torch.Tensor, config: AWQConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero) [N, G]`` of the clipped weight, the scale rounded to its storage dtype."""
    scale, zero = quant_params(w_grid, config.bits, config.group_size, config.zero_point)
    layout = choose_layout(w_grid.device, config.bits, *w_grid.shape, config.group_size)
    return round_scale(scale, scale_storage_dtype(w_grid.dtype, layout)), zero


def round_weights(
    targets: list[torch.Tensor], params: list[tuple[torch.Tensor, torch.Tensor]], full: torch.Tensor,
    config: AWQConfig, gram: torch.Tensor | None = None, scale: torch.Tensor | None = None,
) -> list[tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]]:
    """Error-feedback codes and their grids for linears that read one input (q/k/v, gate/up): one call.

    Rows are independent given the Gram ``full``, so the weights are stacked and rounded
    together: one inverse Cholesky factor and one column sweep instead of one per linear.
    Returns each linear's ``(codes, (scale, zero))``: the grids of ``params``, or with
    ``gptq_refit_rounds`` their scales refit to the codes, alternating with rounding
    (:func:`~awq_ao.passes.scale_refit.alternate_grid`).
    ``gram``, ``scale``: the unscaled full Gram and the AWQ scale ``full`` was made from; with
    ``gptq_shared_factor`` the factor comes from them (:func:`~awq_ao.passes.rounding.scaled_factor`),
    as the search rounded its candidates.
    """
    if len(targets) == 1:
        w, sc, zr = targets[0], *params[0]
    else:
        w = torch.cat([t.float() if t.dtype != torch.float64 else t for t in targets])
        sc = torch.cat([p[0].to(w.dtype) for p in params])
        zr = torch.cat([p[1].to(w.dtype) for p in params])
    base = None
    if gram is not None and gram.dim() == 2:
        base = shared_base(gram.to(w.device, torch.float64 if w.dtype == torch.float64 else torch.float32), config)
    factor = None if base is None else scaled_factor(base, scale)
    if factor is None and config.gptq_refit_rounds:  # one factorization serves every round
        factor = inverse_factor(full.to(w.device, w.dtype if w.dtype == torch.float64 else torch.float32),
                                config.gptq_damp, config.gptq_act_order)
    sizes = [t.shape[0] for t in targets]

    def round_codes(s: torch.Tensor) -> torch.Tensor:
        return error_feedback_codes(w, s, zr, full, config.bits, config.group_size, config.gptq_damp,
                                    act_order=config.gptq_act_order, factor=factor)

    if not config.gptq_refit_rounds:
        return list(zip(round_codes(sc).split(sizes), params, strict=True))
    stored = [scale_storage_dtype(t.dtype, choose_layout(t.device, config.bits, *t.shape, config.group_size))
              for t in targets]

    def store(s: torch.Tensor) -> torch.Tensor:  # the scales as each linear's layout stores them
        return torch.cat([round_scale(part, d).to(s.dtype) for part, d in zip(s.split(sizes), stored, strict=True)])

    codes, sc = alternate_grid(w, sc, zr, full.to(w.device), config.group_size, config.gptq_damp,
                               config.gptq_refit_rounds, round_codes, store)
    sc = sc.float()
    return [(c, (s_t, z_t)) for c, s_t, z_t in zip(codes.split(sizes), sc.split(sizes), zr.split(sizes), strict=True)]


def round_weights_choosing_clip(
    targets: list[torch.Tensor], params: list, full: torch.Tensor, config: AWQConfig, report: ConvertReport,
    gram: torch.Tensor | None = None, scale: torch.Tensor | None = None,
) -> list[tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]]:
    """:func:`round_weights` with ``clip_after_rounding``: ``params[i]`` is one grid, or the
    grids of :data:`~awq_ao.passes.clip_choice.CLIP_STRENGTHS` for a clipped linear; each row
    keeps the grid whose error-feedback codes have the lowest output error
    (:func:`~awq_ao.passes.clip_choice.round_choosing_rows`). The rows choosing each strength
    are added up in ``report.clip_after_rounding_rows``."""
    n_alt = len(CLIP_STRENGTHS)
    alts = [p if isinstance(p, list) else [p] * n_alt for p in params]
    w = torch.cat([t.float() if t.dtype != torch.float64 else t for t in targets])
    cdt = torch.float64 if w.dtype == torch.float64 else torch.float32
    grids = [(torch.cat([a[i][0].to(w.dtype) for a in alts]), torch.cat([a[i][1].to(w.dtype) for a in alts]))
             for i in range(n_alt)]
    base = None
    if gram is not None and gram.dim() == 2:
        base = shared_base(gram.to(w.device, cdt), config)
    factor = scaled_factor(base, scale) if base is not None else \
        inverse_factor(full.to(w.device, cdt), config.gptq_damp, config.gptq_act_order)
    codes, sc, zr, best = round_choosing_rows(w, grids, full.to(w.device, cdt), factor, config)
    tally = report.clip_after_rounding_rows or [0] * n_alt
    off = 0
    for p, t in zip(params, targets, strict=True):  # the clipped linears' rows only
        if isinstance(p, list):
            tally = [a + int(b) for a, b in zip(tally, torch.bincount(best[off : off + t.shape[0]], minlength=n_alt), strict=True)]
        off += t.shape[0]
    report.clip_after_rounding_rows = tally
    sizes = [t.shape[0] for t in targets]
    sc, zr = sc.float(), zr.float()
    return [(c, (s_t, z_t)) for c, s_t, z_t in zip(codes.split(sizes), sc.split(sizes), zr.split(sizes), strict=True)]


def quantize_linears(
    root: nn.Module,
    targets: list[str],
    analysis: GraphAnalysis | None,
    results: dict[int, GroupResult],
    clip_inputs: dict[str, torch.Tensor],
    input_scale: dict[str, torch.Tensor],
    config: AWQConfig,
    txn: Transaction,
    report: ConvertReport,
    prefix: str = "",
    float_cross: dict[str, torch.Tensor] | None = None,
) -> None:
    """Clip, round and pack every linear of ``targets`` (scales already folded).

    Consecutive linears reading the same input with the same scale (q/k/v, gate/up) share
    their scaled Grams and are rounded in one error-feedback call (:func:`round_weights`).
    ``float_cross``: linear -> its unscaled cross Gram ``C`` (``gptq_float_target``); such a
    linear's clipping and rounding aim at :func:`~awq_ao.passes.float_target.shifted_target`.
    """
    scale_of = scales_by_consumer(analysis, results) if analysis is not None else {}
    qk = analysis.qk_linears if analysis is not None and not config.clip_qk else set()
    excluded = set(getattr(analysis, "excluded", set()) or set())
    run = current()

    def done(name: str) -> None:
        report.quantized.append(prefix + name)
        if run is not None:
            run.linear_done("round", prefix + name)

    pending: list[tuple[str, str, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = []
    key: tuple | None = None
    group_gram = full = None
    source: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)  # full's unscaled Gram and scale

    def flush() -> None:  # round and pack the linears waiting on the Gram ``full``
        if pending:
            if any(isinstance(p[3], list) for p in pending):  # clip_after_rounding
                rounded = round_weights_choosing_clip([p[2] for p in pending], [p[3] for p in pending], full,
                                                      config, report, *source)
            else:
                rounded = round_weights([p[2] for p in pending], [p[3] for p in pending], full, config, *source)
            report.error_feedback += len(pending)
            for (name, handling, _, _), (c, params) in zip(pending, rounded, strict=True):
                pack_linear(root, name, handling, c, params, input_scale.get(name), config, txn)
                done(name)
        pending.clear()

    for name in targets:
        if name in excluded:
            continue
        mod = root.get_submodule(name)
        handling = custom_linear_handling(mod, config) if has_custom_forward(mod) else "in_place"
        if handling == "keep":
            report.warnings.append(
                f"{prefix}{name}: its own forward is not F.linear and cannot run an INT4 weight; kept in full precision"
            )
            continue
        conv = type(mod).__name__ == "Conv1D"
        w_target = weight_2d(mod, conv).detach()  # scaled, not clipped
        gram, scale = clip_inputs.get(name), scale_of.get(name)
        new_key = (id(gram), id(scale), w_target.shape[1], w_target.device) if gram is not None else None
        if new_key is None or new_key != key:
            flush()
            key = new_key
            group_gram, full = input_grams(gram, scale, w_target.device, config.group_size)
            source = (gram, scale)
        if float_cross and name in float_cross and full is not None:
            cross = float_cross[name]
            cross = scale_full_gram(cross.to(w_target.device), scale) if scale is not None else cross
            w_target = shifted_target(w_target, cross, full, config.gptq_damp)
            report.float_targets += 1
        w_grid = w_target
        if config.clip and group_gram is not None and name not in qk:
            if full is not None and config.clip_after_rounding and not config.gptq_refit_rounds:
                report.clipped += 1
                pending.append((name, handling, w_target,
                                [grid_params(a, config) for a in clip_alternatives(w_target, group_gram, config)]))
                continue
            w_grid = clip_weight(w_target, group_gram, config)
            report.clipped += 1
        if full is not None:
            pending.append((name, handling, w_target, grid_params(w_grid, config)))
            continue
        if w_grid is not w_target:
            txn.set_param(mod, "weight", w_grid.t().contiguous() if conv else w_grid)
        del w_grid, w_target
        pack_linear(root, name, handling, None, None, input_scale.get(name), config, txn)
        done(name)
    flush()


def apply_found(
    root: nn.Module,
    analysis: GraphAnalysis | None,
    results: dict[int, GroupResult],
    clip_inputs: dict[str, torch.Tensor],
    targets: list[str],
    config: AWQConfig,
    txn: Transaction,
    report: ConvertReport,
    prefix: str = "",
    float_cross: dict[str, torch.Tensor] | None = None,
) -> None:
    """Fold, then quantize the experts and the linears of ``targets`` (timed as one phase);
    ``float_cross``: see :func:`quantize_linears`."""
    from awq_ao.passes.experts_apply import experts_scales, fold_experts, quantize_experts

    t0 = time.perf_counter()
    input_scale = fold_scales(root, analysis, results, config, txn, report, prefix) if analysis is not None else {}
    experts = analysis.experts if analysis is not None else None
    scales = experts_scales(analysis, results) if analysis is not None else {}
    for name, sc in scales.items():
        fold_experts(root.get_submodule(name), analysis.experts[name], sc, txn)
    for note in analysis.notes if analysis is not None else []:
        report.warnings.append(prefix + note)
    quantize_experts(root, experts, scales, clip_inputs, getattr(analysis, "expert_tokens", {}), config, txn,
                     report, prefix)
    quantize_linears(root, targets, analysis, results, clip_inputs, input_scale, config, txn, report, prefix,
                     float_cross)
    add_time(report, "fold+clip+quantize", time.perf_counter() - t0)
