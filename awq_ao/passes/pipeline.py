"""The AWQ algorithm on one root: capture -> groups -> search -> fold -> clip -> round -> pack.

:func:`awq_root` is the whole algorithm, called on the whole model (whole-model mode) or on
one decoder block at a time (layer-by-layer mode, :mod:`awq_ao.passes.sequential`). The
search returns data and leaves the model untouched; :mod:`awq_ao.passes.apply` applies it.
:func:`awq_ao.passes.convert.convert` only chooses the mode and holds the transaction.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from awq_ao.config import AWQConfig
from awq_ao.memory import release_freed_memory
from awq_ao.observers.activation import RecordedCall
from awq_ao.passes.apply import add_time, apply_found, has_custom_forward
from awq_ao.passes.capture import CaptureError, capture
from awq_ao.passes.experts import plan_experts
from awq_ao.passes.fold import Transaction
from awq_ao.passes.groups import GraphAnalysis, find_groups
from awq_ao.passes.sample_chunks import accumulate_grams, rows_of, splits_rows
from awq_ao.passes.search import GroupResult, ScaleSearch
from awq_ao.progress import current
from awq_ao.report import ConvertReport


def awq_root(
    root: nn.Module,
    first_call: RecordedCall,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    targets: list[str],
    observers: dict[str, Any],
    config: AWQConfig,
    txn: Transaction,
    report: ConvertReport,
    prefix: str = "",
    label: str = "",
    split: bool = False,
    rows: int | None = None,
    float_cross: dict[str, torch.Tensor] | None = None,
) -> None:
    """Quantize the linears ``targets`` of ``root`` with AWQ, searched on ``(args, kwargs)``.

    Names are relative to ``root``; report rows get ``prefix``. ``split``: search the root's
    sub-blocks one after the other (attention, then MLP), each on the outputs of the
    already quantized ones, where the root can be split (:func:`block_stages`). ``rows``: the
    batch rows of ``(args, kwargs)`` (default ``first_call.rows``); the candidates are scored
    on the first ``max_search_samples`` of them, the Grams use all of them. ``float_cross``:
    each linear's cross Gram for ``gptq_float_target`` (:mod:`awq_ao.passes.float_target`).
    """
    rows = first_call.rows if rows is None else rows
    analysis = analyze(root, first_call, targets, config, report)  # capture -> scale groups
    for stage, stage_targets in stages(analysis, targets, split):
        results, grams = search(root, stage, args, kwargs, observers, config, report, label, prefix, rows)  # data only
        release_freed_memory()
        # fold the scales, then per linear: clip -> error-feedback round -> pack / swap
        apply_found(root, stage, results, grams, stage_targets, config, txn, report, prefix, float_cross)


def analyze(
    root: nn.Module,
    first_call: RecordedCall,
    targets: list[str],
    config: AWQConfig,
    report: ConvertReport,
) -> GraphAnalysis:
    """Capture ``root`` and find its scale groups, the MoE experts' among them. Nothing is modified."""
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
        from awq_ao.passes.capture import call_kwargs, slice_batch
        from awq_ao.passes.hook_groups import hook_groups

        report.warnings.append(f"{e}; continuing with hook-only groups")
        a1, kw1 = slice_batch(first_call, 1)
        analysis = hook_groups(root, targets, tuple(a1), call_kwargs(root, kw1))
        plan_experts(None, root, analysis, targets, config)
    else:
        analysis = find_groups(ep, root, targets)
        plan_experts(ep, root, analysis, targets, config)
        del ep
    _restrict_groups(root, analysis, report)
    add_time(report, "capture+groups", time.perf_counter() - t0)
    return analysis


