"""awq_ao inside other libraries.

:mod:`awq_ao.integrations.transformers_quantizer` registers awq_ao as a transformers
quantization method (done on ``import awq_ao``), so ``AutoModelForCausalLM.from_pretrained``
builds INT4 models from awq_ao checkpoints and ``save_pretrained`` writes them.
"""

from awq_ao.integrations.transformers_quantizer import (
    QUANT_METHOD,
    AwqAoHfQuantizer,
    AwqAoQuantizationConfig,
    register_with_transformers,
)

__all__ = ["QUANT_METHOD", "AwqAoHfQuantizer", "AwqAoQuantizationConfig", "register_with_transformers"]
