"""The convert step: capture, group, search, fold, clip and swap weights to INT4.

Convert is transactional: the search does not touch the model, and every edit of the apply
phase is recorded, so any exception leaves the user's model exactly as it was (still
prepared, observers attached) before it propagates.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._pytree import tree_flatten, tree_unflatten

from awq_ao.config import AWQConfig
from awq_ao.lowering.int4_tensor import Int4WeightTensor, round_scale, scale_storage_dtype
from awq_ao.lowering.packing import choose_layout
from awq_ao.lowering.quant_math import quant_params
from awq_ao.lowering.scaled_input import ScaledInputLinear
from awq_ao.observers.activation import RecordedCall
from awq_ao.observers.attach import select_targets
from awq_ao.passes.capture import CaptureError, call_kwargs, capture
from awq_ao.passes.experts import plan_experts, quantize_experts, search_experts
from awq_ao.passes.fold import Transaction, fold_group, scale_consumer
from awq_ao.passes.groups import GraphAnalysis, find_groups
from awq_ao.passes.rounding import error_feedback_round, group_blocks, scale_full_gram
from awq_ao.passes.search import (
    GroupResult,
    ScaleSearch,
    apply_clip,
    clip_ratios,
    scale_gram,
    weight_2d,
)
from awq_ao.report import ConvertReport, GroupReport
from awq_ao.state import AWQState, get_state, set_state


class CalibrationError(ValueError):
    """Convert was called without usable calibration data."""


def stack_calls(calls: list[RecordedCall]) -> tuple[tuple[Any, ...], dict[str, Any], int]:
    """Concatenate recorded calls along the batch dimension into one search batch.

    Calls whose structure or non-batch shapes differ from the first call are left out.
    """
    first = calls[0]
    leaves0, spec0 = tree_flatten((first.args, first.kwargs))
    cols: list[list[Any]] = [[leaf] for leaf in leaves0]
    rows = first.rows
    for c in calls[1:]:
        leaves, spec = tree_flatten((c.args, c.kwargs))
        if spec != spec0:
            continue
        ok = True
        for a, b in zip(leaves0, leaves, strict=True):
            if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
                ok = False
            elif isinstance(a, torch.Tensor):
                batch = a.dim() > 0 and a.shape[0] == first.rows and b.shape[0] == c.rows
                if batch and a.shape[1:] != b.shape[1:]:
                    ok = False
                if not batch and not (a.shape == b.shape and torch.equal(a, b)):
                    ok = False
            elif a != b:
                ok = False
        if not ok:
            continue
        for col, leaf in zip(cols, leaves, strict=True):
            col.append(leaf)
        rows += c.rows
    merged = []
    for col in cols:
        a = col[0]
        if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == first.rows and len(col) > 1:
            merged.append(torch.cat(col, dim=0))
        else:
            merged.append(a)
    args, kwargs = tree_unflatten(merged, spec0)
    return tuple(args), dict(kwargs), rows


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc=desc, leave=False)


def _check_calibration(state: AWQState | None, config: AWQConfig) -> None:
    if state is None or state.phase != "prepared":
        raise CalibrationError(
            "convert needs calibration: call quantize_(model, awq_config(step='prepare', ...)), "
            "run your calibration batches through the model, then quantize_(model, "
            "awq_config(...)). For plain round-to-nearest without calibration use "
            "awq_config(scale_search=False, clip=False)."
        )
    for name, obs in state.observers.items():
        if obs.nonfinite_call is not None:
            raise FloatingPointError(
                f"NaN/Inf in the input of layer {name!r} during calibration call "
                f"{obs.nonfinite_call}. Check the calibration data and the model's dtype "
                "(float16 overflow is common: try bfloat16 or float32), then prepare again."
            )
    rec = state.recorder
    if rec is None or not rec.calls or all(o.rows == 0 for o in state.observers.values()):
        raise CalibrationError(
            "no calibration data: the model was prepared but no batch was run through it. "
            "Call model(batch) on some calibration batches (e.g. 16-128 sequences of 512 tokens) "
            "between prepare and convert."
        )


def search_phase(
    root: nn.Module,
    first_call: RecordedCall,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    targets: list[str],
    observers: dict[str, Any],
    config: AWQConfig,
    report: ConvertReport,
    label: str = "",
) -> tuple[GraphAnalysis, dict[int, GroupResult], dict[str, torch.Tensor]]:
    """Capture ``root``, find its groups and run the search on ``(args, kwargs)``.

    Names in ``targets``/``observers`` are relative to ``root``. Nothing is modified.
    """
    analysis = analyze_phase(root, first_call, targets, config, report)
    results, clip_inputs = run_search(root, analysis, args, kwargs, observers, config, report, label)
    return analysis, results, clip_inputs


def analyze_phase(
    root: nn.Module,
    first_call: RecordedCall,
    targets: list[str],
    config: AWQConfig,
    report: ConvertReport,
) -> GraphAnalysis:
    """Capture ``root`` and find its scale groups (and MoE plan). Nothing is modified."""
    t0 = time.perf_counter()
    try:
        ep = capture(root, first_call)
    except CaptureError as e:
        if config.on_capture_error != "hook_only":
            raise CaptureError(
                f"{e}. awq_ao needs torch.export to see the model's structure. Pass "
                "awq_config(on_capture_error='hook_only') to continue with groups found by "
                "hooks (norm -> consumers, verified numerically), or quantize without "
                "calibration (awq_config(scale_search=False, clip=False))."
            ) from e
        from awq_ao.passes.capture import call_kwargs as _ck
        from awq_ao.passes.capture import slice_batch
        from awq_ao.passes.hook_groups import hook_groups

        report.warnings.append(f"{e}; continuing with hook-only groups")
        a1, kw1 = slice_batch(first_call, 1)
        analysis = hook_groups(root, targets, tuple(a1), _ck(root, kw1))
        plan_experts(None, root, analysis, targets, config)
    else:
        analysis = find_groups(ep, root, targets)
        plan_experts(ep, root, analysis, targets, config)
        del ep
    _restrict_groups(root, analysis, report)
    _add_time(report, "capture+groups", time.perf_counter() - t0)
    return analysis


def run_search(
    root: nn.Module,
    analysis: GraphAnalysis,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    observers: dict[str, Any],
    config: AWQConfig,
    report: ConvertReport,
    label: str = "",
) -> tuple[dict[int, GroupResult], dict[str, torch.Tensor]]:
    """Scale search (and experts search) for ``analysis.groups`` on one replay of the sample."""
    t0 = time.perf_counter()
    n_groups = sum(1 for g in analysis.groups if g.consumers)
    bar = _progress(n_groups, f"awq search{label}", config.progress)
    search = ScaleSearch(root, analysis, observers, config, bar)
    was_training = root.training
    root.eval()
    try:
        results = search.run(args, kwargs)
        search_experts(root, analysis, results, search.clip_inputs, args, kwargs, config)
    finally:
        root.train(was_training)
        if bar is not None:
            bar.close()
    _add_time(report, "search", time.perf_counter() - t0)
    return results, search.clip_inputs


def _restrict_groups(root: nn.Module, analysis: GraphAnalysis, report: ConvertReport) -> None:
    """Drop what cannot be scaled safely before the search.

    * Layers whose weight the model also reads directly (e.g. ``x @ W.T``) stay in full
      precision and unscaled; a group that would rescale them cannot fold.
    * Where a group needs the explicit multiply, linears with their own ``forward`` (e.g. MoE
      routers returning tuples) are left out of the scaling (plain RTN), since the
      ``ScaledInputLinear`` wrapper cannot stand in for them.
    """
    direct = set(getattr(analysis, "direct_weight_use", {}) or {})
    for name in sorted(direct):
        report.warnings.append(
            f"{name}: its weight is also read directly ({analysis.direct_weight_use[name]}); kept in full precision"
        )
    for g in analysis.groups:
        hit = direct & set(g.consumers + g.rescaled)
        if hit:
            g.consumers = [c for c in g.consumers if c not in direct]
            if g.foldable:
                g.foldable = False
                g.reason = f"{sorted(hit)[0]} reads X and its weight is used directly"
        if not g.foldable:
            custom = [c for c in g.consumers if _custom_forward(root.get_submodule(c))]
            if custom:
                g.consumers = [c for c in g.consumers if c not in custom]
                report.warnings.append(f"{', '.join(custom)}: custom forward, quantized without scaling")
    analysis.unseen = [u for u in analysis.unseen if u not in direct]
    analysis.excluded = direct  # type: ignore[attr-defined]


@torch.no_grad()
def _custom_linear_handling(mod: nn.Linear, config: AWQConfig) -> str:
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


def _plain_linear(mod: nn.Linear) -> nn.Linear:
    b = getattr(mod, "bias", None)
    plain = nn.Linear(mod.in_features, mod.out_features, bias=b is not None, device="meta", dtype=mod.weight.dtype)
    plain.weight = mod.weight
    if b is not None:
        plain.bias = mod.bias
    plain.train(mod.training)
    return plain


def _custom_forward(mod: nn.Module) -> bool:
    if type(mod).__name__ == "Conv1D":
        return False
    return isinstance(mod, nn.Linear) and type(mod).forward is not nn.Linear.forward


def _add_time(report: ConvertReport, key: str, dt: float) -> None:
    report.times[key] = report.times.get(key, 0.0) + dt


def apply_phase(
    root: nn.Module,
    analysis: GraphAnalysis | None,
    results: dict[int, GroupResult],
    clip_inputs: dict[str, torch.Tensor],
    targets: list[str],
    config: AWQConfig,
    txn: Transaction,
    report: ConvertReport,
    replacements: dict[int, nn.Module],
    prefix: str = "",
) -> None:
    """Fold the found scales, clip and swap ``targets`` (names relative to ``root``) to INT4.

    Every edit goes through ``txn``; report rows use ``prefix`` + name.
    """
    from awq_ao.lowering import swap

    t0 = time.perf_counter()
    input_scale: dict[str, torch.Tensor] = {}
    if analysis is not None:
        for gi, g in enumerate(analysis.groups):
            res = results.get(gi)
            if g.consumers and res is None and config.scale_search:
                res = GroupResult(None, note="its enclosing module never ran during the search")
            if res is not None and res.scales is not None:
                if g.foldable:
                    fold_group(root, g, res.scales, txn)
                else:
                    for c in g.consumers:
                        mod = root.get_submodule(c)
                        scale_consumer(mod, g.consumer_is_conv1d.get(c, False), res.scales, txn)
                        input_scale[c] = res.scales
                    report.fallback_multiplies += len(g.consumers)
            if g.consumers:
                report.groups.append(
                    GroupReport(
                        g.kind,
                        prefix + g.producer.module if g.producer.module else None,
                        [prefix + c for c in g.consumers],
                        prefix + g.inspect if g.inspect else None,
                        res.alpha if res else None,
                        res.loss_rtn if res else None,
                        res.loss_best if res else None,
                        (res.note if res else "") or g.reason,
                    )
                )
                if res is not None and res.note and config.scale_search:
                    report.warnings.append(f"{prefix}{', '.join(g.consumers)}: {res.note}")
        for name in analysis.shared_calls:
            report.warnings.append(f"{prefix}{name} is called more than once per forward: not scaled")
        report.unseen += [prefix + u for u in analysis.unseen]
    quantize_experts(root, analysis, config, txn, report, prefix)
    scale_of = _scales_by_consumer(analysis, results) if analysis is not None else {}
    qk = analysis.qk_linears if analysis is not None and not config.clip_qk else set()
    excluded = set(getattr(analysis, "excluded", set()) or set())
    bar = _progress(len(targets), "awq quantize", config.progress and not prefix)
    for name in targets:
        if name in excluded:
            continue
        mod = root.get_submodule(name)
        handling = _custom_linear_handling(mod, config) if _custom_forward(mod) else "in_place"
        if handling == "keep":
            report.warnings.append(
                f"{prefix}{name}: its own forward is not F.linear and cannot run an INT4 weight; kept in full precision"
            )
            continue
        conv = type(mod).__name__ == "Conv1D"
        params = None
        w_target = weight_2d(mod, conv).detach()  # scaled, not clipped
        gram = clip_inputs.get(name)
        full = None  # [K, K] Gram of the (scaled) inputs, for error-feedback rounding
        if gram is not None:
            gram = gram.to(w_target.device, torch.float32)
            s = scale_of.get(name)
            if gram.dim() == 2:
                full = scale_full_gram(gram, s) if s is not None else gram
                gram = group_blocks(full, config.group_size)
            elif s is not None:
                gram = scale_gram(gram, s)
        if config.clip and gram is not None and name not in qk:
            ratios = clip_ratios(
                w_target, gram, config.bits, config.group_size, config.zero_point,
                config.clip_grid, config.max_shrink, mode=config.clip_mode,
            )
            clipped = apply_clip(w_target, ratios, config.group_size, config.clip_mode)
            txn.set_param(mod, "weight", clipped.t().contiguous() if conv else clipped)
            del clipped
            report.clipped += 1
        if full is not None:
            # the grid of the clipped weight, the codes chosen with error feedback on the
            # unclipped one (the grid's clamp does the clipping)
            w_now = weight_2d(mod, conv).detach()
            gs, zs = quant_params(w_now, config.bits, config.group_size, config.zero_point)
            lay = choose_layout(w_now.device, config.bits, *w_now.shape, config.group_size)
            gs = round_scale(gs, scale_storage_dtype(w_now.dtype, lay))
            q = error_feedback_round(w_target, gs, zs, full, config.bits, config.group_size, config.gptq_damp,
                                     act_order=config.gptq_act_order)
            q = q.to(w_now.dtype)
            txn.set_param(mod, "weight", q.t().contiguous() if conv else q)
            params = (gs, zs)
            report.error_feedback += 1
            del q, w_now
        del gram, full, w_target
        # quantize_linear_module may assign the weight in place; record it first
        txn._save(mod, "weight")
        if getattr(mod, "bias", None) is not None:
            txn._save(mod, "bias")
        # an nn.Linear subclass with its own forward that computes F.linear (FalconLinear:
        # x @ W.T + b) becomes a plain nn.Linear: the INT4 weight runs through F.linear
        target_mod = _plain_linear(mod) if handling == "plain" else mod
        new = swap.quantize_linear_module(target_mod, config.bits, config.group_size, config.zero_point, params=params)
        if name in input_scale:
            new = ScaledInputLinear(new, 1.0 / input_scale[name])
        if new is not mod:
            txn.set_module(root, name, new)
            replacements[id(mod)] = new
        report.quantized.append(prefix + name)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    _add_time(report, "fold+clip+quantize", time.perf_counter() - t0)


def convert(model: nn.Module, config: AWQConfig, token: object = None) -> ConvertReport:
    """Quantize ``model`` in place with AWQ; return a :class:`ConvertReport`."""
    from awq_ao.lowering.swap import footprint, model_size_bytes

    t_start = time.perf_counter()
    state = get_state(model)
    if state is not None and state.phase == "converted":
        raise RuntimeError("this model was already converted by awq_ao.")
    if config.needs_calibration:
        _check_calibration(state, config)
        assert state is not None
        targets = list(state.targets)
    else:
        targets = select_targets(model, config)
        if not targets:
            raise ValueError("no quantizable layer found (nn.Linear or transformers' Conv1D).")
    report = ConvertReport(config.bits, config.group_size, config.zero_point)
    report.size_before = model_size_bytes(model)
    observers = state.observers if state is not None else {}
    for o in observers.values():
        o.enabled = False
    if state is not None and state.recorder is not None:
        state.recorder.enabled = False
    txn = Transaction(config.spill_dir)
    replacements: dict[int, nn.Module] = {}
    # replays must not grow a KV cache, also where use_cache only arrives through **kwargs
    hf_config = getattr(model, "config", None)
    saved_use_cache = getattr(hf_config, "use_cache", None)
    if saved_use_cache:
        hf_config.use_cache = False
    try:
        if not config.needs_calibration:
            apply_phase(model, None, {}, {}, targets, config, txn, report, replacements)
        elif _layer_by_layer(model, targets, config, report):
            from awq_ao.passes.sequential import convert_sequential

            assert state is not None and state.recorder is not None
            try:
                convert_sequential(model, state.recorder.calls, targets, observers, config, txn, report, replacements)
            except CaptureError as e:
                if config.sequential != "auto" or config.spill_dir is not None:
                    raise
                # "auto": a block that torch.export cannot take on its own (e.g. inputs that
                # only make sense batched with the rest of the model) -> undo, search whole
                txn.rollback()
                txn.close()
                txn = Transaction(None)
                replacements.clear()
                report = ConvertReport(config.bits, config.group_size, config.zero_point)
                report.size_before = model_size_bytes(model)
                report.mode = f"whole model at once (a block could not be captured on its own: {str(e).split('. ')[0]})"
                _whole_model(model, state, targets, observers, config, txn, report, replacements)
        else:
            assert state is not None
            _whole_model(model, state, targets, observers, config, txn, report, replacements)
    except BaseException:
        if saved_use_cache:
            hf_config.use_cache = saved_use_cache
        try:
            txn.rollback()
        finally:
            txn.close()
        for o in observers.values():
            o.enabled = True
        if state is not None and state.recorder is not None:
            state.recorder.enabled = True
        raise
    txn.close()
    if saved_use_cache:
        hf_config.use_cache = saved_use_cache
    if state is None:
        state = AWQState()
    state.replacements.update(replacements)
    state.remove_hooks()
    state.observers = {}
    state.recorder = None
    state.phase = "converted"
    state.convert_token = token
    state.report = report
    set_state(model, state)
    from awq_ao.integrations.transformers_quantizer import attach_to_model

    attach_to_model(model)  # model.save_pretrained writes the awq_ao format
    done = set(report.quantized)
    report.kept = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in done]
    report.size_after = model_size_bytes(model)
    report.footprint = footprint(model)
    report.times["total"] = time.perf_counter() - t_start
    if report.unseen:
        report.warnings.append(
            f"{len(report.unseen)} layers never ran in the captured call; quantized without scaling: "
            + ", ".join(report.unseen[:5])
        )
    if config.verbose:
        print(report.summary())
    for w in report.warnings:
        warnings.warn(w, stacklevel=2)
    return report


def _whole_model(
    model: nn.Module,
    state: AWQState,
    targets: list[str],
    observers: dict[str, Any],
    config: AWQConfig,
    txn: Transaction,
    report: ConvertReport,
    replacements: dict[int, nn.Module],
) -> None:
    """Search the whole model on one replay of the stacked calibration sample, then apply."""
    assert state.recorder is not None
    _check_gram_budget(model, targets, config)
    calls = state.recorder.calls
    args, kwargs, _rows = stack_calls(calls)
    kwargs = call_kwargs(model, kwargs)
    analysis, results, clip_inputs = search_phase(model, calls[0], args, kwargs, targets, observers, config, report)
    apply_phase(model, analysis, results, clip_inputs, targets, config, txn, report, replacements)


def _layer_by_layer(model: nn.Module, targets: list[str], config: AWQConfig, report: ConvertReport) -> bool:
    """Resolve ``config.sequential``.

    ``"auto"``: layer by layer where one stack of repeated blocks holds every target linear
    (as in transformers decoders); else the whole model at once, so that linears outside the
    stack (or in several parallel stacks, as XLM's attentions/ffns lists) are still scaled.
    """
    from awq_ao.passes.sequential import find_blocks

    if config.sequential is False:
        report.mode = "whole model at once (sequential=False)"
        return False
    if config.sequential is True:
        return True
    try:
        stack, _ = find_blocks(model, targets)
        outside = [t for t in targets if not t.startswith(stack + ".")]
    except ValueError:
        stack, outside = "", targets
    if outside:
        if config.spill_dir is not None:
            raise ValueError(
                "spill_dir needs layer-by-layer convert, but this model has no stack of repeated "
                "blocks (an nn.ModuleList of identical layers) holding all its linears "
                f"({outside[0]} lies outside). Drop spill_dir, or pass sequential=True."
            )
        why = f"{outside[0]} lies outside {stack}" if stack else "no stack of repeated blocks"
        report.mode = f"whole model at once ({why}; sequential=True forces layer by layer)"
        return False
    return True


def _check_gram_budget(model: nn.Module, targets: list[str], config: AWQConfig) -> None:
    """Refuse whole-model GPTQ rounding whose [K, K] Grams would exceed ``config.max_gram_gib``.

    Upper bound: one float32 Gram per quantized linear (linears sharing an input share one),
    and two per MoE expert (its up and down inputs).
    """
    if config.rounding != "gptq" or not config.needs_calibration:
        return
    total = 0
    for name in targets:
        mod = model.get_submodule(name)
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            continue
        k = w.shape[0] if type(mod).__name__ == "Conv1D" else w.shape[1]
        total += k * k * 4
    from awq_ao.passes.experts import find_experts

    for info in find_experts(model, config).values():  # one up and one down Gram per expert
        total += info.num_experts * (info.hidden**2 + info.inter**2) * 4
    if total > config.max_gram_gib * 2**30:
        raise MemoryError(
            f"rounding='gptq' searching the whole model at once would keep up to {total / 2**30:.1f} GiB of "
            f"input Grams (one [K, K] float32 matrix per linear input), over max_gram_gib={config.max_gram_gib}. "
            "Use layer-by-layer convert (sequential=True: one block's Grams at a time), "
            "rounding='nearest', or raise max_gram_gib."
        )


def _scales_by_consumer(analysis: GraphAnalysis, results: dict[int, GroupResult]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for gi, g in enumerate(analysis.groups):
        res = results.get(gi)
        if res is not None and res.scales is not None:
            for c in g.consumers:
                out[c] = res.scales
    return out
