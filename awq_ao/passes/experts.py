"""AWQ for transformers' 3-D MoE expert weights (``use_experts_implementation`` modules).

No per-model code: experts modules are recognised by the protocol attributes the decorator
stores (``has_gate``, ``is_transposed``, ``is_concatenated``, ...) and their 3-D parameters.

Three steps, hooked into the one pipeline (passes/pipeline.py), one module each:

1. **plan** (:func:`plan_experts`, this module, after the graph groups are found). For every experts
   module whose parent (the MoE block) reads one tensor X from outside, X's producer is looked
   up in the exported graph (the same producer walk as passes/groups). If every reader of X is
   a target linear (e.g. shared experts), a linear call of a non-target weight inside the
   block (the router, kept in full precision and rescaled) or the experts module itself, one
   *MoE norm group* is formed: s folds into the producer (e.g. the post-attention norm), the
   router weight and all experts' gate_up input channels are multiplied by s (routing is
   unchanged in exact arithmetic). Graph groups of X (e.g. a fallback group of the shared
   experts) are taken over by it.
2. **search** (:func:`~awq_ao.passes.experts_search.search_experts`, one extra replay of the search sample): the MoE norm
   group's s is searched on the MoE block's output with all experts' gate_up (and the other
   consumers) fake-quantized; then for each expert e, on the tokens routed to e only, the
   scale of its up -> down pair (fold 1/s into expert e's up rows, s into down_proj[e]'s
   input columns: exact because ``_apply_gate`` is linear in the up half, which is checked
   numerically per module) with the loss on expert e's down output, and per-group clipping
   of both of e's weights. Experts that receive no calibration tokens fall back to the
   statistics of the whole block: their search and clipping run on all of the block's
   tokens (as if every token were routed to them); the report counts and names them.
3. **apply** (:func:`~awq_ao.passes.experts_apply.quantize_experts`): fold, clip and store each 3-D weight as a
   3-D :class:`~awq_ao.lowering.int4_tensor.Int4WeightTensor`; the module's forward switches
   to the ``"awq_ao_int4"`` experts implementation through a per-module config copy. Every
   edit goes through the convert transaction.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from awq_ao.config import AWQConfig
from awq_ao.lowering.int4_tensor import Int4WeightTensor
from awq_ao.passes.search import (
    GroupResult,
)

_PROTOCOL = ("has_gate", "is_transposed", "is_concatenated")


# --------------------------------------------------------------------------------------------
# discovery
# --------------------------------------------------------------------------------------------


@dataclass
class ExpertsInfo:
    """One experts module and what the protocol says about it."""

    name: str
    up_attr: str  # "gate_up_proj" or "up_proj"
    has_gate: bool
    has_bias: bool
    transposed: bool
    num_experts: int
    hidden: int
    up_out: int  # rows of the up (or gate_up) projection
    inter: int  # down_proj input features
    up_index: torch.Tensor | None = None  # channels of the up half in gate_up's output
    fold_note: str = ""


def is_experts_module(mod: nn.Module) -> bool:
    """True for a module following transformers' experts protocol with 3-D weights."""
    if not all(hasattr(mod, a) for a in _PROTOCOL):
        return False
    up = getattr(mod, "gate_up_proj" if mod.has_gate else "up_proj", None)
    down = getattr(mod, "down_proj", None)
    return isinstance(up, torch.Tensor) and isinstance(down, torch.Tensor) and up.dim() == 3 and down.dim() == 3


def _wanted(name: str, config: AWQConfig) -> bool:
    pats = (name, f"{name}.*")
    if config.include is not None and not any(fnmatch.fnmatchcase(p, i) for p in pats for i in config.include):
        return False
    return not any(fnmatch.fnmatchcase(p, s) for p in pats for s in config.skip)


def _info(name: str, mod: nn.Module) -> ExpertsInfo:
    up_attr = "gate_up_proj" if mod.has_gate else "up_proj"
    up, down = getattr(mod, up_attr), mod.down_proj
    t = bool(mod.is_transposed)
    e, up_out, hidden = (up.shape[0], up.shape[2], up.shape[1]) if t else tuple(up.shape)
    inter = down.shape[1] if t else down.shape[2]
    return ExpertsInfo(name, up_attr, bool(mod.has_gate), bool(getattr(mod, "has_bias", False)), t, int(e), int(hidden), int(up_out), int(inter))


def find_experts(root: nn.Module, config: AWQConfig) -> dict[str, ExpertsInfo]:
    """Experts modules of ``root`` to quantize (float 3-D weights, honouring skip/include)."""
    out: dict[str, ExpertsInfo] = {}
    if not config.experts:
        return out
    for name, mod in root.named_modules():
        if not is_experts_module(mod) or not _wanted(name, config):
            continue
        info = _info(name, mod)
        w = getattr(mod, info.up_attr)
        if isinstance(w, Int4WeightTensor) or isinstance(mod.down_proj, Int4WeightTensor):
            continue
        if w.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64) or w.is_meta:
            continue
        info.up_index, info.fold_note = _up_channels(mod, info)
        out[name] = info
    return out


