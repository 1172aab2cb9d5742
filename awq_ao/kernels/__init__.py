"""Triton W4A16 kernels (4-bit weights, fp16/bf16 activations, fp32 accumulation)."""

from awq_ao.kernels.w4a16 import DECODE_MAX_M, GEMV_MAX_M, is_available, w4a16_linear

__all__ = ["DECODE_MAX_M", "GEMV_MAX_M", "is_available", "w4a16_linear"]
