"""awq_ao: activation-aware INT4 weight quantization (AWQ) as a torchao ``quantize_`` plugin.

Usage::

    from torchao.quantization import quantize_
    from awq_ao import awq_config, whole_model

    quantize_(model, awq_config(step="prepare", bits=4, group_size=128), filter_fn=whole_model)
    for batch in calibration_batches:
        model(batch)
    quantize_(model, awq_config(bits=4, group_size=128), filter_fn=whole_model)

``import awq_ao`` is cheap: the names below are imported on first use, and awq_ao registers
itself with transformers (``quant_method: "awq_ao"`` for ``from_pretrained``) as soon as
transformers loads its quantizer registry.
"""

from __future__ import annotations

import importlib
import logging as _logging
from typing import Any

# torchao logs failed loads of optional CUDA extensions at import; they are irrelevant here
_logging.getLogger("torchao").setLevel(_logging.ERROR)
_logging.getLogger("torch.utils._pytree").setLevel(_logging.ERROR)

__version__ = "0.1.0"

#: public name -> the module that defines it (imported on first access)
_EXPORTS = {
    "AWQConfig": "awq_ao.config",
    "awq_config": "awq_ao.config",
    "whole_model": "awq_ao.config",
    "ClipOptions": "awq_ao.options",
    "Execution": "awq_ao.options",
    "RoundingOptions": "awq_ao.options",
    "SearchOptions": "awq_ao.options",
    "Selection": "awq_ao.options",
    "WeightFormat": "awq_ao.options",
    "CalibrationError": "awq_ao.passes.convert",
    "convert": "awq_ao.passes.convert",
    "CaptureError": "awq_ao.passes.capture",
    "ConvertReport": "awq_ao.report",
    "get_state": "awq_ao.state",
    "load_quantized": "awq_ao.checkpoint",
    "save_quantized": "awq_ao.checkpoint",
    "prepare": "awq_ao.observers.attach",
    "quantize": "awq_ao.api",
    "quantize_head": "awq_ao.lowering.head",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'awq_ao' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


# ``AutoModelForCausalLM.from_pretrained`` builds awq_ao checkpoints once awq_ao is imported
from awq_ao.integrations.import_hook import install as _install_transformers_hook  # noqa: E402

_install_transformers_hook()