def _up_channels(mod: nn.Module, info: ExpertsInfo) -> tuple[torch.Tensor | None, str]:
    """Channels of gate_up's output that ``_apply_gate`` treats linearly (the up half).

    The per-expert up -> down fold divides those rows by s; it is exact only if
    ``_apply_gate(z with up / s) * s == _apply_gate(z)``, which is checked numerically (the
    protocol's layout first, then the other usual layouts).
    """
    if not info.has_gate:
        return None, "no gate (up_proj -> act -> down_proj): up -> down scales are not folded"
    i = info.inter
    if info.up_out != 2 * i:
        return None, "gate_up_proj is not twice down_proj's input: up -> down scales are not folded"
    concat = torch.arange(i, 2 * i)
    inter = torch.arange(1, 2 * i, 2)
    layouts = [concat, inter] if getattr(mod, "is_concatenated", True) else [inter, concat]
    layouts += [torch.arange(0, i), torch.arange(0, 2 * i, 2)]
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(16, 2 * i, generator=gen, dtype=torch.float64) * 2
    s = torch.rand(i, generator=gen, dtype=torch.float64) + 0.5
    try:
        with torch.no_grad():
            ref = mod._apply_gate(z)
            for idx in layouts:
                z2 = z.clone()
                z2[:, idx] = z2[:, idx] / s
                out = mod._apply_gate(z2) * s
                if out.shape == ref.shape and torch.allclose(out, ref, rtol=1e-9, atol=1e-12):
                    return idx, ""
    except Exception as e:  # noqa: BLE001 - a gate we cannot evaluate is just not folded
        return None, f"_apply_gate could not be checked ({type(e).__name__}): up -> down scales are not folded"
    return None, "_apply_gate is not linear in the up half: up -> down scales are not folded"


# --------------------------------------------------------------------------------------------
# plan: MoE norm groups from the exported graph
# --------------------------------------------------------------------------------------------


@dataclass
class MoENormGroup:
    """X (the MoE block input) -> router (kept FP, rescaled) + experts' gate_up + linears."""

    experts: str
    block: str
    inspect: str
    x_node: str
    hidden: int
    producer: Any  # passes.groups.Producer
    channel_map: torch.Tensor
    consumers: list[str]
    consumer_is_conv1d: dict[str, bool]
    rescaled_params: list[tuple[str, int]]  # (parameter name, input-channel dim)
    result: GroupResult | None = None


@dataclass
class ExpertsResult:
    """What the per-expert search found for one experts module."""

    tokens: list[int]
    s_down: list[torch.Tensor | None]
    clip_up: list[torch.Tensor | None]
    clip_down: list[torch.Tensor | None]
    #: rounding="gptq": each expert's input Grams (of the scaled inputs; CPU, float32)
    gram_up: list[torch.Tensor | None] = field(default_factory=list)
    gram_down: list[torch.Tensor | None] = field(default_factory=list)
    loss_rtn: float = 0.0
    loss_best: float = 0.0
    scaled: int = 0


@dataclass
class MoEPlan:
    """Experts to quantize in one root, their norm groups and (after the search) results."""

    experts: dict[str, ExpertsInfo]
    groups: list[MoENormGroup] = field(default_factory=list)
    results: dict[str, ExpertsResult] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _inside(owner: str | None, prefix: str) -> bool:
    return owner is not None and (owner == prefix or owner.startswith(prefix + "."))


def plan_experts(ep: Any, root: nn.Module, analysis: Any, targets: list[str], config: AWQConfig) -> MoEPlan | None:
    """Find the experts of ``root`` and their MoE norm groups; store the plan as ``analysis.moe``.

    Graph groups whose X is an MoE norm group's X are removed from ``analysis.groups`` (the
    MoE group takes their consumers). ``ep=None`` (hook-only mode): no norm groups.
    """
    experts = find_experts(root, config)
    plan = MoEPlan(experts) if experts else None
    if analysis is not None:
        analysis.moe = plan
    if plan is None or ep is None or not config.scale_search:
        return plan
    from awq_ao.passes.groups import _Ctx

    ctx = _Ctx(ep, root)
    linear_nodes = {n: m for n in ctx.graph.nodes if (m := ctx.linear_module(n)) is not None}
    direct = set(getattr(analysis, "direct_weight_use", {}) or {})
    for name, info in experts.items():
        try:
            g = _norm_group(ctx, root, name, info, linear_nodes, set(targets), direct)
        except Exception as e:  # noqa: BLE001 - analysis failure only costs the fold
            g = f"graph analysis failed ({type(e).__name__}: {e})"
        if isinstance(g, str):
            plan.notes.append(f"{name}: input scales not searched: {g}")
            continue
        plan.groups.append(g)
        analysis.groups = [x for x in analysis.groups if x.x_node != g.x_node]
    return plan


