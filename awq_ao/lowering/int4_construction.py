"""How an :class:`~awq_ao.lowering.int4_tensor.Int4WeightTensor` is built: from a float weight
(round to nearest, or against given per-group parameters), from integer codes, or stacked from
per-expert 2-D slabs.

The classmethods live on :class:`_Int4Construction`, a base class of ``Int4WeightTensor``, so
they are called as ``Int4WeightTensor.from_float(...)`` etc. and ``cls`` is always the tensor
class. Split out of :mod:`awq_ao.lowering.int4_tensor`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from awq_ao.lowering import packing
from awq_ao.lowering.int4_dtypes import _FLOAT_DTYPES, round_scale, scale_storage_dtype
from awq_ao.lowering.packing import (
    LAYOUT_CPU_TINYGEMM,
    choose_layout,
    cpu_tinygemm_variant,
    tinygemm_geometry,
    tinygemm_scales_and_zeros,
    tinygemm_supported,
)
from awq_ao.lowering.quant_math import (
    check_quant_args,
    num_groups,
    quant_params,
    quantize_codes,
)

if TYPE_CHECKING:
    from awq_ao.lowering.int4_tensor import Int4WeightTensor


class _Int4Construction:
    """The constructors of :class:`~awq_ao.lowering.int4_tensor.Int4WeightTensor` (a base class
    of it; not used on its own)."""

    @classmethod
    def from_float(
        cls,
        w: torch.Tensor,
        bits: int = 4,
        group_size: int = 128,
        zero_point: bool = True,
        layout: str | None = None,
        params: tuple[torch.Tensor, torch.Tensor] | None = None,
        transposed: bool = False,
    ) -> Int4WeightTensor:
        """Round-to-nearest quantize a float ``[N, K]`` weight (see ``quant_math.quantize``).

        The scale is rounded to its storage dtype (:func:`scale_storage_dtype`) *before* the
        codes are computed, so the stored scale is the one the codes were rounded against.
        ``layout=None`` picks one for ``w.device``. ``params``: per-group ``(scale, zero)``
        ``[N, G]`` to round against instead of the weight's min/max (e.g. chosen by
        error-feedback rounding).

        A 3-D experts weight ``[E, N, K]`` (``[E, K, N]`` with ``transposed=True``) is
        quantized one expert slab at a time, groups along K (the input features), exactly as
        ``E`` 2-D weights would be, and stacked (:meth:`from_slabs`).
        """
        if isinstance(w, cls):
            raise TypeError("weight is already an Int4WeightTensor.")
        if w.dim() == 3:
            if params is not None:
                raise ValueError("params (per-group scale, zero) are for 2-D weights; quantize 3-D experts per slab.")
            w = w.detach()
            slabs = [(w[e].t() if transposed else w[e]).contiguous() for e in range(w.shape[0])]
            if layout is None and slabs:
                layout = choose_layout(w.device, bits, *slabs[0].shape, group_size)
            q = [cls.from_float(s, bits, group_size, zero_point, layout=layout) for s in slabs]
            return cls.from_slabs(q, transposed)
        if w.dim() != 2:
            raise ValueError(f"expected a 2-D [N, K] (or 3-D experts) weight, got shape {tuple(w.shape)}.")
        if transposed:
            raise ValueError("transposed=True is for 3-D [E, in, out] expert weights only.")
        if w.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"expected a floating point weight, got {w.dtype}.")
        check_quant_args(bits, group_size)
        w = w.detach()
        n, k = w.shape
        groups = num_groups(k, group_size)
        if params is not None and (params[0].shape != (n, groups) or params[1].shape != params[0].shape):
            raise ValueError(
                f"params must be (scale, zero) of shape {(n, groups)}, got "
                f"{tuple(params[0].shape)} and {tuple(params[1].shape)}."
            )
        if layout is None:
            layout = choose_layout(w.device, bits, n, k, group_size)
        sdt = scale_storage_dtype(w.dtype, layout)
        # row chunks: every quantity is per row, and the float32 temporaries stay small
        codes = torch.empty(w.shape, dtype=torch.uint8, device=w.device)
        scales, zeros = [], []
        for r0 in range(0, n, 1024):
            wc = w[r0 : r0 + 1024]
            if params is None:
                scale, zero = quant_params(wc, bits, group_size, zero_point)
            else:
                scale = params[0][r0 : r0 + 1024].float().to(w.device)
                zero = params[1][r0 : r0 + 1024].float().to(w.device)
            scale = round_scale(scale, sdt)
            codes[r0 : r0 + 1024] = quantize_codes(wc, scale, zero, bits, group_size)
            scales.append(scale)
            zeros.append(zero)
        scale, zero = torch.cat(scales), torch.cat(zeros)
        return cls.from_codes(codes, scale, zero, bits, group_size, w.dtype, layout=layout)

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        bits: int,
        group_size: int,
        dtype: torch.dtype | None = None,
        layout: str | None = None,
    ) -> Int4WeightTensor:
        """Build from integer codes ``uint8 [N, K]`` and per-group ``scale`` / ``zero`` ``[N, G]``.

        ``dtype`` (default ``scale.dtype``) is the logical dtype; the scale is stored in
        :func:`scale_storage_dtype` and the zero point as uint8. ``layout=None`` picks the
        layout for ``codes.device`` (:func:`choose_layout`).
        """
        check_quant_args(bits, group_size)
        if codes.dim() != 2:
            raise ValueError(f"codes must be 2-D [N, K], got shape {tuple(codes.shape)}.")
        if codes.dtype != torch.uint8:
            raise TypeError(f"codes must be torch.uint8, got {codes.dtype}.")
        n, k = codes.shape
        g = num_groups(k, group_size)
        if scale.shape != (n, g) or zero.shape != (n, g):
            raise ValueError(
                f"scale and zero must be [N, G] = [{n}, {g}] for codes [{n}, {k}] and "
                f"group_size={group_size}; got {tuple(scale.shape)} and {tuple(zero.shape)}."
            )
        dtype = scale.dtype if dtype is None else dtype
        if dtype not in _FLOAT_DTYPES:
            raise TypeError(f"dtype must be a floating point dtype, got {dtype}.")
        device = codes.device
        if device.type != "meta" and zero.numel():
            zf = zero.float()
            if not torch.equal(zf, zf.round()) or zf.min() < 0 or zf.max() > 2**bits - 1:
                raise ValueError(f"zero must hold integers in [0, {2**bits - 1}].")
        layout = choose_layout(device, bits, n, k, group_size) if layout is None else layout
        sdt = scale_storage_dtype(dtype, layout, scale.dtype)
        scale_t = round_scale(scale.to(device), sdt).to(sdt).contiguous()
        zero_t = zero.to(device).float().round().to(torch.uint8).contiguous()
        if layout == LAYOUT_CPU_TINYGEMM:
            if device.type != "cpu":
                raise ValueError(f"the cpu_tinygemm layout only exists on CPU, got {device}.")
            if not tinygemm_supported(bits, n, k, group_size):
                raise ValueError(
                    f"cpu_tinygemm layout cannot hold a [{n}, {k}] weight with bits={bits}, "
                    f"group_size={group_size} (needs bits <= 4, N % 16 == 0 and a group size "
                    f"that is a multiple of 32, or one group per row)."
                )
            _, k_pad = tinygemm_geometry(k, group_size)
            if k_pad > k:  # pad with the zero point: padded weights dequantize to 0
                fill = zero_t[:, -1:].expand(n, k_pad - k)
                codes = torch.cat([codes, fill], dim=1)
            variant = cpu_tinygemm_variant()
            sz = tinygemm_scales_and_zeros(scale_t.float(), zero_t, k, group_size).to(sdt)
            packed = packing.pack(codes, bits, layout, variant)
            return cls(packed, bits, group_size, layout, variant, torch.Size([n, k]), dtype,
                       scales_and_zeros=sz)
        packed = packing.pack(codes, bits, layout, None)
        return cls(packed, bits, group_size, layout, "", torch.Size([n, k]), dtype, scale_t, zero_t)

    @classmethod
    def from_slabs(cls, slabs: list[Int4WeightTensor], transposed: bool = False) -> Int4WeightTensor:
        """A 3-D experts weight from quantized 2-D ``[N, K]`` slabs, one per expert (same
        shape, bits, group size, layout and dtype); ``transposed``: the logical shape is
        ``[E, K, N]``."""
        if not slabs:
            raise ValueError("need at least one expert slab.")
        first = slabs[0]
        key = (first.shape, first.bits, first.group_size, first.pack_layout, first.layout_variant, first.dtype)
        if first.dim() != 2 or any(
            (s.shape, s.bits, s.group_size, s.pack_layout, s.layout_variant, s.dtype) != key for s in slabs[1:]
        ):
            raise ValueError("expert slabs must be 2-D and agree in shape, bits, group size, layout and dtype.")
        n, k = first.shape
        shape = torch.Size([len(slabs), k, n] if transposed else [len(slabs), n, k])

        def stack(name: str) -> torch.Tensor | None:
            return None if getattr(first, name) is None else torch.stack([getattr(s, name) for s in slabs])

        return cls(
            torch.stack([s.packed for s in slabs]), first.bits, first.group_size, first.pack_layout,
            first.layout_variant, shape, first.dtype, stack("qscale"), stack("qzero"),
            stack("scales_and_zeros"), transposed=transposed,
        )
