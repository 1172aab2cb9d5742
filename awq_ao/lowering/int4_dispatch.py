"""torch dispatch of :class:`~awq_ao.lowering.int4_tensor.Int4WeightTensor`.

``F.linear`` / ``aten.linear`` (the ``awq_ao::w4a16_linear`` op), ``.to`` (device and dtype,
repacking where the layout changes), ``copy_`` (state-dict loading) and ``W[e]`` of a 3-D
experts weight. Imported by :mod:`awq_ao.lowering` (the package), so every import of the class
comes with its dispatch; the class is allow-listed for ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from awq_ao.lowering.int4_tensor import Int4WeightTensor

aten = torch.ops.aten

implements = Int4WeightTensor.implements
implements_torch_function = Int4WeightTensor.implements_torch_function


def linear_args(args, kwargs):
    """``(input, weight, bias)`` of an ``F.linear`` / ``aten.linear`` call, positional or keyword."""
    x = args[0] if len(args) > 0 else kwargs["input"]
    w = args[1] if len(args) > 1 else kwargs["weight"]
    b = args[2] if len(args) > 2 else kwargs.get("bias")
    return x, w, b


@implements_torch_function(F.linear)
def _(func, types, args, kwargs):
    x, w, b = linear_args(args, kwargs)
    if not isinstance(w, Int4WeightTensor):
        raise TypeError("F.linear: an Int4WeightTensor can only be used as the weight.")
    return w._linear(x, b)


@implements(aten.linear.default)
def _(func, types, args, kwargs):
    x, w, b = linear_args(args, kwargs)
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
    if (src.shape, src.bits, src.group_size, bool(src.transposed)) != (dst.shape, dst.bits, dst.group_size, bool(dst.transposed)):
        raise ValueError(
            f"Int4WeightTensor copy_: source (shape={list(src.shape)}, bits={src.bits}, "
            f"group_size={src.group_size}, transposed={bool(src.transposed)}) does not match "
            f"destination (shape={list(dst.shape)}, bits={dst.bits}, group_size={dst.group_size}, "
            f"transposed={bool(dst.transposed)})."
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


@implements(aten.select.int)
def _(func, types, args, kwargs):
    """``W[e]`` of an ``[E, out, in]`` experts weight is expert ``e``'s 2-D weight, so eager
    experts implementations (``F.linear(x, self.gate_up_proj[e])``) run on INT4 data too."""
    self, dim, index = args[0], args[1], args[2]
    if self.dim() != 3 or dim != 0 or self.transposed:
        raise NotImplementedError(
            f"Int4WeightTensor supports W[e] only for [E, out, in] experts weights (got shape "
            f"{list(self.shape)}, dim={dim}, transposed={self.transposed})."
        )
    return self.slab(int(index))


# the 3-D experts weight class of awq_ao < 2026-12-02 was ``int4_experts.Int4ExpertsTensor``
# (same inner tensors and attributes): its pickles load as Int4WeightTensor
torch.serialization.add_safe_globals([Int4WeightTensor, (Int4WeightTensor, "awq_ao.lowering.int4_experts.Int4ExpertsTensor")])
