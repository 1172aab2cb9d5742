"""The one-call helper: model + calibration batches -> quantized model (same flow as quantize_)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torchao.quantization import quantize_

from awq_ao.config import awq_config, whole_model
from awq_ao.observers.activation import CallRecorded
from awq_ao.passes.convert import CalibrationError, refuse_inference_mode
from awq_ao.progress import (
    RunProgress,
    plan_quantization,
    rows_of,
    run_progress,
    sample_tokens,
    tokens_of,
)
from awq_ao.report import ConvertReport
from awq_ao.state import get_state


def _call(model: nn.Module, batch: Any, extra: dict[str, Any]) -> None:
    if isinstance(batch, Mapping):
        model(**{**extra, **batch})  # the batch's own keywords win
    elif isinstance(batch, (tuple, list)):
        model(*batch, **extra)
    else:
        model(batch, **extra)


def calibration_kwargs(model: nn.Module) -> dict[str, Any]:
    """Keywords added to every calibration call: ``logits_to_keep=1`` where the model takes it.

    Calibration needs the activations of the linears, never the logits, and the output head
    is not quantized with calibration. A Hugging Face causal LM computes the head for the last
    position only with ``logits_to_keep=1``: e.g. Gemma 3 (262144-token vocabulary) holds a
    4 GiB float32 logits tensor per 8 x 512-token batch otherwise. A batch that sets it keeps
    its own value.
    """
    from awq_ao.observers.attach import accepts_kwarg

    return {"logits_to_keep": 1} if accepts_kwarg(model, "logits_to_keep") else {}


def _plan(run: RunProgress, model: nn.Module, calibration: Iterable[Any], config: Any,
          forward: bool = True) -> Callable[[Any], float]:
    """Plan the run's phases before calibration; returns a batch's calibration cost.

    ``forward=False``: the batches are only recorded (``channel_stats="sample"``), so the
    calibration phase is not planned.

    Where the batches can be counted (a list or tuple) the calibration, the kept sample (the
    first batches up to ``max_gram_samples`` rows, as the recorder keeps them) and its search
    chunk (the first ``max_search_samples`` rows) are
    planned from them; an iterator is planned when convert sees the recorded sample.
    """
    state = get_state(model)
    targets = list(state.targets) if state is not None else []
    sized = isinstance(calibration, (list, tuple))
    batches = list(calibration) if sized else []
    search, kept, kept_rows = sample_tokens(((tokens_of(b), rows_of(b)) for b in batches), config.max_search_samples,
                                 max(config.max_search_samples, config.max_gram_samples))
    total = sum(tokens_of(b) for b in batches)
    if sized:
        plan_quantization(run, model, targets, config, search, calibration_tokens=total if forward else 0,
                          kept_tokens=kept, kept_rows=kept_rows)
    per_token = run.totals.get("calibrate", 0.0) / total if total else 0.0
    return lambda batch: per_token * tokens_of(batch)


def quantize(
    model: nn.Module,
    calibration: Iterable[Any] | None = None,
    *,
    tokenizer: Any = None,
    dataset: Any = None,
    n_samples: int = 64,
    seq_len: int = 512,
    batch_size: int = 8,
    chat_template: bool = False,
    text_field: str = "text",
    **options: Any,
) -> ConvertReport:
    """Quantize ``model`` in place with AWQ and return the convert report.

    ``calibration`` yields model inputs: a tensor (``model(t)``), a tuple (``model(*t)``) or a
    dict (``model(**d)``), e.g. ``[ids[i:i+8] for i in range(0, 64, 8)]``. Instead of batches,
    pass ``tokenizer=`` and optionally ``dataset=`` (a text file or folder, a list of strings, a
    ``datasets.Dataset`` or a hub dataset name; default WikiText-2 validation from the hub):
    ``n_samples`` sequences of ``seq_len`` tokens are cut from it, in batches of
    ``batch_size``, each row put through the tokenizer's chat template if ``chat_template``
    (see :mod:`awq_ao.calibration`). ``options`` are :func:`awq_config` keywords (``bits``,
    ``group_size``, ``zero_point``, ...). The steps are exactly those of the ``quantize_`` flow:
    prepare, the calibration loop, convert; the loop passes ``logits_to_keep=1`` where the
    model's forward takes it (:func:`calibration_kwargs`: the logits are never needed).
    """
    if tokenizer is not None:
        if calibration is not None:
            raise CalibrationError("pass either calibration batches or tokenizer= (with dataset=), not both.")
        from awq_ao.calibration import calibration_batches

        calibration = calibration_batches(
            tokenizer, dataset, n_samples, seq_len, batch_size, chat_template=chat_template, text_field=text_field
        )
        device = next((p.device for p in model.parameters() if p.device.type != "meta"), None)
        if device is not None and device.type != "cpu":
            calibration = [b.to(device) for b in calibration]
    else:
        given = [n for n, v, d in (("dataset", dataset, None), ("n_samples", n_samples, 64), ("seq_len", seq_len, 512),
                                   ("batch_size", batch_size, 8), ("chat_template", chat_template, False),
                                   ("text_field", text_field, "text")) if v != d]
        if given:
            raise CalibrationError(f"{', '.join(given)} need tokenizer= (they describe how text becomes calibration batches).")
    cfg_prepare = awq_config(step="prepare", **options)
    cfg_convert = awq_config(**options)
    if not cfg_convert.needs_calibration and calibration is not None:
        import warnings

        warnings.warn(
            "awq_ao.quantize: scale_search=False and clip=False quantize by round-to-nearest; the "
            "calibration batches are not used (error-feedback rounding alone: clip=True, max_shrink=0.0).",
            stacklevel=2,
        )
    refuse_inference_mode(cfg_convert)  # before the model is prepared
    with run_progress(cfg_convert.progress) as (run, _owned):
        if cfg_convert.needs_calibration:
            if calibration is None:
                raise CalibrationError("calibration batches are required (or pass scale_search=False, clip=False).")
            quantize_(model, cfg_prepare, filter_fn=whole_model)
            record_only = cfg_convert.channel_stats == "sample"
            state = get_state(model)
            recorder = state.recorder if state is not None else None
            if record_only and recorder is not None:
                recorder.record_only = True  # the search takes its statistics from the sample
            try:
                cost = _plan(run, model, calibration, cfg_convert, forward=not record_only)
                n = 0
                extra = calibration_kwargs(model)
                t_calib = time.perf_counter()
                with torch.no_grad():
                    for batch in calibration:
                        try:
                            _call(model, batch, extra)
                        except CallRecorded:
                            pass
                        n += 1
                        run.advance("calibrate", cost(batch), f"batch {n}")
            finally:  # the prepared model must run normally again, whatever the loop raised
                if recorder is not None:
                    recorder.record_only = False
            if n == 0:
                raise CalibrationError("the calibration iterable was empty; pass at least one batch.")
            run.finish("calibrate")
            t_calib = time.perf_counter() - t_calib
        quantize_(model, cfg_convert, filter_fn=whole_model)
    state = get_state(model)
    assert state is not None and state.report is not None
    if cfg_convert.needs_calibration:
        state.report.times["calibration loop (before convert)"] = t_calib
    return state.report