def search(
    root: nn.Module,
    analysis: GraphAnalysis,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    observers: dict[str, Any],
    config: AWQConfig,
    report: ConvertReport,
    label: str = "",
    prefix: str = "",
    rows: int = 0,
) -> tuple[dict[int, GroupResult], dict[str, torch.Tensor]]:
    """Scale search (MoE experts' groups included) on the search chunk of the sample; the model is untouched.

    The search replays the first ``max_search_samples`` of the sample's ``rows`` rows; the
    linears' input Grams are then completed over the other rows
    (:func:`~awq_ao.passes.sample_chunks.accumulate_grams`). Returns
    ``({group index: result}, {linear: input Gram})``: the Grams are kept for the clipping
    search and error-feedback rounding.
    """
    if not any(g.searched for g in analysis.groups) and not analysis.experts:
        return {}, {}
    t0 = time.perf_counter()
    run = current()
    detail = label.strip()

    def on_group(g: Any) -> None:
        if run is not None:
            for c in g.consumers:
                run.linear_done("search", prefix + c, detail)

    if run is not None:
        run.set_detail("search", detail)
    scale_search = ScaleSearch(root, analysis, observers, config, on_group, prefix=prefix)
    first = min(rows, config.max_search_samples) if rows and splits_rows(args, kwargs, rows) else 0
    search_args, search_kwargs = rows_of(args, kwargs, rows, 0, first) if first else (args, kwargs)
    was_training = root.training
    root.eval()
    try:
        results = scale_search.run(search_args, search_kwargs)
        analysis.expert_tokens = dict(scale_search.experts.tokens)
        add_time(report, "search", time.perf_counter() - t0)
        t0 = time.perf_counter()
        grams = accumulate_grams(root, scale_search.clip_inputs, scale_search.gram_tokens, args, kwargs,
                                 rows, first, config, analysis.experts) if first else scale_search.clip_inputs
        if first:
            add_time(report, "grams of the other rows", time.perf_counter() - t0)
    finally:
        root.train(was_training)
    return results, grams


def stages(analysis: GraphAnalysis, targets: list[str], split: bool) -> list[tuple[GraphAnalysis, list[str]]]:
    """``[(analysis of one stage, its targets)]``: the whole root, or its sub-blocks in order."""
    parts = block_stages(analysis, targets) if split else None
    if parts is None:
        return [(analysis, targets)]
    return [(_sub_analysis(analysis, gids, first_stage=k == 0), names) for k, (gids, names) in enumerate(parts)]


def block_stages(analysis: Any, local: list[str]) -> list[tuple[list[int], list[str]]] | None:
    """Split a block's groups into sub-block stages searched one after the other.

    A stage is one direct child of the block holding target linears (e.g. ``self_attn``,
    then ``mlp``), in the order their linears are registered. Each stage is searched on the
    outputs of the stages before it *after* those were quantized, so e.g. the MLP's scales
    are chosen for the input it will really see. Returns ``[(group indices, targets)]``, or
    None where the block cannot be split: one child only, an MoE block, or a group whose
    linears span several children (parallel attention/MLP blocks fed by one norm).
    """
    if analysis.experts:
        return None

    def top(name: str) -> str:
        return name.split(".", 1)[0]

    order: list[str] = []
    for t in local:
        if top(t) not in order:
            order.append(top(t))
    if len(order) < 2:
        return None
    stage_groups: list[list[int]] = [[] for _ in order]
    for gi, g in enumerate(analysis.groups):
        if not g.consumers:
            continue
        names = set(g.consumers) | set(g.rescaled)
        if g.producer.kind == "linear" and g.producer.module:
            names.add(g.producer.module)
        tops = {top(n) for n in names}
        if len(tops) != 1 or next(iter(tops)) not in order:
            return None
        stage_groups[order.index(next(iter(tops)))].append(gi)
    return [(gids, [t for t in local if top(t) == child]) for gids, child in zip(stage_groups, order, strict=True)]


def _sub_analysis(analysis: Any, group_ids: list[int], first_stage: bool) -> Any:
    """A shallow copy of ``analysis`` holding only ``group_ids`` (block-wide notes once)."""
    sub = copy.copy(analysis)
    sub.groups = [analysis.groups[gi] for gi in group_ids]
    if not first_stage:
        sub.unseen = []
        sub.shared_calls = []
    return sub


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
            custom = [c for c in g.consumers if has_custom_forward(root.get_submodule(c))]
            if custom:
                g.consumers = [c for c in g.consumers if c not in custom]
                report.warnings.append(f"{', '.join(custom)}: custom forward, quantized without scaling")
    analysis.unseen = [u for u in analysis.unseen if u not in direct]
    analysis.excluded = direct  # type: ignore[attr-defined]


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
