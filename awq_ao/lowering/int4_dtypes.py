"""The dtypes of an :class:`~awq_ao.lowering.int4_tensor.Int4WeightTensor`: the float dtypes
its logical dtype may be, and the 16-bit dtype its scales are stored (and rounded) in.

Split out of :mod:`awq_ao.lowering.int4_tensor`, which re-exports :func:`scale_storage_dtype`
and :func:`round_scale`.
"""

from __future__ import annotations

import torch

from awq_ao.lowering.packing import LAYOUT_CPU_TINYGEMM

__all__ = ["scale_storage_dtype", "round_scale"]


_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def scale_storage_dtype(
    dtype: torch.dtype, layout: str, given: torch.dtype | None = None
) -> torch.dtype:
    """The dtype scales are stored (and rounded) in for a weight of ``dtype`` in ``layout``.

    bfloat16 for the ``cpu_tinygemm`` layout (its fast kernel reads bfloat16). Elsewhere the
    16-bit dtype the scales were ``given`` in (a checkpoint's float16 scales stay exact), else
    the weight's own dtype if it is 16-bit, else bfloat16. Codes are always rounded against
    the stored scale.
    """
    if layout == LAYOUT_CPU_TINYGEMM:
        return torch.bfloat16
    for d in (given, dtype):
        if d in (torch.float16, torch.bfloat16):
            return d
    return torch.bfloat16


def round_scale(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``scale`` rounded to ``dtype`` (returned as float32), a nonzero scale never to zero."""
    s = scale.float()
    tiny = torch.finfo(dtype).tiny if dtype != torch.float16 else 2.0**-24
    s = torch.where(s > 0, s.clamp(min=tiny), s).to(dtype)
    return s.float()
