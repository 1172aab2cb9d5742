"""awq_ao: activation-aware INT4 weight quantization (AWQ) as a torchao ``quantize_`` plugin.

Usage::

    from torchao.quantization import quantize_
    from awq_ao import awq_config

    quantize_(model, awq_config(step="prepare", bits=4, group_size=128))
    for batch in calibration_batches:
        model(batch)
    quantize_(model, awq_config(bits=4, group_size=128))
"""

import logging as _logging

# torchao logs failed loads of optional CUDA extensions at import; they are irrelevant here
_logging.getLogger("torchao").setLevel(_logging.ERROR)
_logging.getLogger("torch.utils._pytree").setLevel(_logging.ERROR)

from awq_ao.api import quantize  # noqa: E402
from awq_ao.checkpoint import load_quantized, save_quantized  # noqa: E402
from awq_ao.config import AWQConfig, awq_config  # noqa: E402
from awq_ao.integrations.transformers_quantizer import register_with_transformers as _register  # noqa: E402
from awq_ao.observers.attach import prepare  # noqa: E402
from awq_ao.passes.capture import CaptureError  # noqa: E402
from awq_ao.passes.convert import CalibrationError, convert  # noqa: E402
from awq_ao.report import ConvertReport  # noqa: E402
from awq_ao.state import get_state  # noqa: E402

__all__ = [
    "AWQConfig",
    "CalibrationError",
    "CaptureError",
    "ConvertReport",
    "awq_config",
    "convert",
    "get_state",
    "load_quantized",
    "prepare",
    "quantize",
    "save_quantized",
]

__version__ = "0.1.0"

# ``AutoModelForCausalLM.from_pretrained`` builds awq_ao checkpoints once awq_ao is imported
_register()
