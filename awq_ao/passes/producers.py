"""Finding the producer of a scale group's input X: walking back from X through
channel-preserving ops to a norm (including scalar-affine weights such as Gemma's ``1 + w`` and
hand-written norms) or a linear whose output channels 1/s can be folded into."""

from __future__ import annotations

from torch import fx

from awq_ao.passes.graph_context import GraphContext
from awq_ao.passes.graph_utils import (
    ADD_OPS,
    AFFINE_SCALAR_OPS,
    DIV_OPS,
    IDENTITY_OPS,
    LAYER_NORM_OPS,
    LIKE_OPS,
    MATMUL_OPS,
    MUL_OPS,
    RMS_NORM_OPS,
    RSUB_OPS,
    SDPA_OPS,
    SHAPE_OPS,
    SUB_OPS,
    is_op,
    meta_shape,
    real_users,
    scalar_operand,
)
from awq_ao.passes.group_types import ParamFold, Producer


def _affine_chain(ctx: GraphContext, node: object, channels: int) -> tuple[str, list[tuple[str, float]]] | None:
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
    ctx: GraphContext, node: fx.Node, w_arg: int, b_arg: int | None, channels: int
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


def find_producer(ctx: GraphContext, x: fx.Node) -> tuple[Producer, list[fx.Node]] | None:
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
