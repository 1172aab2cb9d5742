"""``Int4WeightTensor``: a packed low-bit weight that behaves like a float weight.

A wrapper tensor subclass in torchao's ``TorchAOBaseTensor`` style, one class for every
quantized weight awq_ao makes:

* a 2-D ``[N, K]`` ``nn.Linear`` weight: ``F.linear(x, w, b)`` runs the ``awq_ao::w4a16_linear``
  custom op on the packed data, so eager, ``torch.compile(fullgraph=True)`` and
  ``torch.export`` all work;
* a 3-D MoE experts weight (transformers' ``gate_up_proj`` / ``down_proj``, ``[E, N, K]``, or
  ``[E, K, N]`` when ``transposed``): ``E`` slabs with exactly the 2-D layout, stacked along a
  leading expert dim; :meth:`Int4WeightTensor.grouped_linear` runs the
  ``awq_ao::w4a16_grouped_linear`` op of the same family (:mod:`awq_ao.lowering.grouped_ops`),
  and ``W[e]`` is expert ``e``'s 2-D weight (views of the storage).

Inner tensors: ``packed`` (uint8, see :mod:`awq_ao.lowering.packing`) and one copy of the
quantization metadata: ``qscale`` (16-bit) and ``qzero`` (uint8), ``[N, G]`` with
``w_hat = (code - zero) * scale``, or, for the ``cpu_tinygemm`` layout, only tinygemm's
bfloat16 ``scales_and_zeros`` (``[G_tg, N, 2]`` scale/offset, what its kernel reads). Either
way a 4-bit weight holds ``4 + 32 / group_size`` bits per element or less (plus padding of
a ragged last group for tinygemm).

The packing layout tag is ``pack_layout`` (``Tensor.layout`` is torch's own attribute).

The constructors (:meth:`~Int4WeightTensor.from_float`, :meth:`~Int4WeightTensor.from_codes`,
:meth:`~Int4WeightTensor.from_slabs`) are defined in :mod:`awq_ao.lowering.int4_construction`
on a base class, and the dtype helpers in :mod:`awq_ao.lowering.int4_dtypes`
(:func:`scale_storage_dtype` and :func:`round_scale` are re-exported here).
"""

from __future__ import annotations

import hashlib
import sys

import torch
from torchao.utils import TorchAOBaseTensor

from awq_ao.lowering import cpu_ext, direct_cpu, packing
from awq_ao.lowering import ops as _ops  # noqa: F401  (registers awq_ao:: custom ops)
from awq_ao.lowering.int4_construction import _Int4Construction
from awq_ao.lowering.int4_dtypes import _FLOAT_DTYPES, round_scale, scale_storage_dtype
from awq_ao.lowering.packing import (
    LAYOUT_CPU_TINYGEMM,
    choose_layout,
    cpu_tinygemm_variant,
    tinygemm_qparams,
)

__all__ = ["Int4WeightTensor", "scale_storage_dtype", "round_scale"]


def metadata_hash(t: TorchAOBaseTensor) -> str:
    """A hash of a wrapper subclass's class, attributes and inner tensors' metadata (not their
    values): what the AOT autograd cache keys a compiled graph on."""
    parts = [type(t).__qualname__, str(t.requires_grad)]
    names = list(t.tensor_attribute_names) + list(getattr(t, "optional_tensor_attribute_names", []))
    parts += [repr(getattr(t, a)) for a in names]
    for name in t.__tensor_flatten__()[0]:
        x = getattr(t, name)
        parts.append(f"{name}:{x.dtype}:{tuple(x.shape)}:{x.stride()}:{x.device}")
    return hashlib.blake2b("|".join(parts).encode(), digest_size=16).hexdigest()


