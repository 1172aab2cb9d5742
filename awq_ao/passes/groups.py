"""Scale-group discovery on the exported graph.

A *scale group* is a tensor X consumed by one or more linears. AWQ multiplies the consumers'
input channels by s and divides X by s. The division can be folded into X's producer when the
producer is per-channel affine in its output (a norm, or a linear reached through pure data
movement, attention's value path, a positively homogeneous activation or one factor of a
product) and nothing else reads the rescaled channels. Everything here works from graph
patterns; there is no per-model code.

The pieces live in smaller modules, re-exported here: the result types in
:mod:`~awq_ao.passes.group_types`, the graph reading in :mod:`~awq_ao.passes.graph_context` and
the producer walk in :mod:`~awq_ao.passes.producers`.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from awq_ao.passes.channel_map import ChannelMapError, channel_set, replay_path, replay_user
from awq_ao.passes.graph_context import (
    GraphContext,
    alias_source,
    transposed_weight,
)
from awq_ao.passes.graph_utils import (
    ADDMM_OPS,
    LINEAR_OPS,
    SDPA_OPS,
    WEIGHT_T_OPS,
    is_op,
    meta_shape,
    real_users,
)
from awq_ao.passes.group_types import GraphAnalysis, ParamFold, Producer, ScaleGroup
from awq_ao.passes.producers import find_producer

__all__ = [
    "ParamFold",
    "Producer",
    "ScaleGroup",
    "GraphAnalysis",
    "find_groups",
    "channel_flow",
    "enclosing_module",
    "transposed_weight",
]


def _consumers_of(ctx: GraphContext, x: fx.Node, linear_nodes: dict[fx.Node, str]) -> tuple[list[str], list[fx.Node]]:
    """Linear modules reading X (through channel-keeping views) and other readers (sinks)."""
    mods: list[str] = []
    others: list[fx.Node] = []
    stack = [x]
    seen: set[fx.Node] = set()
    while stack:
        n = stack.pop()
        for u in real_users(n):
            if u in seen:
                continue
            seen.add(u)
            if u in linear_nodes and ctx.linear_input(u) is x:
                mods.append(linear_nodes[u])
            elif alias_source(u) is n:
                stack.append(u)
            else:
                others.append(u)
    return mods, others


def enclosing_module(modules: dict[str, nn.Module], names: list[str]) -> str | None:
    """Smallest callable module whose subtree holds every name (None if only the root)."""
    parts = [n.split(".") for n in names]
    common: list[str] = []
    for tokens in zip(*parts, strict=False):
        if all(t == tokens[0] for t in tokens):
            common.append(tokens[0])
        else:
            break
    while common:
        name = ".".join(common)
        mod = modules.get(name)
        if mod is not None and not isinstance(mod, (nn.ModuleList, nn.ModuleDict)):
            return name
        common.pop()
    return None


def _qk_linears(ctx: GraphContext, linear_nodes: dict[fx.Node, str]) -> set[str]:
    """Linears whose output reaches an attention's query or key argument."""
    out: set[str] = set()
    for node, mod in linear_nodes.items():
        stack, seen = [(node, 0)], set()
        while stack:
            n, d = stack.pop()
            if d > 40:
                continue
            for u in n.users:
                if is_op(u, SDPA_OPS):
                    if n in (u.args[0], u.args[1]):
                        out.add(mod)
                    continue
                if u in seen:
                    continue
                seen.add(u)
                if u in linear_nodes:
                    continue
                stack.append((u, d + 1))
    return out


def find_groups(ep: torch.export.ExportedProgram, model: nn.Module, targets: list[str]) -> GraphAnalysis:
    """Discover AWQ scale groups for ``targets`` in the exported program ``ep`` of ``model``."""
    ctx = GraphContext(ep, model)
    target_set = set(targets)
    linear_nodes: dict[fx.Node, str] = {}
    for node in ctx.graph.nodes:
        mod = ctx.linear_module(node)
        if mod is not None:
            linear_nodes[node] = mod
    calls: dict[str, int] = {}
    for mod in linear_nodes.values():
        calls[mod] = calls.get(mod, 0) + 1
    shared_calls = sorted(m for m, c in calls.items() if c > 1 and m in target_set)
    seen_mods = set(linear_nodes.values())
    unseen = [t for t in targets if t not in seen_mods]

    by_x: dict[fx.Node, list[str]] = {}
    for node, mod in linear_nodes.items():
        if mod in target_set and mod not in shared_calls:
            by_x.setdefault(ctx.linear_input(node), []).append(mod)

    groups: list[ScaleGroup] = []
    for x in by_x:
        consumers, others = _consumers_of(ctx, x, linear_nodes)
        quantized = [m for m in consumers if m in target_set and m not in shared_calls]
        rescaled = [m for m in consumers if m not in quantized]
        shape = meta_shape(x) or (0,)
        g = ScaleGroup(x_node=x.name, in_features=int(shape[-1]), consumers=quantized, rescaled=rescaled)
        g.consumer_is_conv1d = {
            m: ctx.conv1d is not None and isinstance(ctx.modules[m], ctx.conv1d) for m in consumers
        }
        g.inspect = enclosing_module(ctx.modules, consumers)
        _classify(ctx, g, x, others, rescaled)
        groups.append(g)
    return GraphAnalysis(
        groups, unseen, _qk_linears(ctx, linear_nodes), shared_calls, _direct_weight_use(ctx, targets)
    )



