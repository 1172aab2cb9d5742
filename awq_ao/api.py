"""The one-call helper: model + calibration batches -> quantized model (same flow as quantize_)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torchao.quantization import quantize_

from awq_ao.config import awq_config
from awq_ao.observers.attach import prepare
from awq_ao.passes.convert import CalibrationError, convert
from awq_ao.report import ConvertReport
from awq_ao.state import get_state


def _call(model: nn.Module, batch: Any) -> None:
    if isinstance(batch, Mapping):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


def quantize(
    model: nn.Module,
    calibration: Iterable[Any] | None,
    **options: Any,
) -> ConvertReport:
    """Quantize ``model`` in place with AWQ and return the convert report.

    ``calibration`` yields model inputs: a tensor (``model(t)``), a tuple (``model(*t)``) or a
    dict (``model(**d)``), e.g. ``[ids[i:i+8] for i in range(0, 64, 8)]``. ``options`` are
    :func:`awq_config` keywords (``bits``, ``group_size``, ``zero_point``, ...). The steps are
    exactly those of the ``quantize_`` flow: prepare, the calibration loop, convert.
    """
    cfg_prepare = awq_config(step="prepare", **options)
    cfg_convert = awq_config(**options)
    if cfg_convert.needs_calibration:
        if calibration is None:
            raise CalibrationError("calibration batches are required (or pass scale_search=False, clip=False).")
        quantize_(model, cfg_prepare)
        if get_state(model) is None:  # the model has no nn.Linear for quantize_ to visit
            prepare(model, cfg_prepare, token=cfg_prepare)
        n = 0
        with torch.no_grad():
            for batch in calibration:
                _call(model, batch)
                n += 1
        if n == 0:
            raise CalibrationError("the calibration iterable was empty; pass at least one batch.")
    quantize_(model, cfg_convert)
    state = get_state(model)
    if state is None or state.phase != "converted":
        report = convert(model, cfg_convert, token=cfg_convert)
    else:
        report = state.report
    return report
