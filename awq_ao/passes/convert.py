"""The convert step: choose the mode, hold the transaction, run the algorithm, report.

The algorithm itself (capture -> groups -> search -> fold -> clip -> round -> pack) is
:func:`awq_ao.passes.pipeline.awq_root`, run here on the whole model or, in layer-by-layer
mode, by :mod:`awq_ao.passes.sequential` on one block at a time.

Convert is transactional: the search does not touch the model, and every edit of the apply
phase is recorded, so any exception leaves the user's model exactly as it was (still
prepared, observers attached) before it propagates.
"""

from __future__ import annotations

import sys
import time
import warnings
from typing import Any

import torch
from torch import nn

from awq_ao.config import AWQConfig
from awq_ao.lowering.head import find_head, quantize_head
from awq_ao.observers.attach import select_targets
from awq_ao.passes.apply import apply_found
from awq_ao.passes.capture import CaptureError, call_kwargs
from awq_ao.passes.fold import Transaction
from awq_ao.passes.pipeline import awq_root, stack_calls
from awq_ao.progress import plan_quantization, run_progress, sample_tokens, tokens_of, write
from awq_ao.report import ConvertReport
from awq_ao.state import AWQState, get_state, set_state


class CalibrationError(ValueError):
    """Convert was called without usable calibration data."""


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
    observed = config.channel_stats == "sample" or any(o.rows for o in state.observers.values())
    if rec is None or not rec.calls or not observed:
        raise CalibrationError(
            "no calibration data: the model was prepared but no batch was run through it. "
            "Call model(batch) on some calibration batches (e.g. 16-128 sequences of 512 tokens) "
            "between prepare and convert."
        )


def convert(model: nn.Module, config: AWQConfig) -> ConvertReport:
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
    head_plan = find_head(model) if config.head == "int8" else None  # refuse before any edit
    refuse_inference_mode(config)
    report = ConvertReport(config.bits, config.group_size, config.zero_point)
    report.size_before = model_size_bytes(model)
    rec = state.recorder if state is not None else None
    if not config.needs_calibration and rec is not None and rec.calls:
        report.warnings.append(
            "the model was calibrated, but scale_search=False and clip=False quantize by round-to-nearest "
            "without reading the calibration data (error-feedback rounding alone: clip=True, max_shrink=0.0)"
        )
    observers = state.observers if state is not None else {}
    for o in observers.values():
        o.enabled = False
    if state is not None and state.recorder is not None:
        state.recorder.enabled = False
    txn = Transaction(config.spill_dir)
    # replays must not grow a KV cache, also where use_cache only arrives through **kwargs
    hf_config = getattr(model, "config", None)
    saved_use_cache = getattr(hf_config, "use_cache", None)
    if saved_use_cache:
        hf_config.use_cache = False
    try:
        with run_progress(config.progress) as (run, _owned):
            search_tokens, kept_tokens, kept_rows = _sample_tokens(state, config.max_search_samples)
            plan_quantization(run, model, targets, config, search_tokens, kept_tokens=kept_tokens,
                              kept_rows=kept_rows)
            if not config.needs_calibration:
                apply_found(model, None, {}, {}, targets, config, txn, report)
            elif _layer_by_layer(model, targets, config, report):
                from awq_ao.passes.sequential import convert_sequential

                assert state is not None and state.recorder is not None
                try:
                    convert_sequential(model, state.recorder.calls, targets, observers, config, txn, report)
                except CaptureError as e:
                    if config.sequential != "auto" or config.spill_dir is not None:
                        raise
                    # "auto": a block that torch.export cannot take on its own (e.g. inputs that
                    # only make sense batched with the rest of the model) -> undo, search whole
                    txn.rollback()
                    txn.close()
                    txn = Transaction(None)
                    report = ConvertReport(config.bits, config.group_size, config.zero_point)
                    report.size_before = model_size_bytes(model)
                    report.mode = f"whole model at once (a block could not be captured on its own: {str(e).split('. ')[0]})"
                    _whole_model(model, state, targets, observers, config, txn, report)
            else:
                assert state is not None
                _whole_model(model, state, targets, observers, config, txn, report)
            run.finish("search")
            run.finish("round")
            run.finish("refine")
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
    if head_plan is not None:
        report.head = quantize_head(model, head_plan)
    if state is None:
        state = AWQState()
    state.remove_hooks()
    state.observers = {}
    state.recorder = None
    state.phase = "converted"
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
        write(report.summary(), sys.stdout)
    for w in report.warnings:
        warnings.warn(w, stacklevel=2)
    return report


def refuse_inference_mode(config: AWQConfig) -> None:
    """Raise before any change where the config refines blocks (autograd) and the caller runs
    under ``torch.inference_mode()`` (whose tensors autograd cannot save)."""
    if config.refine_steps and torch.is_inference_mode_enabled():
        raise RuntimeError(
            "block_refine_steps tunes each block with autograd, which torch.inference_mode() turns off: "
            "run quantize/convert under torch.no_grad() instead, or pass block_refine_steps=0. "
            "The model's weights are unchanged."
        )


def _sample_tokens(state: AWQState | None, max_search_rows: int) -> tuple[int, int, int]:
    """Tokens of the search chunk (the first ``max_search_rows`` rows) and of the whole kept
    sample (the recorder's calls), and the kept sample's rows."""
    rec = state.recorder if state is not None else None
    if rec is None:
        return 0, 0, 0
    parts = [(tokens_of(c.args if c.args else c.kwargs), c.rows) for c in rec.calls]
    return sample_tokens(parts, max_search_rows, sum(r for _, r in parts))


def _whole_model(
    model: nn.Module,
    state: AWQState,
    targets: list[str],
    observers: dict[str, Any],
    config: AWQConfig,
    txn: Transaction,
    report: ConvertReport,
) -> None:
    """Search the whole model on one replay of the stacked calibration sample, then apply."""
    assert state.recorder is not None
    _check_gram_budget(model, targets, config)
    if config.gptq_float_target and config.rounding == "gptq":
        report.warnings.append("gptq_float_target has no effect in whole-model mode (the linears see the float "
                               "model's own inputs there); it applies layer by layer")
    if config.refine_steps:
        report.warnings.append("block_refine_steps has no effect in whole-model mode (no decoder-block stack "
                               "was walked); it applies layer by layer")
    calls = state.recorder.calls
    args, kwargs, rows = stack_calls(calls)
    kwargs = call_kwargs(model, kwargs)
    awq_root(model, calls[0], args, kwargs, targets, observers, config, txn, report, rows=rows)


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