def _direct_weight_use(ctx: GraphContext, targets: list[str]) -> dict[str, str]:
    """Targets whose weight placeholder is read by something other than a linear call of it."""
    by_param = {f"{t}.weight": t for t in targets}
    out: dict[str, str] = {}
    for node in ctx.graph.nodes:
        pname = ctx.param_name(node)
        if pname is None or pname not in by_param:
            continue
        for u in real_users(node):
            if ctx.linear_module(u) is not None and (
                (is_op(u, LINEAR_OPS) and u.args[1] is node) or (is_op(u, ADDMM_OPS) and u.args[2] is node)
            ):
                continue
            if is_op(u, WEIGHT_T_OPS) and u.users and all(
                ctx.linear_module(m) is not None and transposed_weight(m) is node for m in real_users(u)
            ):
                continue  # x @ W.T: a linear written as a matmul
            out[by_param[pname]] = str(u.target)
            break
    return out


def _classify(ctx: GraphContext, g: ScaleGroup, x: fx.Node, others: list[fx.Node], rescaled: list[str]) -> None:
    for m in rescaled:
        if not ctx.unshared(f"{m}.weight"):
            g.reason = f"{m} also reads X and shares its weight with another module"
            return
    if others:
        g.reason = f"X is also read by {others[0].target} (not a linear): it cannot be rescaled"
        return
    found = find_producer(ctx, x)
    if found is None:
        g.reason = f"no per-channel producer for X (made by {getattr(x.target, '__name__', x.target)})"
        return
    producer, path = found
    producer.path = [n.name for n in path]
    if producer.kind == "linear" and producer.module in g.consumers + g.rescaled:
        g.reason = "X's producer consumes X itself"
        return
    try:
        cmap, sinks = channel_flow(ctx, path, g, x)
    except ChannelMapError as e:
        g.reason = f"channel map: {e}"
        return
    used = set(cmap.tolist())
    for sink, chans in sinks:
        if used & chans:
            g.reason = f"the producer's rescaled channels also reach {sink} (not rescaled)"
            return
    g.producer = producer
    g.channel_map = cmap
    g.foldable = True


def channel_flow(
    ctx: GraphContext, path: list[fx.Node], g: ScaleGroup, x: fx.Node
) -> tuple[torch.Tensor, list[tuple[str, set[int]]]]:
    """Map X channels to producer channels and list other readers of the producer's output."""
    start = path[0]
    shape = meta_shape(start)
    if shape is None:
        raise ChannelMapError("producer output has no static shape")
    idx = torch.arange(shape[-1]).expand(shape)
    idxs = replay_path(path, idx)
    sinks: list[tuple[str, set[int]]] = []
    # every reader of a tracked value other than the path must see disjoint channels
    nxt = {path[i]: path[i + 1] for i in range(len(path) - 1)}
    frontier = [(n, t) for n, t in zip(path[:-1], idxs[:-1], strict=True)]
    visited: set[fx.Node] = set(path)
    while frontier:
        node, nidx = frontier.pop()
        for u in real_users(node):
            if u is nxt.get(node) or u in visited:
                continue
            visited.add(u)
            try:
                uidx = replay_user(u, node, nidx)
            except ChannelMapError:
                uidx = None
            if uidx is None:
                sinks.append((str(u.target), channel_set(nidx)))
            else:
                frontier.append((u, uidx))
    x_idx = idxs[-1]
    c = x_idx.shape[-1]
    flat = x_idx.reshape(-1, c)
    if not bool((flat == flat[0]).all()):
        raise ChannelMapError("X channels mix producer channels across positions")
    return flat[0].clone(), sinks
