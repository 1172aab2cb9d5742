"""Channel correspondence by replaying data-movement ops on an index tensor.

Start with a tensor shaped like the producer's output holding each element's channel id,
replay the graph's views, transposes, splits, head repeats and attention's value path on it,
and read off which producer channel lands in each channel of X. This handles fused and
interleaved layouts (Phi-3 qkv_proj, GPT-NeoX query_key_value, GPT-2 c_attn splits) and
grouped-query attention (several X channels map to one producer channel) with no per-model
code.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx
from torch.utils._pytree import tree_map

from awq_ao.passes.graph_utils import (
    IDENTITY_OPS,
    LIKE_OPS,
    MATMUL_OPS,
    MUL_OPS,
    SDPA_OPS,
    SHAPE_OPS,
    is_op,
    meta_shape,
    scalar_operand,
)

aten = torch.ops.aten
# identity ops whose result is a fresh contiguous tensor
COPYING_OPS = {aten.contiguous.default, aten.clone.default}
VIEW_OPS = {aten.view.default, aten._unsafe_view.default}
TYPE_AS_OPS = {aten.type_as.default}
EXPAND_AS_OPS = {aten.expand_as.default}

Index = torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...]


class ChannelMapError(ValueError):
    """The channel flow could not be replayed."""


def channel_set(idx: Index) -> set[int]:
    """All producer channels present in a replayed index value."""
    if isinstance(idx, torch.Tensor):
        return set(torch.unique(idx).tolist())
    out: set[int] = set()
    for t in idx:
        out |= channel_set(t)
    return out


def _sdpa_value(node: fx.Node, idx: torch.Tensor) -> torch.Tensor:
    out = meta_shape(node)
    if out is None or idx.dim() < 3:
        raise ChannelMapError("attention output has no static shape")
    first = idx[..., :1, :]
    if not bool((idx == first).all()):
        raise ChannelMapError("value channels vary along the sequence")
    heads_out, heads_in = out[-3], idx.shape[-3]
    if heads_out != heads_in:
        if heads_out % heads_in:
            raise ChannelMapError("attention heads do not divide")
        first = first.repeat_interleave(heads_out // heads_in, dim=-3)
    if first.shape[-1] != out[-1]:
        raise ChannelMapError("attention value and output head sizes differ")
    return first.expand(out)


def replay(node: fx.Node, tracked: fx.Node, idx: Index, on_path: bool) -> Index | None:
    """Index value of ``node`` given the index value of its input ``tracked``.

    Returns ``None`` when ``node`` is not a data-movement op (it *uses* the channels).
    On the producer-to-X path a product is also transparent (one factor carries the scale).
    """
    if node.op != "call_function":
        return None
    if node.target is operator.getitem:
        if not isinstance(idx, (list, tuple)):
            raise ChannelMapError("getitem on a tensor")
        return idx[node.args[1]]  # type: ignore[index]
    if not isinstance(idx, torch.Tensor):
        return None
    if is_op(node, SDPA_OPS):
        if len(node.args) > 2 and node.args[2] is tracked and tracked not in node.args[:2]:
            return _sdpa_value(node, idx)
        return None
    if is_op(node, MATMUL_OPS):
        if len(node.args) == 2 and node.args[1] is tracked and node.args[0] is not tracked:
            return _sdpa_value(node, idx)
        return None
    if is_op(node, IDENTITY_OPS):
        return idx.contiguous() if is_op(node, COPYING_OPS) else idx
    if is_op(node, LIKE_OPS) and node.args[0] is tracked and tracked not in node.args[1:]:
        out = meta_shape(node)  # x.view_as(other) / x.expand_as(other): other gives the shape
        if out is None:
            raise ChannelMapError(f"{node.target} without static shape")
        if node.target in TYPE_AS_OPS:
            return idx
        try:
            return idx.reshape(out) if node.target not in EXPAND_AS_OPS else idx.expand(out)
        except RuntimeError as e:
            raise ChannelMapError(f"replaying {node.target}: {e}") from e
    if on_path and scalar_operand(node) is not None and scalar_operand(node)[0] is tracked:  # type: ignore[index]
        return idx
    if on_path and is_op(node, MUL_OPS):
        out = meta_shape(node)
        if out is None:
            raise ChannelMapError("product without static shape")
        try:
            return idx.expand(out)
        except RuntimeError as e:
            raise ChannelMapError(f"product broadcast: {e}") from e
    if is_op(node, SHAPE_OPS):

        def sub(a: Any) -> Any:
            if a is tracked:
                return idx
            if isinstance(a, fx.Node):
                raise ChannelMapError(f"{node.target} depends on a computed value")
            return a

        args = tree_map(sub, node.args)
        kwargs = tree_map(sub, dict(node.kwargs))
        target = node.target
        if target in VIEW_OPS:
            # the index tensor's strides differ from the real tensor's: reshape gives the
            # same values wherever the graph's view was legal
            target = torch.ops.aten.reshape.default
        try:
            return target(*args, **kwargs)  # type: ignore[operator]
        except Exception as e:  # noqa: BLE001
            raise ChannelMapError(f"replaying {node.target}: {e}") from e
    return None


def replay_path(path: list[fx.Node], idx: torch.Tensor) -> list[Index]:
    """Index values along ``path`` (``path[0]`` is the producer output holding ``idx``)."""
    out: list[Index] = [idx]
    for prev, node in zip(path[:-1], path[1:], strict=True):
        nxt = replay(node, prev, out[-1], on_path=True)
        if nxt is None:
            raise ChannelMapError(f"{node.target} is not channel-preserving")
        out.append(nxt)
    if not isinstance(out[-1], torch.Tensor):
        raise ChannelMapError("X is not a tensor")
    return out


def replay_user(user: fx.Node, node: fx.Node, idx: Index) -> Index | None:
    """Index value of a reader ``user`` of ``node`` off the path (``None``: it uses channels)."""
    return replay(user, node, idx, on_path=False)
