"""Lowering: packed low-bit weight tensors, the custom ops they call, and module swapping.

Public API::

    Int4WeightTensor.from_float(w, bits=4, group_size=128, zero_point=True)
    Int4WeightTensor.from_codes(codes, scale, zero, bits, group_size, dtype)
    quantize_linear_module(module, bits, group_size, zero_point) -> nn.Module
    model_size_bytes(model) -> int
    pack(codes, bits, layout) / unpack(packed, bits, layout, n, k) / choose_layout(...)
    torch.ops.awq_ao.w4a16_linear / torch.ops.awq_ao.dequantize
    torch.ops.awq_ao.w4a16_grouped_linear (3-D experts weights)
    Int8RowWeightTensor.from_float(w) / torch.ops.awq_ao.w8_linear (the 8-bit output head)
"""

from awq_ao.lowering import grouped_ops as _grouped_ops  # noqa: F401  (registers the grouped op)
from awq_ao.lowering import int4_dispatch as _int4_dispatch  # noqa: F401  (F.linear, .to, copy_, W[e])
from awq_ao.lowering.int4_tensor import Int4WeightTensor
from awq_ao.lowering.int8_tensor import Int8RowWeightTensor
from awq_ao.lowering.ops import TINYGEMM_MAX_M, dequantize_packed, dequantize_weight, w4a16_linear
from awq_ao.lowering.packing import (
    LAYOUT_BYTE,
    LAYOUT_CPU_TINYGEMM,
    LAYOUT_NIBBLE,
    LAYOUTS,
    choose_layout,
    cpu_tinygemm_variant,
    pack,
    tinygemm_geometry,
    tinygemm_supported,
    unpack,
)
from awq_ao.lowering.swap import is_quantizable_linear, model_size_bytes, quantize_linear_module

__all__ = [
    "Int4WeightTensor",
    "Int8RowWeightTensor",
    "quantize_linear_module",
    "is_quantizable_linear",
    "model_size_bytes",
    "pack",
    "unpack",
    "choose_layout",
    "cpu_tinygemm_variant",
    "tinygemm_geometry",
    "tinygemm_supported",
    "w4a16_linear",
    "dequantize_weight",
    "dequantize_packed",
    "TINYGEMM_MAX_M",
    "LAYOUTS",
    "LAYOUT_NIBBLE",
    "LAYOUT_BYTE",
    "LAYOUT_CPU_TINYGEMM",
]
