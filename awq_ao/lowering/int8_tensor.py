"""``Int8RowWeightTensor``: an 8-bit row-wise weight for the output head and the embedding.

A wrapper tensor subclass (torchao's ``TorchAOBaseTensor`` style, like
:class:`~awq_ao.lowering.int4_tensor.Int4WeightTensor`) holding ``codes`` ``[N, K]`` int8
(symmetric, -127..127) and ``row_scale`` ``[N]`` float32, ``W[n, k] = codes[n, k] *
row_scale[n]``: ``8 + 32 / K`` bits per weight. It stands in for a float weight in

* ``F.linear(x, W, b)``: the ``awq_ao::w8_linear`` custom op (:mod:`awq_ao.lowering.int8_ops`);
* ``F.embedding(ids, W)``: the rows ``codes[ids] * row_scale[ids]`` in the logical dtype,

so a head tied to the input embedding keeps one shared 8-bit copy. Eager,
``torch.compile(fullgraph=True)`` and ``torch.export`` run it; ``.to(device/dtype)`` moves the
codes and changes only the logical dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchao.utils import TorchAOBaseTensor

from awq_ao.lowering import cpu_ext, direct_cpu, int8_ops  # noqa: F401  (int8_ops registers awq_ao::w8_linear)
from awq_ao.lowering.int4_dispatch import linear_args
from awq_ao.lowering.int4_dtypes import _FLOAT_DTYPES
from awq_ao.lowering.int4_tensor import metadata_hash
from awq_ao.lowering.int8_ops import dequantize_rows

__all__ = ["Int8RowWeightTensor"]

aten = torch.ops.aten


class Int8RowWeightTensor(TorchAOBaseTensor):
    """Row-wise symmetric 8-bit weight ``[N, K]`` with logical dtype ``dtype``.

    Inner tensors: ``codes`` (int8 ``[N, K]``) and ``row_scale`` (float32 ``[N]``).
    """

    tensor_data_names = ["codes", "row_scale"]
    tensor_attribute_names = ["shape", "dtype"]

    def __new__(cls, codes: torch.Tensor, row_scale: torch.Tensor, shape: torch.Size, dtype: torch.dtype):
        return torch.Tensor._make_wrapper_subclass(  # type: ignore[attr-defined]
            cls, shape, dtype=dtype, device=codes.device, requires_grad=False
        )

    def __init__(self, codes: torch.Tensor, row_scale: torch.Tensor, shape: torch.Size, dtype: torch.dtype):
        super().__init__()
        self.codes = codes
        self.row_scale = row_scale

    @classmethod
    def from_float(cls, w: torch.Tensor) -> Int8RowWeightTensor:
        """Round-to-nearest quantize a float ``[N, K]`` weight with one scale per row
        (``max |w[n]| / 127``, in float32; an all-zero row gets scale 1 and zero codes)."""
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"Int8RowWeightTensor.from_float needs a 2-D float weight, got "
                f"{getattr(w, 'dtype', type(w))} {list(getattr(w, 'shape', []))}."
            )
        if not bool(torch.isfinite(w).all()):
            raise ValueError("Int8RowWeightTensor.from_float: the weight holds NaN or inf values.")
        w32 = w.detach().to(torch.float32)
        amax = w32.abs().amax(dim=1)
        scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
        codes = torch.round(w32 / scale.unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
        return cls(codes.contiguous(), scale.contiguous(), w.shape, w.dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:  # type: ignore[override]
        """The float weight ``codes * row_scale`` (computed in float32) in ``dtype`` (default: the logical dtype)."""
        return dequantize_rows(self.codes, self.row_scale, self.dtype if dtype is None else dtype)

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight: 8 for the codes plus the float32 row scale."""
        return 8.0 + 32.0 / self.shape[1]

    def nbytes_packed(self) -> int:
        """Bytes of the stored codes and scales."""
        return self.codes.numel() + 4 * self.row_scale.numel()

    def _stable_hash_for_caching(self) -> str:
        """Metadata hash for the AOT autograd cache."""
        return metadata_hash(self)

    def __repr__(self) -> str:
        return (
            f"Int8RowWeightTensor(shape={list(self.shape)}, dtype={self.dtype}, device={self.device}, "
            f"{self.bits_per_weight:.3f} bits/weight)"
        )

    def _linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if isinstance(x, Int8RowWeightTensor) or not x.is_floating_point():
            raise TypeError(f"F.linear with an Int8RowWeightTensor weight needs a float input, got {x.dtype}.")
        if x.device.type == "cpu":
            if not torch.compiler.is_compiling():
                cpu_ext.load()
            y = direct_cpu.int8_linear(x, self.codes, self.row_scale, bias)
            if y is not None:
                return y
        return torch.ops.awq_ao.w8_linear(x, self.codes, self.row_scale, bias)

    def _embedding(self, ids: torch.Tensor) -> torch.Tensor:
        return dequantize_rows(self.codes[ids], self.row_scale[ids], self.dtype)

    def _convert(self, device: torch.device | None, dtype: torch.dtype | None, non_blocking: bool = False):
        dtype = self.dtype if dtype is None else dtype
        if dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"Int8RowWeightTensor can only be cast to a floating dtype {_FLOAT_DTYPES}, got {dtype}; "
                "its codes stay 8-bit."
            )
        return Int8RowWeightTensor(
            self.codes.to(device, non_blocking=non_blocking),
            self.row_scale.to(device, non_blocking=non_blocking),
            self.shape,
            dtype,
        )


implements = Int8RowWeightTensor.implements
implements_torch_function = Int8RowWeightTensor.implements_torch_function


def _linear_args(args, kwargs):
    x, w, b = linear_args(args, kwargs)
    if not isinstance(w, Int8RowWeightTensor):
        raise TypeError("F.linear: an Int8RowWeightTensor can only be used as the weight.")
    return x, w, b


@implements_torch_function(F.linear)
def _(func, types, args, kwargs):
    x, w, b = _linear_args(args, kwargs)
    return w._linear(x, b)


@implements(aten.linear.default)
def _(func, types, args, kwargs):
    x, w, b = _linear_args(args, kwargs)
    return w._linear(x, b)


@implements_torch_function(F.embedding)
def _(func, types, args, kwargs):
    names = ["input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"]
    bound = dict(zip(names, args, strict=False)) | dict(kwargs or {})
    w = bound["weight"]
    if not isinstance(w, Int8RowWeightTensor) or isinstance(bound["input"], Int8RowWeightTensor):
        raise TypeError("F.embedding: an Int8RowWeightTensor can only be used as the weight.")
    if bound.get("max_norm") is not None:
        raise NotImplementedError(
            "F.embedding with max_norm renormalizes the weight in place, which an 8-bit "
            "Int8RowWeightTensor cannot do; keep this embedding in full precision."
        )
    return w._embedding(bound["input"])


@implements(aten.embedding.default)
def _(func, types, args, kwargs):
    w, ids = args[0], args[1]
    return w._embedding(ids)


@implements([aten._to_copy.default, aten.to.dtype_layout])
def _(func, types, args, kwargs):
    self = args[0]
    kwargs = {k: v for k, v in (kwargs or {}).items() if k not in ("layout", "pin_memory", "memory_format", "copy")}
    kw = self._get_to_kwargs(*(a for a in args[1:] if not isinstance(a, torch.layout)), **kwargs)
    if func is aten.to.dtype_layout and kw["device"] == self.device and kw["dtype"] == self.dtype:
        return self
    return self._convert(kw["device"], kw["dtype"], non_blocking=kw["non_blocking"])


torch.serialization.add_safe_globals([Int8RowWeightTensor])
