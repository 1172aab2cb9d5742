"""Group-wise integer quantization math shared by the search, the weight tensor and the kernels.

Conventions (used everywhere in awq_ao):

* A weight ``w`` has shape ``[N, K]`` (out_features, in_features). Groups run along K:
  group ``g`` covers columns ``[g * group_size, min((g + 1) * group_size, K))``. When K is not
  a multiple of ``group_size`` the last group is *ragged* (shorter); its statistics use only
  its real columns. ``group_size=-1`` means one group per output channel.
* Codes are unsigned integers in ``[0, 2**bits - 1]`` stored as ``uint8``.
* Dequantization is always ``w_hat = (code - zero) * scale`` with per-group ``scale`` and
  ``zero`` of shape ``[N, G]``. ``zero`` holds an integer value. Symmetric quantization
  (``zero_point=False``) uses the fixed zero ``2**(bits-1)``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8)


def check_quant_args(bits: int, group_size: int) -> None:
    """Raise ``ValueError`` for unsupported ``bits`` / ``group_size`` values."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported; use one of {SUPPORTED_BITS}.")
    if group_size != -1 and group_size <= 0:
        raise ValueError(f"group_size={group_size} must be a positive integer or -1 (per channel).")


def effective_group_size(in_features: int, group_size: int) -> int:
    """The group length actually used for a weight with ``in_features`` columns."""
    return in_features if group_size == -1 else group_size


class GroupGeometry(NamedTuple):
    """How ``in_features`` columns split into quantization groups."""

    size: int  #: columns per group (``in_features`` for ``group_size=-1``)
    count: int  #: number of groups (the last one may be ragged)
    pad: int  #: columns that pad the ragged last group to ``size``


def group_geometry(in_features: int, group_size: int) -> GroupGeometry:
    """The one place the group geometry of a weight with ``in_features`` columns is computed."""
    g = effective_group_size(in_features, group_size)
    count = math.ceil(in_features / g)
    return GroupGeometry(g, count, count * g - in_features)


def num_groups(in_features: int, group_size: int) -> int:
    """Number of groups along K (the last one may be ragged)."""
    return group_geometry(in_features, group_size).count


def _grouped(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, int]:
    """View ``w [N, K]`` as ``[N, G, g]``, edge-padding a ragged last group.

    Edge padding repeats the last real column, so min/max of the last group are unchanged.
    Returns the grouped tensor and the number of padded columns.
    """
    n, k = w.shape
    g, _, pad = group_geometry(k, group_size)
    if pad:
        w = torch.cat([w, w[:, -1:].expand(n, pad)], dim=1)
    return w.reshape(n, -1, g), pad


def quant_params(
    w: torch.Tensor, bits: int, group_size: int, zero_point: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group ``(scale, zero)``, both float32 ``[N, G]``, computed from ``w [N, K]``."""
    check_quant_args(bits, group_size)
    wg, _ = _grouped(w.float(), group_size)
    if zero_point:
        max_int = 2**bits - 1
        # the range always contains 0, so groups of one sign stay representable
        wmax = wg.amax(dim=-1).clamp(min=0)
        wmin = wg.amin(dim=-1).clamp(max=0)
        scale = ((wmax - wmin).clamp(min=1e-5)) / max_int
        zero = torch.round(-wmin / scale).clamp(0, max_int)
    else:
        max_int = 2 ** (bits - 1) - 1
        scale = wg.abs().amax(dim=-1).clamp(min=1e-5) / max(max_int, 1)
        zero = torch.full_like(scale, float(2 ** (bits - 1)))
    return scale, zero


def quantize_codes(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """Integer codes ``uint8 [N, K]`` for ``w`` given per-group ``scale`` / ``zero``."""
    n, k = w.shape
    wg, pad = _grouped(w.float(), group_size)
    q = torch.round(wg / scale.float()[..., None]) + zero.float()[..., None]
    q = q.clamp(0, 2**bits - 1).reshape(n, -1)
    if pad:
        q = q[:, :k]
    return q.to(torch.uint8)


def dequantize_codes(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``(codes - zero) * scale`` as ``dtype [N, K]``; inverse of :func:`quantize_codes`."""
    n, k = codes.shape
    g, _, pad = group_geometry(k, group_size)
    c = codes
    if pad:
        c = torch.cat([c, c.new_zeros(n, pad)], dim=1)
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    cg = c.reshape(n, -1, g).to(compute)
    w = (cg - zero.to(compute)[..., None]) * scale.to(compute)[..., None]
    w = w.reshape(n, -1)
    if pad:
        w = w[:, :k]
    return w.to(dtype)


def quantize(
    w: torch.Tensor, bits: int, group_size: int, zero_point: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``w [N, K]`` and return ``(codes uint8, scale f32 [N,G], zero f32 [N,G])``."""
    scale, zero = quant_params(w, bits, group_size, zero_point)
    return quantize_codes(w, scale, zero, bits, group_size), scale, zero


def fake_quantize_grouped(wg: torch.Tensor, bits: int, zero_point: bool = True) -> torch.Tensor:
    """Quantize then dequantize float32 groups ``wg [..., g]`` (one group per last-dim row).

    Zero-valued padding in a group changes nothing (the asymmetric range always includes 0),
    and padding columns come back as 0.
    """
    if zero_point:
        max_int = 2**bits - 1
        wmax = wg.amax(dim=-1, keepdim=True).clamp(min=0)
        wmin = wg.amin(dim=-1, keepdim=True).clamp(max=0)
        scale = (wmax - wmin).clamp(min=1e-5) / max_int
        zero = torch.round(-wmin / scale).clamp(0, max_int)
        q = (torch.round(wg / scale) + zero).clamp(0, max_int)
        return (q - zero) * scale
    max_int = 2 ** (bits - 1) - 1
    min_int = -(2 ** (bits - 1))
    scale = wg.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5) / max(max_int, 1)
    return torch.round(wg / scale).clamp(min_int, max_int) * scale


def fake_quantize(
    w: torch.Tensor, bits: int, group_size: int, zero_point: bool = True
) -> torch.Tensor:
    """Quantize then dequantize ``w`` (same shape and dtype). Used by the search."""
    n, k = w.shape
    wg, pad = _grouped(w.float(), group_size)
    out = fake_quantize_grouped(wg, bits, zero_point).reshape(n, -1)
    if pad:
        out = out[:, :k]
    return out.to(w.dtype)
