"""``awq_ao::w4a16_grouped_linear``: the grouped (MoE experts) member of the w4a16 op family.

``y[r] = x[r] @ dequant(W[expert_ids[r]]).T`` on the stacked inner tensors of a 3-D
:class:`~awq_ao.lowering.int4_tensor.Int4WeightTensor`, by calling ``awq_ao::w4a16_linear``
once per expert that receives rows (same arguments, plus the expert ids). An opaque custom op
with fake and autograd (input gradient) formulas, so it works under ``torch.compile``
(``fullgraph=True``) like transformers' own grouped-mm fallback.
"""

from __future__ import annotations

import torch

from awq_ao.lowering import ops as _ops  # noqa: F401  (registers awq_ao::w4a16_linear, dequantize)

__all__ = ["w4a16_grouped_linear"]

def _rows_by_expert(expert_ids: torch.Tensor, num_experts: int) -> list[tuple[int, torch.Tensor]]:
    ids = expert_ids.reshape(-1)
    valid = (ids >= 0) & (ids < num_experts)
    out = []
    for e in torch.unique(ids[valid]).tolist():
        out.append((int(e), (ids == e).nonzero().squeeze(1)))
    return out


@torch.library.custom_op("awq_ao::w4a16_grouped_linear", mutates_args=())
def w4a16_grouped_linear(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor | None,
    zero: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    layout: str,
    variant: str = "",
    scales_and_zeros: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y[r] = x[r] @ dequant(W_e).T`` with ``e = expert_ids[r]`` for stacked packed slabs.

    Args:
        x: ``[S, in_features]`` rows. expert_ids: ``[S]`` integer expert per row; rows with
            an id outside ``[0, E)`` (expert-parallel sentinels) get zeros.
        packed, scale, zero, scales_and_zeros: the stacked inner tensors of a
            3-D :class:`Int4WeightTensor` (leading dim E).
        bits, group_size, in_features, layout, variant: as for ``awq_ao::w4a16_linear``.
    """
    num_experts, n = packed.shape[0], packed.shape[1]
    out = x.new_zeros(x.shape[0], n)
    for e, rows in _rows_by_expert(expert_ids, num_experts):
        out[rows] = torch.ops.awq_ao.w4a16_linear(
            x[rows], packed[e], _pick(scale, e), _pick(zero, e), None, bits, group_size,
            in_features, layout, variant, _pick(scales_and_zeros, e),
        )
    return out


def _pick(t: torch.Tensor | None, e: int) -> torch.Tensor | None:
    return None if t is None else t[e]


@w4a16_grouped_linear.register_fake
def _grouped_fake(x, expert_ids, packed, scale, zero, bits, group_size, in_features, layout, variant="", scales_and_zeros=None):
    return x.new_empty(x.shape[0], packed.shape[1])


@torch.library.custom_op("awq_ao::w4a16_grouped_linear_grad_input", mutates_args=())
def w4a16_grouped_linear_grad_input(
    grad: torch.Tensor,
    expert_ids: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor | None,
    zero: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    layout: str,
    variant: str = "",
    scales_and_zeros: torch.Tensor | None = None,
) -> torch.Tensor:
    """Input gradient of ``awq_ao::w4a16_grouped_linear``: ``grad[r] @ dequant(W_e)``."""
    out = grad.new_zeros(grad.shape[0], in_features)
    for e, rows in _rows_by_expert(expert_ids, packed.shape[0]):
        w = torch.ops.awq_ao.dequantize(
            packed[e], _pick(scale, e), _pick(zero, e), bits, group_size, in_features, layout,
            variant, grad.dtype, _pick(scales_and_zeros, e),
        )
        out[rows] = grad[rows] @ w
    return out


@w4a16_grouped_linear_grad_input.register_fake
def _grouped_grad_fake(grad, expert_ids, packed, scale, zero, bits, group_size, in_features, layout, variant="", scales_and_zeros=None):
    return grad.new_empty(grad.shape[0], in_features)


def _setup_context(ctx, inputs, output):
    x, expert_ids, packed, scale, zero, bits, group_size, in_features, layout, variant, sz = inputs
    ctx.save_for_backward(expert_ids, packed, scale, zero, sz)
    ctx.meta = (bits, group_size, in_features, layout, variant)


def _backward(ctx, grad):
    expert_ids, packed, scale, zero, sz = ctx.saved_tensors
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.awq_ao.w4a16_grouped_linear_grad_input(
            grad, expert_ids, packed, scale, zero, *ctx.meta, sz
        )
    return grad_x, None, None, None, None, None, None, None, None, None, None


w4a16_grouped_linear.register_autograd(_backward, setup_context=_setup_context)
