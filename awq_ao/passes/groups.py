"""Scale-group discovery on the exported graph.

A *scale group* is a tensor X consumed by one or more linears. AWQ multiplies the consumers'
input channels by s and divides X by s. The division can be folded into X's producer when the
producer is per-channel affine in its output (a norm, or a linear reached through pure data
movement, attention's value path, a positively homogeneous activation or one factor of a
product) and nothing else reads the rescaled channels. Everything here works from graph
patterns; there is no per-model code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx, nn

from awq_ao.observers.attach import conv1d_class, is_quantizable
from awq_ao.passes.channel_map import ChannelMapError, channel_set, replay_path, replay_user
from awq_ao.passes.graph_utils import (
    ADD_OPS,
    ADDMM_OPS,
    AFFINE_SCALAR_OPS,
    DIV_OPS,
    IDENTITY_OPS,
    LAYER_NORM_OPS,
    LIKE_OPS,
    LINEAR_OPS,
    MATMUL_OPS,
    MUL_OPS,
    RMS_NORM_OPS,
    RSUB_OPS,
    SDPA_OPS,
    SHAPE_OPS,
    SUB_OPS,
    WEIGHT_T_OPS,
    is_op,
    meta_shape,
    owner_module,
    real_users,
    scalar_operand,
)

# Ops through which a consumer's input is still "the same tensor" (views keeping channels).
_INPUT_ALIAS_OPS = {
    torch.ops.aten.view.default,
    torch.ops.aten.reshape.default,
    torch.ops.aten._unsafe_view.default,
    torch.ops.aten.contiguous.default,
    torch.ops.aten.to.dtype,
    torch.ops.aten.to.dtype_layout,
    torch.ops.aten._to_copy.default,
}


@dataclass
class ParamFold:
    """How to divide a producer's output channels by s through one parameter.

    ``affine`` lists scalar ops (name, constant) applied to the parameter before it
    multiplies the normalised activations, e.g. Gemma's ``1 + w`` is ``[("add", 1.0)]``;
    the fold solves ``f(w') = f(w) / s``. ``dim`` is the parameter dimension holding the
    producer's output channels.
    """

    name: str
    dim: int = 0
    affine: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class Producer:
    """What computes X (``kind``: "norm", "linear" or "none") and how to fold into it."""

    kind: str
    module: str | None = None
    params: list[ParamFold] = field(default_factory=list)
    out_channels: int = 0
    path: list[str] = field(default_factory=list)


@dataclass
class ScaleGroup:
    """One AWQ scale group: consumers sharing an input X and X's producer."""

    x_node: str
    in_features: int
    consumers: list[str]
    rescaled: list[str] = field(default_factory=list)
    producer: Producer = field(default_factory=lambda: Producer("none"))
    foldable: bool = False
    reason: str = ""
    inspect: str | None = None
    channel_map: torch.Tensor | None = None  # X channel -> producer channel
    consumer_is_conv1d: dict[str, bool] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        """Short label for reports: the producer kind or "fallback"."""
        return self.producer.kind if self.foldable else "fallback"

    def tie_groups(self) -> torch.Tensor | None:
        """Class id per X channel: channels mapped to one producer channel share a scale."""
        if self.channel_map is None:
            return None
        if torch.unique(self.channel_map).numel() == self.channel_map.numel():
            return None
        return self.channel_map


@dataclass
class GraphAnalysis:
    """Result of :func:`find_groups`."""

    groups: list[ScaleGroup]
    unseen: list[str]  # targets that never appear as a linear in the graph
    qk_linears: set[str]  # linears feeding attention queries/keys (clipping is skipped)
    shared_calls: list[str]  # targets called more than once (scaling skipped)
    # targets whose weight the model also reads directly (``x @ lin.weight.T``,
    # ``lin.weight.view(...)``): the op that does, per target. A quantized weight tensor
    # must support those ops, or such layers must stay in full precision.
    direct_weight_use: dict[str, str] = field(default_factory=dict)


class _Ctx:
    def __init__(self, ep: torch.export.ExportedProgram, model: nn.Module) -> None:
        self.ep = ep
        self.graph = ep.graph
        sig = ep.graph_signature
        self.param_of: dict[str, str] = dict(sig.inputs_to_parameters)
        self.param_of.update(sig.inputs_to_buffers)
        self.modules = dict(model.named_modules())
        counts: dict[int, int] = {}
        for _, p in model.named_parameters(remove_duplicate=False):
            counts[id(p)] = counts.get(id(p), 0) + 1
        self.params = dict(model.named_parameters())
        self.param_count = {n: counts[id(p)] for n, p in self.params.items()}
        self.conv1d = conv1d_class()

    def param_name(self, node: object) -> str | None:
        if isinstance(node, fx.Node) and node.op == "placeholder":
            return self.param_of.get(node.name)
        return None

    def unshared(self, pname: str) -> bool:
        return self.param_count.get(pname, 0) == 1

    def linear_module(self, node: fx.Node) -> str | None:
        """Module name if ``node`` is a call of a quantizable module's weight: ``linear(x, W)``,
        ``addmm(b, x, W)``, or ``x @ W.T`` (a linear written as a matmul, as FalconLinear is)."""
        if is_op(node, LINEAR_OPS):
            w = node.args[1]
        elif is_op(node, ADDMM_OPS):
            w = node.args[2]
        elif (w := transposed_weight(node)) is None:
            return None
        mod = owner_module(node)
        pname = self.param_name(w)
        if mod is None or pname is None or mod not in self.modules:
            return None
        m = self.modules[mod]
        if not is_quantizable(m) or m.weight is not self.params.get(pname):
            return None
        return mod

    def linear_input(self, node: fx.Node) -> fx.Node:
        """The tensor X a linear reads, looking through channel-keeping views and casts and
        through multiplications by constants (they commute with per-channel scaling)."""
        x = node.args[1] if is_op(node, ADDMM_OPS) else node.args[0]
        assert isinstance(x, fx.Node)
        while True:
            src = _alias_source(x)
            if src is None:
                return x
            x = src


def _alias_source(node: fx.Node) -> fx.Node | None:
    """The tensor ``node`` re-expresses channel for channel (same last dim), or ``None``.

    Views/casts keep every value; ``x * c`` and ``x / c`` with a constant ``c`` scale all
    channels alike, so AWQ's per-channel scales pass through them unchanged.
    """
    if node.op != "call_function":
        return None
    src: object = None
    if node.target in _INPUT_ALIAS_OPS:
        src = node.args[0]
    else:
        sc = scalar_operand(node)
        if sc is not None:
            src = sc[0]
    if not isinstance(src, fx.Node):
        return None
    last = (meta_shape(node) or (None,))[-1]
    if last is None or (meta_shape(src) or (None,))[-1] != last:
        return None
    return src


def _affine_chain(ctx: _Ctx, node: object, channels: int) -> tuple[str, list[tuple[str, float]]] | None:
    """If ``node`` is a per-channel vector computed from one parameter by scalar-affine ops."""
    ops: list[tuple[str, float]] = []
    cur = node
    for _ in range(8):
        if not isinstance(cur, fx.Node):
            return None
        shape = meta_shape(cur)
        if shape is None or (shape and shape[-1] != channels) or any(s != 1 for s in shape[:-1]):
            return None
        pname = ctx.param_name(cur)
        if pname is not None:
            p = ctx.params.get(pname)
            if p is None or p.dim() != 1 or p.shape[0] != channels or not ctx.unshared(pname):
                return None
            if len(real_users(cur)) != 1:
                return None
            return pname, list(reversed(ops))
        if len(real_users(cur)) != 1 and cur is not node:
            return None
        if is_op(cur, IDENTITY_OPS) or is_op(cur, SHAPE_OPS):
            cur = cur.args[0]
            continue
        if is_op(cur, AFFINE_SCALAR_OPS):
            a, b = cur.args[0], cur.args[1]
            if len(cur.args) > 2 or cur.kwargs.get("alpha", 1) != 1:
                return None
            if isinstance(a, fx.Node) and isinstance(b, (int, float)):
                tensor, const, const_first = a, float(b), False
            elif isinstance(b, fx.Node) and isinstance(a, (int, float)):
                tensor, const, const_first = b, float(a), True
            else:
                return None
            if cur.target in MUL_OPS:
                if const == 0:
                    return None
                ops.append(("mul", const))
            elif cur.target in ADD_OPS:
                ops.append(("add", const))
            elif cur.target in SUB_OPS:
                ops.append(("rsub", const) if const_first else ("add", -const))
            elif cur.target in RSUB_OPS:
                ops.append(("add", -const) if const_first else ("rsub", const))
            cur = tensor
            continue
        return None
    return None


def _norm_producer(
    ctx: _Ctx, node: fx.Node, w_arg: int, b_arg: int | None, channels: int
) -> Producer | None:
    """A ``layer_norm``/``rms_norm`` call whose weight is its own 1-D parameter, possibly
    through scalar-affine ops (``F.layer_norm(x, shape, 1 + self.weight, self.bias)``),
    and whose bias (if any) is its own parameter."""

    def arg(i: int | None, kw: str) -> object:
        if i is not None and len(node.args) > i:
            return node.args[i]
        return node.kwargs.get(kw)

    w_node, b_node = arg(w_arg, "weight"), arg(b_arg, "bias")
    chain = _affine_chain(ctx, w_node, channels) if isinstance(w_node, fx.Node) else None
    if chain is None:
        return None
    w, affine = chain
    b = ctx.param_name(b_node)
    if b_node is not None:  # a computed or shared bias cannot be rescaled
        if b is None or not ctx.unshared(b) or len(real_users(b_node)) != 1:  # type: ignore[arg-type]
            return None
        pb = ctx.params.get(b)
        if pb is None or pb.dim() != 1 or pb.shape[0] != channels:
            return None
    params = [ParamFold(w, 0, affine)] + ([ParamFold(b)] if b else [])
    return Producer("norm", w.rsplit(".", 1)[0], params, channels)


def _find_producer(ctx: _Ctx, x: fx.Node) -> tuple[Producer, list[fx.Node]] | None:
    """Walk back from X through channel-preserving ops to a foldable producer.

    Norm parameters may have fewer channels than X (a per-head norm whose weight is shared
    by every head, followed by a reshape): the channel count is the producer node's own last
    dimension, and the channel map replayed later ties the X channels that share a weight.
    """

    def walk(node: fx.Node, path: list[fx.Node], depth: int) -> tuple[Producer, list[fx.Node]] | None:
        if depth > 48 or not isinstance(node, fx.Node) or node.op != "call_function":
            return None
        channels = (meta_shape(node) or (0,))[-1] if node.meta.get("val") is not None else 0
        mod = ctx.linear_module(node)
        if mod is not None:
            m = ctx.modules[mod]
            is_c1d = ctx.conv1d is not None and isinstance(m, ctx.conv1d)
            params = [ParamFold(f"{mod}.weight", dim=1 if is_c1d else 0)]
            if getattr(m, "bias", None) is not None:
                params.append(ParamFold(f"{mod}.bias", dim=0))
            if not all(ctx.unshared(p.name) for p in params):
                return None
            out_ch = int(m.weight.shape[1] if is_c1d else m.weight.shape[0])
            return Producer("linear", mod, params, out_ch), [node, *path]
        if is_op(node, LAYER_NORM_OPS) or is_op(node, RMS_NORM_OPS):
            prod = _norm_producer(ctx, node, 2, 3 if is_op(node, LAYER_NORM_OPS) else None, channels)
            return (prod, [node, *path]) if prod is not None else None
        if is_op(node, MUL_OPS) and len(node.args) == 2:
            for i in (0, 1):
                chain = _affine_chain(ctx, node.args[i], channels)
                if chain is not None and isinstance(node.args[1 - i], fx.Node):
                    pname, affine = chain
                    return (
                        Producer("norm", pname.rsplit(".", 1)[0], [ParamFold(pname, 0, affine)], channels),
                        [node, *path],
                    )
            # a product: scaling one factor by 1/s scales the product by 1/s
            for i in (1, 0):
                a = node.args[i]
                if isinstance(a, fx.Node) and meta_shape(a) == meta_shape(node):
                    r = walk(a, [node, *path], depth + 1)
                    if r is not None:
                        return r
            return None
        if is_op(node, DIV_OPS):
            sc = scalar_operand(node)  # x / c: scaling x by 1/s scales the quotient by 1/s
            return walk(sc[0], [node, *path], depth + 1) if sc is not None else None
        if is_op(node, ADD_OPS) and len(node.args) == 2 and not node.kwargs:
            # y = a * w + b with per-channel parameters w and b (a hand-written LayerNorm)
            for i in (0, 1):
                chain = _affine_chain(ctx, node.args[i], channels)
                other = node.args[1 - i]
                if chain is None or chain[1] or not isinstance(other, fx.Node):
                    continue
                inner = walk(other, [node, *path], depth + 1)
                if inner is not None and inner[0].kind == "norm" and inner[1][0] is other:
                    prod = inner[0]
                    prod.params.append(ParamFold(chain[0]))
                    return prod, inner[1]
            return None
        if is_op(node, MATMUL_OPS) and len(node.args) == 2:
            v = node.args[1]
            return walk(v, [node, *path], depth + 1) if isinstance(v, fx.Node) else None
        if is_op(node, SDPA_OPS):
            v = node.args[2]
            return walk(v, [node, *path], depth + 1) if isinstance(v, fx.Node) else None
        if is_op(node, SHAPE_OPS) or is_op(node, IDENTITY_OPS) or is_op(node, LIKE_OPS):
            a = node.args[0]
            return walk(a, [node, *path], depth + 1) if isinstance(a, fx.Node) else None
        return None

    return walk(x, [], 0)


def _consumers_of(ctx: _Ctx, x: fx.Node, linear_nodes: dict[fx.Node, str]) -> tuple[list[str], list[fx.Node]]:
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
            elif _alias_source(u) is n:
                stack.append(u)
            else:
                others.append(u)
    return mods, others


def _enclosing_module(modules: dict[str, nn.Module], names: list[str]) -> str | None:
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


def _qk_linears(ctx: _Ctx, linear_nodes: dict[fx.Node, str]) -> set[str]:
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
    ctx = _Ctx(ep, model)
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
        g.inspect = _enclosing_module(ctx.modules, consumers)
        _classify(ctx, g, x, others, rescaled)
        groups.append(g)
    return GraphAnalysis(
        groups, unseen, _qk_linears(ctx, linear_nodes), shared_calls, _direct_weight_use(ctx, targets)
    )


def transposed_weight(node: fx.Node) -> fx.Node | None:
    """``W`` if ``node`` is ``matmul(x, W.T)`` with ``W`` a graph input (a parameter)."""
    if not is_op(node, MATMUL_OPS) or len(node.args) != 2:
        return None
    wt = node.args[1]
    if not isinstance(wt, fx.Node) or not is_op(wt, WEIGHT_T_OPS):
        return None
    w = wt.args[0]
    if not isinstance(w, fx.Node) or w.op != "placeholder":
        return None
    return w


def _direct_weight_use(ctx: _Ctx, targets: list[str]) -> dict[str, str]:
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


def _classify(ctx: _Ctx, g: ScaleGroup, x: fx.Node, others: list[fx.Node], rescaled: list[str]) -> None:
    for m in rescaled:
        if not ctx.unshared(f"{m}.weight"):
            g.reason = f"{m} also reads X and shares its weight with another module"
            return
    if others:
        g.reason = f"X is also read by {others[0].target} (not a linear): it cannot be rescaled"
        return
    found = _find_producer(ctx, x)
    if found is None:
        g.reason = f"no per-channel producer for X (made by {getattr(x.target, '__name__', x.target)})"
        return
    producer, path = found
    producer.path = [n.name for n in path]
    if producer.kind == "linear" and producer.module in g.consumers + g.rescaled:
        g.reason = "X's producer consumes X itself"
        return
    try:
        cmap, sinks = _channel_flow(ctx, path, g, x)
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


def _channel_flow(
    ctx: _Ctx, path: list[fx.Node], g: ScaleGroup, x: fx.Node
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
