"""Building INT4 modules from stored tensors on load: the :class:`Int4WeightTensor` of a
quantized linear (:func:`quantized_linear`) or of a 3-D experts parameter, packed in the layout
the target device reads, and the switch of an experts module to the INT4 implementation."""

from __future__ import annotations

import copy

import torch
from torch import nn

from awq_ao.checkpoint.formats import CheckpointError, ExpertsPlan, LayerPlan
from awq_ao.lowering import packing
from awq_ao.lowering.int4_experts import IMPLEMENTATION
from awq_ao.lowering.int4_tensor import Int4WeightTensor, round_scale, scale_storage_dtype
from awq_ao.lowering.scaled_input import ScaledInputLinear

__all__ = ["quantized_linear"]


def _make_experts(
    ep: ExpertsPlan, data: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, device: torch.device, dtype: torch.dtype
) -> Int4WeightTensor:
    """The 3-D :class:`Int4WeightTensor` of ``ep`` from its stored tensors, one slab per expert
    (each built like a quantized linear's weight, in the layout ``device`` reads)."""
    slabs = []
    for e in range(ep.num_experts):
        lp = LayerPlan(f"{ep.key}[{e}]", ep.bits, ep.group_size, ep.out_features, ep.in_features, None, ep.nibble_packed)
        slabs.append(_make_weight(lp, data[e], scale[e], zero[e], device, dtype))
    return Int4WeightTensor.from_slabs(slabs, ep.transposed)


def _use_int4_experts_implementation(mod: nn.Module) -> None:
    """Switch one experts module to the ``"awq_ao_int4"`` implementation through a copy of
    its config (the model's shared config, and every other module, keep theirs)."""
    cfg = getattr(mod, "config", None)
    if cfg is None:
        raise CheckpointError(f"{type(mod).__name__}: experts module without a config; cannot select the INT4 experts implementation.")
    cfg = copy.copy(cfg)
    cfg._experts_implementation_internal = IMPLEMENTATION
    mod.config = cfg


def _make_weight(
    lp: LayerPlan, data: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, device: torch.device, dtype: torch.dtype
) -> Int4WeightTensor:
    n, k = lp.out_features, lp.in_features
    # scales keep the checkpoint's 16-bit dtype where the layout allows (exact imports)
    scale = scale.to(device=device).contiguous()
    zero = zero.to(device=device).contiguous()
    layout = packing.choose_layout(device, lp.bits, n, k, lp.group_size)
    try:
        if lp.nibble_packed:
            if layout == packing.LAYOUT_NIBBLE and lp.bits == 4:
                # no repacking: build directly (from_codes would validate the zero points)
                if zero.numel() and (float(zero.min()) < 0 or float(zero.max()) > 2**lp.bits - 1):
                    raise CheckpointError(f"{lp.name}: zero points outside [0, {2**lp.bits - 1}].")
                sdt = scale_storage_dtype(dtype, packing.LAYOUT_NIBBLE, scale.dtype)
                return Int4WeightTensor(
                    data.to(device).contiguous(), lp.bits, lp.group_size,
                    packing.LAYOUT_NIBBLE, "", torch.Size([n, k]), dtype,
                    round_scale(scale, sdt).to(sdt), zero.round().to(torch.uint8),
                )
            codes = packing.unpack(data, lp.bits, packing.LAYOUT_NIBBLE, n, k)
        else:
            codes = data
        return Int4WeightTensor.from_codes(
            codes.to(device), scale, zero, lp.bits, lp.group_size, dtype, layout=layout
        )
    except (ValueError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{lp.name}: invalid quantized weight ({e}).") from e


def quantized_linear(
    lp: LayerPlan,
    data: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype,
    bias: torch.Tensor | None,
    input_scale: torch.Tensor | None = None,
) -> nn.Module:
    """The eval-mode ``nn.Linear`` (or :class:`ScaledInputLinear` where ``lp.scaled_input``)
    holding the :class:`Int4WeightTensor` built from a layer's stored tensors.

    ``bias`` / ``input_scale`` may be meta tensors, filled later by the caller.
    """
    w = _make_weight(lp, data, scale, zero, device, dtype)
    lin = nn.Linear(lp.in_features, lp.out_features, bias=False, device="meta", dtype=dtype)
    lin.weight = nn.Parameter(w, requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach().to(dtype=dtype), requires_grad=bool(getattr(bias, "requires_grad", False)))
    new: nn.Module = lin
    if lp.scaled_input:
        if input_scale is None:
            raise CheckpointError(f"{lp.name}: recorded as a ScaledInputLinear, but no input_scale was given.")
        new = ScaledInputLinear(lin, input_scale)
    new.train(False)
    return new
