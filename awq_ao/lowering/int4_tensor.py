"""``Int4WeightTensor``: a packed low-bit weight that behaves like an ``[N, K]`` float weight.

A wrapper tensor subclass in torchao's ``TorchAOBaseTensor`` style. It stands in for an
``nn.Linear`` weight: ``F.linear(x, w, b)`` runs the ``awq_ao::w4a16_linear`` custom op on the
packed data, so eager, ``torch.compile(fullgraph=True)`` and ``torch.export`` all work.

Inner tensors: ``packed`` (uint8, see :mod:`awq_ao.lowering.packing`) and one copy of the
quantization metadata: ``qscale`` (16-bit) and ``qzero`` (uint8), ``[N, G]`` with
``w_hat = (code - zero) * scale``, or, for the ``cpu_tinygemm`` layout, only tinygemm's
bfloat16 ``scales_and_zeros`` (``[G_tg, N, 2]`` scale/offset, what its kernel reads). Either
way a 4-bit weight holds ``4 + 32 / group_size`` bits per element or less (plus padding of
a ragged last group for tinygemm).

The packing layout tag is ``pack_layout`` (``Tensor.layout`` is torch's own attribute).
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torchao.utils import TorchAOBaseTensor

from awq_ao.lowering import ops as _ops  # noqa: F401  (registers awq_ao:: custom ops)
from awq_ao.lowering import packing
from awq_ao.lowering.packing import (
    LAYOUT_CPU_TINYGEMM,
    choose_layout,
    cpu_tinygemm_variant,
    tinygemm_geometry,
    tinygemm_qparams,
    tinygemm_scales_and_zeros,
    tinygemm_supported,
)
from awq_ao.lowering.quant_math import (
    check_quant_args,
    num_groups,
    quant_params,
    quantize_codes,
)

__all__ = ["Int4WeightTensor", "scale_storage_dtype", "round_scale"]

aten = torch.ops.aten

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


class Int4WeightTensor(TorchAOBaseTensor):
    """Group-wise quantized ``[N, K]`` weight (2..8 bits) with a packed storage layout.

    Logical shape ``[N, K]`` and dtype = the original float dtype (``dtype``).

    Inner tensors (one copy of the quantization metadata, whatever the layout):
        packed: packed codes, uint8.
        qscale, qzero: ``[N, G]`` per-group scale (16-bit, see :func:`scale_storage_dtype`) and
            integer zero point (uint8); ``w_hat = (code - zero) * scale``. ``None`` for the
            ``cpu_tinygemm`` layout, which holds them as ``scales_and_zeros``.
        scales_and_zeros: tinygemm ``[G_tg, N, 2]`` bfloat16 scale/offset (cpu_tinygemm only).

    Attributes: ``bits`` (2..8), ``group_size`` (-1: one group per row), ``pack_layout``
    (``"nibble"``, ``"byte"`` or ``"cpu_tinygemm"``), ``layout_variant`` (cpu_tinygemm
    permutation, e.g. ``"b64i"``; ``""`` otherwise). :attr:`scale` and :attr:`zero` give the
    ``[N, G]`` parameters for every layout.
    """

    tensor_data_names = ["packed"]
    tensor_attribute_names = ["bits", "group_size", "pack_layout", "layout_variant", "shape", "dtype"]
    optional_tensor_data_names = ["qscale", "qzero", "scales_and_zeros"]

    def __new__(
        cls,
        packed: torch.Tensor,
        bits: int,
        group_size: int,
        pack_layout: str,
        layout_variant: str,
        shape: torch.Size,
        dtype: torch.dtype,
        qscale: torch.Tensor | None = None,
        qzero: torch.Tensor | None = None,
        scales_and_zeros: torch.Tensor | None = None,
    ):
        return torch.Tensor._make_wrapper_subclass(  # type: ignore[attr-defined]
            cls, shape, dtype=dtype, device=packed.device, requires_grad=False
        )

    def __init__(
        self,
        packed: torch.Tensor,
        bits: int,
        group_size: int,
        pack_layout: str,
        layout_variant: str,
        shape: torch.Size,
        dtype: torch.dtype,
        qscale: torch.Tensor | None = None,
        qzero: torch.Tensor | None = None,
        scales_and_zeros: torch.Tensor | None = None,
    ):
        super().__init__()
        self.packed = packed
        self.qscale = qscale
        self.qzero = qzero
        self.bits = bits
        self.group_size = group_size
        self.pack_layout = pack_layout
        self.layout_variant = layout_variant
        self.scales_and_zeros = scales_and_zeros

    # ----------------------------------------------------------------------------------------
    # construction
    # ----------------------------------------------------------------------------------------

    @classmethod
    def from_float(
        cls,
        w: torch.Tensor,
        bits: int = 4,
        group_size: int = 128,
        zero_point: bool = True,
        layout: str | None = None,
        params: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> Int4WeightTensor:
        """Round-to-nearest quantize a float ``[N, K]`` weight (see ``quant_math.quantize``).

        The scale is rounded to its storage dtype (:func:`scale_storage_dtype`) *before* the
        codes are computed, so the stored scale is the one the codes were rounded against.
        ``layout=None`` picks one for ``w.device``. ``params``: per-group ``(scale, zero)``
        ``[N, G]`` to round against instead of the weight's min/max (e.g. chosen by
        error-feedback rounding).
        """
        if isinstance(w, Int4WeightTensor):
            raise TypeError("weight is already an Int4WeightTensor.")
        if w.dim() != 2:
            raise ValueError(f"expected a 2-D [N, K] weight, got shape {tuple(w.shape)}.")
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

    # ----------------------------------------------------------------------------------------
    # accessors
    # ----------------------------------------------------------------------------------------

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def scale(self) -> torch.Tensor:
        """Per-group scales ``[N, G]`` (stored dtype; derived from ``scales_and_zeros`` for
        the cpu_tinygemm layout)."""
        if self.qscale is not None:
            return self.qscale
        s, _ = tinygemm_qparams(self.scales_and_zeros, self.shape[1], self.group_size)
        return s.to(self.scales_and_zeros.dtype)

    @property
    def zero(self) -> torch.Tensor:
        """Per-group integer zero points ``uint8 [N, G]``."""
        if self.qzero is not None:
            return self.qzero
        return tinygemm_qparams(self.scales_and_zeros, self.shape[1], self.group_size)[1]

    def bits_per_weight(self) -> float:
        """Bits held per logical weight element, everything included."""
        return 8.0 * self.nbytes_packed() / max(1, self.shape[0] * self.shape[1])

    @property
    def in_features(self) -> int:
        return self.shape[1]

    def codes(self) -> torch.Tensor:
        """The integer codes, ``uint8 [N, K]``."""
        return packing.unpack(
            self.packed,
            self.bits,
            self.pack_layout,
            self.shape[0],
            self.shape[1],
            self.layout_variant or None,
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:  # type: ignore[override]
        """The dequantized weight ``(code - zero) * scale`` as a plain ``[N, K]`` tensor."""
        return torch.ops.awq_ao.dequantize(
            self.packed,
            self.qscale,
            self.qzero,
            self.bits,
            self.group_size,
            self.shape[1],
            self.pack_layout,
            self.layout_variant,
            self.dtype if dtype is None else dtype,
            self.scales_and_zeros,
        )

    def nbytes_packed(self) -> int:
        """Bytes held by the inner tensors (packed codes and one copy of scale/zero)."""
        total = 0
        for name in self.__tensor_flatten__()[0]:
            t = getattr(self, name)
            total += t.numel() * t.element_size()
        return total

    def _stable_hash_for_caching(self) -> str:
        """Metadata hash for the AOT autograd cache (layout, attributes, inner tensor meta)."""
        parts = [type(self).__qualname__, str(self.requires_grad)]
        parts += [repr(getattr(self, a)) for a in self.tensor_attribute_names]
        for name in self.__tensor_flatten__()[0]:
            t = getattr(self, name)
            parts.append(f"{name}:{t.dtype}:{tuple(t.shape)}:{t.stride()}:{t.device}")
        return hashlib.blake2b("|".join(parts).encode(), digest_size=16).hexdigest()

    def __repr__(self) -> str:
        layout = self.pack_layout + (f"/{self.layout_variant}" if self.layout_variant else "")
        return (
            f"{type(self).__name__}(shape={list(self.shape)}, dtype={self.dtype}, "
            f"device={self.device}, bits={self.bits}, group_size={self.group_size}, "
            f"layout={layout}, nbytes_packed={self.nbytes_packed()})"
        )

    # ----------------------------------------------------------------------------------------
    # compute
    # ----------------------------------------------------------------------------------------

    def _linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if isinstance(x, Int4WeightTensor):
            raise TypeError("F.linear: the input must be a plain tensor, got an Int4WeightTensor.")
        if not x.is_floating_point():
            raise TypeError(
                f"F.linear with an Int4WeightTensor weight needs a float input, got {x.dtype}."
            )
        if x.shape[-1] != self.shape[1]:
            raise ValueError(
                f"F.linear: input has {x.shape[-1]} features (shape {tuple(x.shape)}) but the "
                f"Int4WeightTensor weight is {list(self.shape)}."
            )
        return torch.ops.awq_ao.w4a16_linear(
            x,
            self.packed,
            self.qscale,
            self.qzero,
            bias,
            self.bits,
            self.group_size,
            self.shape[1],
            self.pack_layout,
            self.layout_variant,
            self.scales_and_zeros,
        )

    # ----------------------------------------------------------------------------------------
    # conversion
    # ----------------------------------------------------------------------------------------

    def _convert(
        self,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        layout: str | None = None,
        non_blocking: bool = False,
    ) -> Int4WeightTensor:
        """Copy to ``device`` / ``dtype``, repacking when the target layout differs.

        ``layout=None`` keeps the layout on the same device and picks the device's preferred
        one (:func:`choose_layout`) when the device changes.
        """
        device = self.device if device is None else torch.device(device)
        dtype = self.dtype if dtype is None else dtype
        if dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"Int4WeightTensor can only be cast to a floating dtype {_FLOAT_DTYPES}, got "
                f"{dtype}; its codes stay packed."
            )
        n, k = self.shape
        if layout is None:
            same_device = device == self.device
            layout = (
                self.pack_layout
                if same_device
                else choose_layout(device, self.bits, n, k, self.group_size)
            )
        if device.type != "cpu" and layout == LAYOUT_CPU_TINYGEMM:
            raise ValueError("the cpu_tinygemm layout only exists on CPU.")
        same_layout = layout == self.pack_layout and (
            layout != LAYOUT_CPU_TINYGEMM or self.layout_variant == cpu_tinygemm_variant()
        )
        if same_layout:

            def mv(t: torch.Tensor | None, dt: torch.dtype | None = None) -> torch.Tensor | None:
                return None if t is None else t.to(device, dtype=dt, non_blocking=non_blocking)

            qs = None
            if self.qscale is not None:
                sdt = scale_storage_dtype(dtype, layout, self.qscale.dtype)
                qs = round_scale(self.qscale, sdt).to(device, dtype=sdt, non_blocking=non_blocking)
            return Int4WeightTensor(
                mv(self.packed),
                self.bits,
                self.group_size,
                self.pack_layout,
                self.layout_variant,
                self.shape,
                dtype,
                qs,
                mv(self.qzero),
                mv(self.scales_and_zeros),
            )
        codes = self.codes().to(device)
        return Int4WeightTensor.from_codes(
            codes,
            self.scale.to(device),
            self.zero.to(device),
            self.bits,
            self.group_size,
            dtype,
            layout=layout,
        )


def round_scale(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``scale`` rounded to ``dtype`` (returned as float32), a nonzero scale never to zero."""
    s = scale.float()
    tiny = torch.finfo(dtype).tiny if dtype != torch.float16 else 2.0**-24
    s = torch.where(s > 0, s.clamp(min=tiny), s).to(dtype)
    return s.float()


