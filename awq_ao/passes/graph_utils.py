"""Small helpers for reading an exported graph: parameters, owning modules, op classes."""

from __future__ import annotations

import operator
from collections.abc import Iterable

import torch
from torch import fx

aten = torch.ops.aten


def _overloads(*packets: object) -> set[object]:
    out: set[object] = set()
    for p in packets:
        for name in p.overloads():  # type: ignore[attr-defined]
            out.add(getattr(p, name))
    return out


# Ops that only move data around: replaying them on an index tensor gives the channel map.
SHAPE_OPS = _overloads(
    aten.view,
    aten.reshape,
    aten._unsafe_view,
    aten.transpose,
    aten.permute,
    aten.t,
    aten.expand,
    aten.unsqueeze,
    aten.squeeze,
    aten.slice,
    aten.split,
    aten.split_with_sizes,
    aten.chunk,
    aten.unflatten,
    aten.flatten,
    aten.select,
    aten.narrow,
    aten.unbind,
    aten.repeat_interleave,
    aten.index_select,
) | {operator.getitem}

# Ops that leave values per channel unchanged (or scale them by a positive factor, e.g. relu).
IDENTITY_OPS = _overloads(
    aten.to,
    aten._to_copy,
    aten.contiguous,
    aten.clone,
    aten.alias,
    aten.detach,
    aten.dropout,
    aten.type_as,
    aten.relu,
    aten.lift_fresh_copy,
) | {torch.ops.aten.dropout.default}

# Ops that are positively homogeneous only (relu(x/s) == relu(x)/s for s > 0).
HOMOGENEOUS_OPS = _overloads(aten.relu)

ASSERT_OPS = _overloads(aten._assert_tensor_metadata) | {torch.ops.aten.sym_constrain_range_for_size.default}

MUL_OPS = _overloads(aten.mul, aten.multiply)
ADD_OPS = _overloads(aten.add)
SUB_OPS = _overloads(aten.sub)
RSUB_OPS = _overloads(aten.rsub)
LINEAR_OPS = {aten.linear.default}
ADDMM_OPS = {aten.addmm.default}
LAYER_NORM_OPS = {aten.layer_norm.default}
# torch.nn.RMSNorm / F.rms_norm: rms_norm(x, normalized_shape, weight, eps)
RMS_NORM_OPS = _overloads(aten.rms_norm)
SDPA_OPS = _overloads(aten.scaled_dot_product_attention)
# attention written out: probs @ V mixes positions but keeps V's channels
MATMUL_OPS = _overloads(aten.matmul, aten.bmm)
# a 2-D weight transposed for ``x @ W.T`` (FalconLinear-style linears)
WEIGHT_T_OPS = _overloads(aten.numpy_T, aten.t)

# Scalar-affine ops allowed between a per-channel parameter and the norm multiply.
AFFINE_SCALAR_OPS = MUL_OPS | ADD_OPS | SUB_OPS | RSUB_OPS


# Ops that read only the metadata (shape, dtype, device) of their tensor arguments.
META_ONLY_OPS = _overloads(
    aten.new_empty,
    aten.new_zeros,
    aten.new_ones,
    aten.new_full,
    aten.empty_like,
    aten.zeros_like,
    aten.ones_like,
    aten.full_like,
    aten.sym_size,
    aten.sym_stride,
    aten.sym_numel,
    aten.sym_storage_offset,
)

# Ops whose second tensor argument only gives a shape or dtype (``x.view_as(other)``).
LIKE_OPS = _overloads(aten.view_as, aten.expand_as, aten.reshape_as, aten.type_as)

DIV_OPS = _overloads(aten.div, aten.divide)
# Multiplying or dividing by a constant commutes with per-channel scaling.
SCALAR_SCALE_OPS = MUL_OPS | DIV_OPS


def is_op(node: fx.Node, ops: Iterable[object]) -> bool:
    """True if ``node`` is a call_function of one of ``ops``."""
    return node.op == "call_function" and node.target in ops


def owner_module(node: fx.Node) -> str | None:
    """FQN of the innermost module that produced ``node`` (from ``nn_module_stack``)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    fqn = list(stack.values())[-1][0]
    return fqn if isinstance(fqn, str) else None


def meta_shape(node: fx.Node) -> tuple[int, ...] | None:
    """Static shape of a node's value (None for non-tensors or symbolic shapes)."""
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        # symbolic (e.g. data-dependent) sizes are SymInts: never guard on them here
        if all(isinstance(s, int) for s in val.shape):
            return tuple(val.shape)
        return None
    return None


def is_metadata_use(user: fx.Node, node: fx.Node) -> bool:
    """True if ``user`` reads only the shape, dtype or device of ``node`` (not its values).

    E.g. ``node.new_empty(...)``, ``torch.zeros_like(node)``, ``x.view_as(node)``.
    """
    if user.op != "call_function":
        return False
    if user.target in ASSERT_OPS or user.target in META_ONLY_OPS:
        return True
    if user.target in LIKE_OPS:
        return len(user.args) > 1 and user.args[1] is node and user.args[0] is not node
    return False


def scalar_operand(node: fx.Node) -> tuple[fx.Node, float] | None:
    """``(x, c)`` if ``node`` is ``x * c`` or ``x / c`` with a constant number ``c != 0``.

    For a division ``c`` is the reciprocal, so the result is always ``x * c``.
    """
    if not is_op(node, SCALAR_SCALE_OPS) or len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    div = node.target in DIV_OPS
    if isinstance(a, fx.Node) and isinstance(b, (int, float)) and not isinstance(b, bool) and b != 0:
        return a, (1.0 / b if div else float(b))
    if not div and isinstance(b, fx.Node) and isinstance(a, (int, float)) and not isinstance(a, bool) and a != 0:
        return b, float(a)
    return None


def real_users(node: fx.Node) -> list[fx.Node]:
    """Users of ``node`` that read its values (not assertions or metadata-only uses)."""
    return [u for u in node.users if not is_metadata_use(u, node)]
