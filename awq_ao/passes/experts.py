"""AWQ for transformers' 3-D MoE expert weights (``use_experts_implementation`` modules).

No per-model code: experts modules are recognised by the protocol attributes the decorator
stores (``has_gate``, ``is_transposed``, ``is_concatenated``, ...) and their 3-D parameters.

Experts are one more kind of scale-group consumer (:class:`~awq_ao.passes.group_types.ExpertSlabs`),
so the one pipeline (passes/pipeline.py) searches, folds, clips and rounds them with the
dense groups' code, and every option (``rounding``, ``search_refine``, the screen, the clip
modes) means the same for them:

1. **plan** (:func:`plan_experts`, this module, in the group pass). For every experts module
   whose parent (the MoE block) reads one tensor X from outside, X's producer is looked up in
   the exported graph (the same producer walk as passes/groups). If every reader of X is a
   target linear (e.g. shared experts), a linear call of a non-target weight inside the block
   (the router, kept in full precision and rescaled) or the experts module itself, one *MoE
   block input* group is formed: s folds into the producer (e.g. the post-attention norm),
   the router weight and all experts' gate_up input channels are multiplied by s (routing is
   unchanged in exact arithmetic). Where ``_apply_gate`` is linear in the up half (checked
   numerically per module), each expert also gets an *up -> down* group: 1/s folds into its
   up rows, s into its down slab's input columns.
2. **search** (:class:`~awq_ao.passes.search.ScaleSearch`, with
   :mod:`~awq_ao.passes.experts_search` for the experts' inputs): the MoE block input's scale
   on the block's output with every expert's gate_up fake-quantized (screened like any
   module-scored group); each expert's up -> down scale on its own down output over the
   tokens routed to it, through its input's Gram (like a linear's own-output loss). The
   experts' input Grams (each expert's routed tokens in every kept row, as for linears) are
   kept for clipping and rounding. Experts that receive no calibration tokens in the search
   rows are searched on the statistics of the whole block (as if every token were routed to
   them); the report counts and names them.
3. **apply** (:mod:`~awq_ao.passes.experts_apply`): fold, then clip and round each expert's
   slab with the linears' code (the slab's Gram scaled by its scale), store each 3-D weight
   as a 3-D :class:`~awq_ao.lowering.int4_tensor.Int4WeightTensor` and switch the module's
   forward to the ``"awq_ao_int4"`` experts implementation through a per-module config copy.
   Every edit goes through the convert transaction.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from awq_ao.config import AWQConfig
from awq_ao.lowering.int4_tensor import Int4WeightTensor
from awq_ao.passes.group_types import ExpertSlabs, Producer, ScaleGroup

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
# plan: the experts' scale groups, next to the graph's groups
# --------------------------------------------------------------------------------------------


def _inside(owner: str | None, prefix: str) -> bool:
    return owner is not None and (owner == prefix or owner.startswith(prefix + "."))


def plan_experts(ep: Any, root: nn.Module, analysis: Any, targets: list[str], config: AWQConfig) -> list[ScaleGroup]:
    """Add the experts of ``root`` and their scale groups to ``analysis`` (the group pass).

    Sets ``analysis.experts`` (the experts modules to quantize) and, with the scale search
    on, appends to ``analysis.groups`` for every experts module:

    * its *MoE block input* group, where the graph allows one (``ep`` given and the scale
      search on): X's producer (e.g. the post-attention norm) folds 1/s, every expert's
      gate_up and the linears reading X are the consumers, the router is rescaled. Graph
      groups of the same X (e.g. a fallback group of the shared experts) are taken over by it.
    * one *up -> down* group per expert, where ``_apply_gate`` is linear in the up half:
      1/s folds into expert e's up rows, s into its down slab's input columns.

    Where a group cannot be formed, the reason is added to ``analysis.notes``. Returns the
    appended groups.
    """
    experts = find_experts(root, config)
    analysis.experts = experts
    added: list[ScaleGroup] = []
    if not experts or not config.scale_search:
        return added
    ctx = linear_nodes = None
    if ep is not None:
        from awq_ao.passes.graph_context import GraphContext

        ctx = GraphContext(ep, root)
        linear_nodes = {n: m for n in ctx.graph.nodes if (m := ctx.linear_module(n)) is not None}
    direct = set(getattr(analysis, "direct_weight_use", {}) or {})
    for name, info in experts.items():
        if ctx is not None:
            try:
                g = _norm_group(ctx, root, name, info, linear_nodes, set(targets), direct)
            except Exception as e:  # noqa: BLE001 - analysis failure only costs the fold
                g = f"graph analysis failed ({type(e).__name__}: {e})"
            if isinstance(g, str):
                analysis.notes.append(f"{name}: input scales not searched: {g}")
            else:
                analysis.groups = [x for x in analysis.groups if x.x_node != g.x_node]
                added.append(g)
        if info.up_index is not None:
            for e in range(info.num_experts):
                slab = ExpertSlabs(name, "down_proj", info.transposed, e)
                added.append(ScaleGroup(
                    x_node=slab.key(e), in_features=info.inter, consumers=[], slabs=[slab],
                    producer=Producer("experts_up", name, out_channels=info.up_out), foldable=True,
                ))
    analysis.groups.extend(added)
    return added


def _norm_group(
    ctx: Any, root: nn.Module, name: str, info: ExpertsInfo, linear_nodes: dict[Any, str], targets: set[str], direct: set[str]
) -> ScaleGroup | str:
    from torch import fx

    from awq_ao.passes.graph_context import INPUT_ALIAS_OPS, alias_source
    from awq_ao.passes.graph_utils import LINEAR_OPS, is_op, meta_shape, owner_module, real_users
    from awq_ao.passes.groups import channel_flow, enclosing_module
    from awq_ao.passes.producers import find_producer

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
                    while (src := alias_source(a)) is not None:
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
            elif alias_source(u) is n:
                stack.append(u)
            elif _inside(owner_module(u), name):
                reaches_experts = True
            elif is_op(u, LINEAR_OPS) and u.args[0] is n and _inside(owner_module(u), block):
                w = u.args[1]
                while isinstance(w, fx.Node) and w.op == "call_function" and w.target in INPUT_ALIAS_OPS:
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
    found = find_producer(ctx, x)
    if found is None:
        return f"no per-channel producer for X (made by {getattr(x.target, '__name__', x.target)})"
    producer, path = found
    producer.path = [n.name for n in path]
    if producer.module in consumers or any(p.startswith(f"{producer.module}.") for p, _ in rescaled):
        return "X's producer consumes X itself"
    cmap, sinks = channel_flow(ctx, path, None, x)
    used = set(cmap.tolist())
    for sink, chans in sinks:
        if used & chans:
            return f"the producer's rescaled channels also reach {sink}"
    modules = dict(root.named_modules())
    inspect = enclosing_module(modules, [block, *consumers]) or block
    c1d = {m: ctx.conv1d is not None and isinstance(ctx.modules[m], ctx.conv1d) for m in consumers}
    return ScaleGroup(
        x_node=x.name, in_features=info.hidden, consumers=consumers, producer=producer, foldable=True,
        inspect=inspect, channel_map=cmap, consumer_is_conv1d=c1d,
        slabs=[ExpertSlabs(name, info.up_attr, info.transposed)], rescaled_params=rescaled,
    )


def expert_rows(w: torch.Tensor, transposed: bool) -> torch.Tensor:
    """A logical 3-D weight as stacked ``[E, out, in]`` slabs (a view)."""
    return w.transpose(1, 2) if transposed else w
