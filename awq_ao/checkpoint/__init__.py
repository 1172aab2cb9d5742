"""Checkpoints for awq_ao models: save, load, and AutoAWQ / compressed-tensors interop.

Public API::

    save_quantized(model, out_dir, tokenizer=None, format="awq_ao", overwrite=False)
    load_quantized(path, device="cpu", dtype=None, verify=False) -> *ForCausalLM   # checks: validate.py
    checkpoint_summary(path) -> dict      # what a checkpoint holds, without loading it
    detect_format(path) -> (format, quantization_config)

Formats: ``"awq_ao"`` (native; everything awq_ao produces), ``"autoawq"`` (AutoAWQ GEMM,
read and written) and ``"compressed-tensors"`` (``pack-quantized``, read and written).
"""

from awq_ao.checkpoint.formats import (
    FORMAT_AUTOAWQ,
    FORMAT_AWQ_AO,
    FORMAT_COMPRESSED_TENSORS,
    FORMAT_VERSION,
    FORMATS,
    CheckpointError,
    CheckpointWriteError,
    detect_format,
)
from awq_ao.checkpoint.load import build_empty_model, checkpoint_summary, load_quantized
from awq_ao.checkpoint.save import save_quantized

__all__ = [
    "FORMATS",
    "FORMAT_AWQ_AO",
    "FORMAT_AUTOAWQ",
    "FORMAT_COMPRESSED_TENSORS",
    "FORMAT_VERSION",
    "CheckpointError",
    "CheckpointWriteError",
    "build_empty_model",
    "checkpoint_summary",
    "detect_format",
    "load_quantized",
    "save_quantized",
]
