"""awq_ao: activation-aware INT4 weight quantization (AWQ) as a torchao ``quantize_`` plugin.

Usage::

    from torchao.quantization import quantize_
    from awq_ao import awq_config

    quantize_(model, awq_config(step="prepare", bits=4, group_size=128))
    for batch in calibration_batches:
        model(batch)
    quantize_(model, awq_config(bits=4, group_size=128))
"""

from awq_ao.api import quantize
from awq_ao.config import AWQConfig, awq_config
from awq_ao.observers.attach import prepare
from awq_ao.passes.capture import CaptureError
from awq_ao.passes.convert import CalibrationError, convert
from awq_ao.report import ConvertReport
from awq_ao.state import get_state

__all__ = [
    "AWQConfig",
    "CalibrationError",
    "CaptureError",
    "ConvertReport",
    "awq_config",
    "convert",
    "get_state",
    "prepare",
    "quantize",
]

__version__ = "0.1.0"
