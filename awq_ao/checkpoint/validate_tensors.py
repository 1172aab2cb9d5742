"""Load-time validation of the stored tensors of one quantized layer, just before its weight is
built: shapes, dtypes, finite positive scales, integer zero points in range.

Split out of :mod:`awq_ao.checkpoint.validate`, which wraps every planned layer's ``read`` with
:func:`check_quantized_tensors` and re-exports it.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from awq_ao.checkpoint.formats import CheckpointError, ExpertsPlan, LayerPlan
from awq_ao.lowering.quant_math import num_groups

__all__ = ["check_quantized_tensors"]


def _first_bad(mask: torch.Tensor) -> str:
    idx = torch.nonzero(mask)[0].tolist()
    return "[" + ", ".join(map(str, idx)) + "]"


def check_quantized_tensors(
    d: Path, p: LayerPlan | ExpertsPlan, data: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Check the stored tensors of one planned layer (shapes, dtypes, finite positive scales,
    integer zero points in range) and return them; :class:`CheckpointError` otherwise."""
    name = p.name if isinstance(p, LayerPlan) else p.key
    lead = () if isinstance(p, LayerPlan) else (p.num_experts,)
    n, k, bits = p.out_features, p.in_features, p.bits
    g = num_groups(k, p.group_size)
    codes_shape = (*lead, n, (k + 1) // 2) if p.nibble_packed else (*lead, n, k)
    qmax = 2**bits - 1
    where = f"{d}: {name}"
    damaged = (
        "the checkpoint is damaged or was edited; re-save it from the original model, or run "
        f"'awq-ao info {d} --verify' to check its shards against the checksums saved with it"
    )
    if tuple(data.shape) != codes_shape or data.dtype != torch.uint8:
        raise CheckpointError(
            f"{where}: codes are {str(data.dtype).removeprefix('torch.')} {list(data.shape)}; a "
            f"{bits}-bit [{n}, {k}] weight needs uint8 {list(codes_shape)}; {damaged}."
        )
    for t, what in ((scale, "scales"), (zero, "zero points")):
        if tuple(t.shape) != (*lead, n, g):
            raise CheckpointError(
                f"{where}: {what} of shape {list(t.shape)} do not fit a [{n}, {k}] weight with "
                f"group_size={p.group_size} (expected {list((*lead, n, g))}, ceil({k} / "
                f"{p.group_size if p.group_size != -1 else k}) = {g} groups); {damaged}."
            )
    if not scale.is_floating_point():
        raise CheckpointError(f"{where}: scales are {scale.dtype}, not floating point; {damaged}.")
    # fast path: one min/max per tensor (NaN propagates into both); details only on failure
    if scale.numel():
        lo, hi = torch.aminmax(scale)
        if not (float(lo) > 0 and float(hi) < math.inf):
            bad = ~torch.isfinite(scale)
            if bool(bad.any()):
                raise CheckpointError(
                    f"{where}: {int(bad.sum())} scale(s) are NaN or infinite (first at {_first_bad(bad)}); {damaged}."
                )
            bad = scale <= 0
            raise CheckpointError(
                f"{where}: {int(bad.sum())} scale(s) are zero or negative (first at "
                f"{_first_bad(bad)}, value {float(scale[bad][0]):g}); scales must be > 0; {damaged}."
            )
    if zero.numel():
        lo, hi = torch.aminmax(zero)
        integral = not zero.is_floating_point() or torch.equal(zero, torch.round(zero))
        if not (float(lo) >= 0 and float(hi) <= qmax and integral):
            z = zero.float()
            bad = ~torch.isfinite(z) | (z < 0) | (z > qmax) | (z != torch.round(z))
            raise CheckpointError(
                f"{where}: {int(bad.sum())} zero point(s) outside the integers 0..{qmax} of "
                f"{bits}-bit codes (first at {_first_bad(bad)}, value {float(z[bad][0]):g}); {damaged}."
            )
    return data, scale, zero
