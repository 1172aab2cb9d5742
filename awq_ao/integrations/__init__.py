"""awq_ao inside other libraries.

:mod:`awq_ao.integrations.transformers_quantizer` registers awq_ao as a transformers
quantization method (arranged on ``import awq_ao`` by :mod:`awq_ao.integrations.import_hook`),
so ``AutoModelForCausalLM.from_pretrained`` builds INT4 models from awq_ao checkpoints and
``save_pretrained`` writes them.
"""

from __future__ import annotations

from typing import Any

__all__ = ["QUANT_METHOD", "AwqAoHfQuantizer", "AwqAoQuantizationConfig", "register_with_transformers"]


def __getattr__(name: str) -> Any:
    if name in __all__:  # imported on first use: transformers is heavy
        from awq_ao.integrations import transformers_quantizer

        return getattr(transformers_quantizer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