class Int4WeightTensor(_Int4Construction, TorchAOBaseTensor):
    """Group-wise quantized weight (2..8 bits) with a packed storage layout.

    Logical shape ``[N, K]`` (a linear's ``[out, in]``), or ``[E, N, K]`` for ``E`` experts
    (``[E, K, N]`` when ``transposed``: the parameter stores ``[E, in, out]``; the slabs are
    still stored ``[out, in]``, groups always run along the input features). Logical dtype =
    the original float dtype (``dtype``).

    Inner tensors (one copy of the quantization metadata, whatever the layout):
        packed: packed codes, uint8.
        qscale, qzero: ``[N, G]`` per-group scale (16-bit, see :func:`scale_storage_dtype`) and
            integer zero point (uint8); ``w_hat = (code - zero) * scale``. ``None`` for the
            ``cpu_tinygemm`` layout, which holds them as ``scales_and_zeros``.
        scales_and_zeros: tinygemm ``[G_tg, N, 2]`` bfloat16 scale/offset (cpu_tinygemm only).

    Attributes: ``bits`` (2..8), ``group_size`` (-1: one group per row), ``pack_layout``
    (``"nibble"``, ``"byte"`` or ``"cpu_tinygemm"``), ``layout_variant`` (cpu_tinygemm
    permutation, e.g. ``"b64i"``; ``""`` otherwise). :attr:`scale` and :attr:`zero` give the
    ``[N, G]`` parameters for every layout. ``transposed`` (3-D only, default False): see
    above. A 3-D weight's inner tensors carry the leading expert dim ``E``.
    """

    tensor_data_names = ["packed"]
    tensor_attribute_names = ["bits", "group_size", "pack_layout", "layout_variant", "shape", "dtype"]
    optional_tensor_data_names = ["qscale", "qzero", "scales_and_zeros"]
    optional_tensor_attribute_names = ["transposed"]

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
        transposed: bool = False,
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
        transposed: bool = False,
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
        self.transposed = transposed
        self._dims = tuple(shape)  # the logical shape as plain ints (see _linear)
        if transposed and len(shape) != 3:
            raise ValueError("transposed=True is for 3-D [E, in, out] expert weights only.")

    # ----------------------------------------------------------------------------------------
    # accessors
    # ----------------------------------------------------------------------------------------

    @property
    def num_experts(self) -> int:
        """Experts of a 3-D weight (its leading dim); 0 for a 2-D linear weight."""
        return int(self.shape[0]) if self.dim() == 3 else 0

    @property
    def out_features(self) -> int:
        """N: output features of the (per-expert) ``[N, K]`` weight."""
        if self.dim() == 3:
            return int(self.shape[2] if self.transposed else self.shape[1])
        return self.shape[0]

    @property
    def in_features(self) -> int:
        """K: input features of the (per-expert) ``[N, K]`` weight."""
        if self.dim() == 3:
            return int(self.shape[1] if self.transposed else self.shape[2])
        return self.shape[1]

    def slab(self, e: int) -> Int4WeightTensor:
        """Expert ``e`` of a 3-D weight as a 2-D ``[N, K]`` weight (views of the storage)."""
        if self.dim() != 3:
            raise ValueError(f"slab() is for 3-D experts weights; this one is {list(self.shape)}.")

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[e]

        return Int4WeightTensor(
            self.packed[e], self.bits, self.group_size, self.pack_layout, self.layout_variant,
            torch.Size([self.out_features, self.in_features]), self.dtype,
            pick(self.qscale), pick(self.qzero), pick(self.scales_and_zeros),
        )

    def _slabs(self) -> list[Int4WeightTensor]:
        return [self.slab(e) for e in range(self.num_experts)]

    @property
    def scale(self) -> torch.Tensor:
        """Per-group scales ``[N, G]`` (``[E, N, G]`` for experts; stored dtype; derived from
        ``scales_and_zeros`` for the cpu_tinygemm layout)."""
        if self.qscale is not None:
            return self.qscale
        if self.dim() == 3:
            return torch.stack([s.scale for s in self._slabs()])
        s, _ = tinygemm_qparams(self.scales_and_zeros, self.shape[1], self.group_size)
        return s.to(self.scales_and_zeros.dtype)

    @property
    def zero(self) -> torch.Tensor:
        """Per-group integer zero points ``uint8 [N, G]`` (``[E, N, G]`` for experts)."""
        if self.qzero is not None:
            return self.qzero
        if self.dim() == 3:
            return torch.stack([s.zero for s in self._slabs()])
        return tinygemm_qparams(self.scales_and_zeros, self.shape[1], self.group_size)[1]

    def bits_per_weight(self) -> float:
        """Bits held per logical weight element, everything included."""
        return 8.0 * self.nbytes_packed() / max(1, self.numel())

    def codes(self) -> torch.Tensor:
        """The integer codes, ``uint8 [N, K]`` (``[E, N, K]`` for experts, stored orientation)."""
        if self.dim() == 3:
            return torch.stack([s.codes() for s in self._slabs()])
        return packing.unpack(
            self.packed,
            self.bits,
            self.pack_layout,
            self.shape[0],
            self.shape[1],
            self.layout_variant or None,
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:  # type: ignore[override]
        """The dequantized weight ``(code - zero) * scale`` as a plain tensor of the logical
        shape."""
        if self.dim() == 3:
            w = torch.stack([s.dequantize(dtype or self.dtype) for s in self._slabs()])
            return w.transpose(1, 2).contiguous() if self.transposed else w
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
        return metadata_hash(self)

    def __repr__(self) -> str:
        layout = self.pack_layout + (f"/{self.layout_variant}" if self.layout_variant else "")
        experts = f"experts={self.num_experts}, transposed={self.transposed}, " if self.dim() == 3 else ""
        return (
            f"{type(self).__name__}(shape={list(self.shape)}, dtype={self.dtype}, "
            f"device={self.device}, bits={self.bits}, group_size={self.group_size}, "
            f"layout={layout}, {experts}nbytes_packed={self.nbytes_packed()})"
        )

    # ----------------------------------------------------------------------------------------
    # compute
    # ----------------------------------------------------------------------------------------

    def grouped_linear(self, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """``y[r] = x[r] @ W_e.T`` with ``W_e`` the ``[out, in]`` weight of expert
        ``e = expert_ids[r]`` (a 3-D experts weight); rows with an id outside ``[0, E)`` get zeros."""
        if self.dim() != 3:
            raise ValueError(f"grouped_linear needs a 3-D experts weight, got {list(self.shape)}.")
        return torch.ops.awq_ao.w4a16_grouped_linear(
            x, expert_ids, self.packed, self.qscale, self.qzero, self.bits, self.group_size,
            self.in_features, self.pack_layout, self.layout_variant, self.scales_and_zeros,
        )

    def _linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # self._dims, not self.shape / self.dim(): on a subclass each of those is a
        # __torch_function__ round trip (a few us each, per layer and token in eager decode)
        if len(self._dims) != 2:
            raise TypeError(
                f"F.linear needs a 2-D weight; this Int4WeightTensor holds {self.num_experts} experts "
                f"{list(self.shape)}: use W[e] or grouped_linear(x, expert_ids)."
            )
        if isinstance(x, Int4WeightTensor):
            raise TypeError("F.linear: the input must be a plain tensor, got an Int4WeightTensor.")
        if not x.is_floating_point():
            raise TypeError(
                f"F.linear with an Int4WeightTensor weight needs a float input, got {x.dtype}."
            )
        if x.shape[-1] != self._dims[1]:
            raise ValueError(
                f"F.linear: input has {x.shape[-1]} features (shape {tuple(x.shape)}) but the "
                f"Int4WeightTensor weight is {list(self.shape)}."
            )
        if self.pack_layout == LAYOUT_CPU_TINYGEMM and x.device.type == "cpu":
            if not torch.compiler.is_compiling():
                cpu_ext.load()  # built on first use (the custom op would build it too)
            y = direct_cpu.int4_linear(
                x, self.packed, self.scales_and_zeros, bias, self._dims[1], self.group_size, self.layout_variant
            )
            if y is not None:
                return y
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
        if self.dim() == 3:
            slabs = [s._convert(device, dtype, layout, non_blocking) for s in self._slabs()]
            return Int4WeightTensor.from_slabs(slabs, self.transposed)
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


_base_setstate = Int4WeightTensor.__setstate__  # torchao's (set when the class is created)


def _setstate(self: Int4WeightTensor, state: object) -> None:
    """Unpickling: a tensor pickled before ``transposed`` existed is a 2-D weight (torchao sets
    a missing optional attribute to None); a 3-D experts weight loaded into a process that
    has transformers registers the ``"awq_ao_int4"`` experts implementation its module runs."""
    _base_setstate(self, state)
    if self.transposed is None:
        self.transposed = False
    if self.dim() == 3 and "transformers" in sys.modules:
        from awq_ao.lowering import int4_experts  # noqa: F401  (registers the implementation)


Int4WeightTensor.__setstate__ = _setstate  # type: ignore[method-assign]