def _norm_group(
    ctx: Any, root: nn.Module, name: str, info: ExpertsInfo, linear_nodes: dict[Any, str], targets: set[str], direct: set[str]
) -> MoENormGroup | str:
    from torch import fx

    from awq_ao.passes.graph_utils import LINEAR_OPS, is_op, meta_shape, owner_module, real_users
    from awq_ao.passes.groups import (
        _INPUT_ALIAS_OPS,
        _alias_source,
        _channel_flow,
        _enclosing_module,
        _find_producer,
    )

    block = name.rpartition(".")[0]
    if not block:
        return "the experts module has no parent block"
    ext = set()
    for node in ctx.graph.nodes:
        if node.op != "call_function" or not _inside(owner_module(node), block):
            continue
        for a in node.all_input_nodes:
            if a.op == "call_function" and not _inside(owner_module(a), block):
                shape = meta_shape(a)
                if shape and shape[-1] == info.hidden and a.meta["val"].is_floating_point():
                    while (src := _alias_source(a)) is not None:
                        a = src
                    ext.add(a)
    if len(ext) != 1:
        return f"the MoE block reads {len(ext)} hidden-size tensors from outside"
    x = ext.pop()
    consumers: list[str] = []
    rescaled: list[tuple[str, int]] = []
    reaches_experts = False
    stack, seen = [x], set()
    while stack:
        n = stack.pop()
        for u in real_users(n):
            if u in seen:
                continue
            seen.add(u)
            if u in linear_nodes and ctx.linear_input(u) is x:
                mod = linear_nodes[u]
                if mod in direct:
                    return f"{mod} reads X and its weight is used directly"
                if mod in targets:
                    consumers.append(mod)
                else:
                    is_c1d = ctx.conv1d is not None and isinstance(ctx.modules[mod], ctx.conv1d)
                    rescaled.append((f"{mod}.weight", 0 if is_c1d else 1))
            elif _alias_source(u) is n:
                stack.append(u)
            elif _inside(owner_module(u), name):
                reaches_experts = True
            elif is_op(u, LINEAR_OPS) and u.args[0] is n and _inside(owner_module(u), block):
                w = u.args[1]
                while isinstance(w, fx.Node) and w.op == "call_function" and w.target in _INPUT_ALIAS_OPS:
                    w = w.args[0]  # a cast of the router weight (e.g. to float32)
                pname = ctx.param_name(w)
                p = ctx.params.get(pname) if pname else None
                if p is None or p.dim() != 2 or p.shape[1] != info.hidden or not ctx.unshared(pname):
                    return f"X is read by a linear of a computed or shared weight in {owner_module(u)}"
                rescaled.append((pname, 1))
            else:
                return f"X is also read by {u.target} in {owner_module(u)}"
    if not reaches_experts:
        return "the experts module does not read the block input directly"
    found = _find_producer(ctx, x)
    if found is None:
        return f"no per-channel producer for X (made by {getattr(x.target, '__name__', x.target)})"
    producer, path = found
    producer.path = [n.name for n in path]
    if producer.module in consumers or any(p.startswith(f"{producer.module}.") for p, _ in rescaled):
        return "X's producer consumes X itself"
    cmap, sinks = _channel_flow(ctx, path, None, x)
    used = set(cmap.tolist())
    for sink, chans in sinks:
        if used & chans:
            return f"the producer's rescaled channels also reach {sink}"
    modules = dict(root.named_modules())
    inspect = _enclosing_module(modules, [block, *consumers]) or block
    c1d = {m: ctx.conv1d is not None and isinstance(ctx.modules[m], ctx.conv1d) for m in consumers}
    return MoENormGroup(name, block, inspect, x.name, info.hidden, producer, cmap, consumers, c1d, rescaled)


def expert_rows(w: torch.Tensor, transposed: bool) -> torch.Tensor:
    """A logical 3-D weight as stacked ``[E, out, in]`` slabs (a view)."""
    return w.transpose(1, 2) if transposed else w


def as_scale_group(g: MoENormGroup) -> Any:
    """The producer/linear-consumer part of an MoE norm group as a foldable ``ScaleGroup``
    (the router and the experts are rescaled by
    :func:`~awq_ao.passes.experts_apply.quantize_experts`)."""
    from awq_ao.passes.groups import ScaleGroup

    return ScaleGroup(
        x_node=g.x_node, in_features=g.hidden, consumers=list(g.consumers), producer=g.producer,
        foldable=True, inspect=g.inspect, channel_map=g.channel_map, consumer_is_conv1d=dict(g.consumer_is_conv1d),
    )