implements = Int4WeightTensor.implements
implements_torch_function = Int4WeightTensor.implements_torch_function


def _linear_args(args, kwargs):
    x = args[0] if len(args) > 0 else kwargs["input"]
    w = args[1] if len(args) > 1 else kwargs["weight"]
    b = args[2] if len(args) > 2 else kwargs.get("bias")
    return x, w, b


@implements_torch_function(F.linear)
def _(func, types, args, kwargs):
    x, w, b = _linear_args(args, kwargs)
    if not isinstance(w, Int4WeightTensor):
        raise TypeError("F.linear: an Int4WeightTensor can only be used as the weight.")
    return w._linear(x, b)


@implements(aten.linear.default)
def _(func, types, args, kwargs):
    x, w, b = _linear_args(args, kwargs)
    if not isinstance(w, Int4WeightTensor):
        raise TypeError("aten.linear: an Int4WeightTensor can only be used as the weight.")
    return w._linear(x, b)


def _to_kwargs(self: Int4WeightTensor, args, kwargs):
    kwargs = dict(kwargs)
    for key in ("layout", "pin_memory", "memory_format", "copy"):
        kwargs.pop(key, None)
    args = tuple(a for a in args if not isinstance(a, torch.layout))
    return self._get_to_kwargs(*args, **kwargs)


