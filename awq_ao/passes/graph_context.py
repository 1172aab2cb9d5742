"""What scale-group discovery reads from an exported program: its parameters by graph input,
the quantizable linears it calls (``linear``, ``addmm`` or ``x @ W.T``), and the tensor each
linear reads, looking through channel-keeping views, casts and constant scalings."""

from __future__ import annotations

import torch
from torch import fx, nn

from awq_ao.observers.attach import conv1d_class, is_quantizable
from awq_ao.passes.graph_utils import (
    ADDMM_OPS,
    LINEAR_OPS,
    MATMUL_OPS,
    WEIGHT_T_OPS,
    is_op,
    meta_shape,
    owner_module,
    scalar_operand,
)

__all__ = ["INPUT_ALIAS_OPS", "GraphContext", "alias_source", "transposed_weight"]

# Ops through which a consumer's input is still "the same tensor" (views keeping channels).
INPUT_ALIAS_OPS = {
    torch.ops.aten.view.default,
    torch.ops.aten.reshape.default,
    torch.ops.aten._unsafe_view.default,
    torch.ops.aten.contiguous.default,
    torch.ops.aten.to.dtype,
    torch.ops.aten.to.dtype_layout,
    torch.ops.aten._to_copy.default,
}



class GraphContext:
    """The exported graph of ``model`` with lookups the group passes share: which module owns
    a linear node, a node's parameter name, whether a parameter is shared."""

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
            src = alias_source(x)
            if src is None:
                return x
            x = src


def alias_source(node: fx.Node) -> fx.Node | None:
    """The tensor ``node`` re-expresses channel for channel (same last dim), or ``None``.

    Views/casts keep every value; ``x * c`` and ``x / c`` with a constant ``c`` scale all
    channels alike, so AWQ's per-channel scales pass through them unchanged.
    """
    if node.op != "call_function":
        return None
    src: object = None
    if node.target in INPUT_ALIAS_OPS:
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
