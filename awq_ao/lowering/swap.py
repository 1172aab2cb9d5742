"""Swap float linear layers for quantized ones, and measure model size."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from awq_ao.lowering.int4_tensor import Int4WeightTensor

__all__ = ["quantize_linear_module", "model_size_bytes", "is_quantizable_linear", "footprint"]


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional for this module
        return None
    return Conv1D


def is_quantizable_linear(module: nn.Module) -> bool:
    """True for ``nn.Linear`` (and subclasses) and transformers' ``Conv1D``."""
    conv1d = _conv1d_type()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def quantize_linear_module(
    module: nn.Module,
    bits: int = 4,
    group_size: int = 128,
    zero_point: bool = True,
    params: tuple[torch.Tensor, torch.Tensor] | None = None,
    codes: torch.Tensor | None = None,
) -> nn.Module:
    """Quantize a linear layer's weight to an :class:`Int4WeightTensor` (round to nearest).

    * ``nn.Linear``: the weight is replaced in place by a frozen
      ``nn.Parameter(Int4WeightTensor)``; the same module is returned.
    * ``transformers.pytorch_utils.Conv1D`` (weight ``[in, out]``, ``y = x @ W + b``): a **new**
      ``nn.Linear`` holding the transposed weight, quantized, and a copy of the bias is returned;
      the caller replaces the child module with it.

    ``params``: per-group ``(scale, zero)`` for the ``[out, in]`` weight (see
    ``Int4WeightTensor.from_float``). ``codes``: the ``uint8 [out, in]`` codes already chosen
    on that grid (e.g. by error-feedback rounding); they are packed as they are, and the
    module's float weight only gives the dtype. Any scaling (AWQ) must already be folded into
    the weight. Raises ``TypeError`` for other module types and ``ValueError`` for an already
    quantized weight.
    """
    if codes is not None and params is None:
        raise ValueError("quantize_linear_module: codes need their params (scale, zero).")

    def to_int4(w: torch.Tensor) -> Int4WeightTensor:
        if codes is not None:
            assert params is not None
            return Int4WeightTensor.from_codes(codes, params[0], params[1], bits, group_size, dtype=w.dtype)
        return Int4WeightTensor.from_float(w, bits, group_size, zero_point, params=params)

    conv1d = _conv1d_type()
    if isinstance(module, nn.Linear):
        w = module.weight
        if isinstance(w, Int4WeightTensor):
            raise ValueError(f"{type(module).__name__} weight is already an Int4WeightTensor.")
        q = to_int4(w.detach())
        module.weight = nn.Parameter(q, requires_grad=False)
        return module
    if conv1d is not None and isinstance(module, conv1d):
        w = module.weight  # [in, out]
        if isinstance(w, Int4WeightTensor):
            raise ValueError("Conv1D weight is already an Int4WeightTensor.")
        in_features, out_features = w.shape
        bias = getattr(module, "bias", None)
        linear = nn.Linear(
            in_features, out_features, bias=bias is not None, device="meta", dtype=w.dtype
        )
        q = to_int4(w.detach().t().contiguous())
        linear.weight = nn.Parameter(q, requires_grad=False)
        if bias is not None:
            linear.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        linear.train(module.training)
        return linear
    raise TypeError(
        f"quantize_linear_module supports torch.nn.Linear and transformers Conv1D, got "
        f"{type(module).__module__}.{type(module).__qualname__}."
    )


def _tensor_bytes(t: torch.Tensor) -> int:
    if isinstance(t, Int4WeightTensor):
        return t.nbytes_packed()
    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def model_size_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers, each counted once.

    Shared tensors (tied embeddings, the same parameter registered twice, views of one storage
    region) are counted once. :class:`Int4WeightTensor` counts its packed storage
    (:meth:`Int4WeightTensor.nbytes_packed`); other wrapper subclasses count their inner tensors.
    """
    seen_ids: set[int] = set()
    seen_storage: set[tuple] = set()
    total = 0
    tensors = [t for _, t in model.named_parameters(remove_duplicate=False)]
    tensors += [t for _, t in model.named_buffers(remove_duplicate=False)]
    for t in tensors:
        if t is None or id(t) in seen_ids:
            continue
        seen_ids.add(id(t))
        if not is_traceable_wrapper_subclass(t) and t.device.type != "meta" and t.numel():
            key = (
                t.device,
                t.untyped_storage().data_ptr(),
                t.storage_offset(),
                t.dtype,
                tuple(t.shape),
                tuple(t.stride()),
            )
            if key in seen_storage:
                continue
            seen_storage.add(key)
        total += _tensor_bytes(t)
    return total


def footprint(model: nn.Module) -> dict:
    """Where a model's bytes are: its quantized weights and everything kept in full precision.

    Returns ``quantized_bytes`` (packed codes + scales + zeros of every
    :class:`Int4WeightTensor` and other wrapper subclass but the 8-bit head), ``quantized_weights``
    (their logical element count), ``bits_per_weight``, ``int8_bytes`` / ``int8_weights`` (the
    8-bit head, :class:`~awq_ao.lowering.int8_tensor.Int8RowWeightTensor`, counted once when tied
    to the embedding), ``full_precision_bytes`` (the rest, each shared tensor once) and
    ``layouts`` (``{layout: count}``).
    """
    from awq_ao.lowering.int8_tensor import Int8RowWeightTensor

    q_bytes, q_weights = 0, 0
    i8_bytes, i8_weights = 0, 0
    layouts: dict[str, int] = {}
    seen: set[int] = set()
    for _, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers()):
        if t is None or id(t) in seen or not is_traceable_wrapper_subclass(t):
            continue
        seen.add(id(t))
        if isinstance(t, Int8RowWeightTensor):
            i8_bytes += _tensor_bytes(t)
            i8_weights += t.numel()
            continue
        q_bytes += _tensor_bytes(t)
        q_weights += t.numel()
        lay = getattr(t, "pack_layout", type(t).__name__)
        layouts[lay] = layouts.get(lay, 0) + 1
    total = model_size_bytes(model)
    return {
        "quantized_bytes": q_bytes,
        "quantized_weights": q_weights,
        "bits_per_weight": 8 * q_bytes / q_weights if q_weights else None,
        "int8_bytes": i8_bytes,
        "int8_weights": i8_weights,
        "full_precision_bytes": total - q_bytes - i8_bytes,
        "layouts": layouts,
    }