@implements(aten._to_copy.default)
def _(func, types, args, kwargs):
    self = args[0]
    kw = _to_kwargs(self, args[1:], kwargs)
    return self._convert(kw["device"], kw["dtype"], non_blocking=kw["non_blocking"])


@implements(aten.to.dtype_layout)
def _(func, types, args, kwargs):
    self = args[0]
    kw = _to_kwargs(self, args[1:], kwargs)
    if kw["device"] == self.device and kw["dtype"] == self.dtype:
        return self
    return self._convert(kw["device"], kw["dtype"], non_blocking=kw["non_blocking"])


@implements(aten.copy_.default)
def _(func, types, args, kwargs):
    dst, src = args[0], args[1]
    if not isinstance(src, Int4WeightTensor):
        raise TypeError(
            "cannot copy a plain tensor into an Int4WeightTensor; quantize it first with "
            "Int4WeightTensor.from_float (or load the state dict with assign=True)."
        )
    if (src.shape, src.bits, src.group_size) != (dst.shape, dst.bits, dst.group_size):
        raise ValueError(
            f"Int4WeightTensor copy_: source (shape={list(src.shape)}, bits={src.bits}, "
            f"group_size={src.group_size}) does not match destination (shape="
            f"{list(dst.shape)}, bits={dst.bits}, group_size={dst.group_size})."
        )
    if (src.pack_layout, src.layout_variant, src.device, src.dtype) != (
        dst.pack_layout,
        dst.layout_variant,
        dst.device,
        dst.dtype,
    ):
        src = src._convert(dst.device, dst.dtype, layout=dst.pack_layout)
    for name in ("packed", "qscale", "qzero", "scales_and_zeros"):
        d, s = getattr(dst, name), getattr(src, name)
        if (d is None) != (s is None) or (d is not None and d.shape != s.shape):
            raise ValueError(f"Int4WeightTensor copy_: {name} differs in shape.")
        if d is not None:
            d.copy_(s)
    return dst


torch.serialization.add_safe_globals([Int4WeightTensor])
