"""AWQ for transformers' 3-D MoE expert weights (``use_experts_implementation`` modules).

No per-model code: experts modules are recognised by the protocol attributes the decorator
stores (``has_gate``, ``is_transposed``, ``is_concatenated``, ...) and their 3-D parameters.

Three steps, hooked into the normal convert flow (passes/convert.py):

1. **plan** (:func:`plan_experts`, after the graph groups are found). For every experts
   module whose parent (the MoE block) reads one tensor X from outside, X's producer is looked
   up in the exported graph (the same producer walk as passes/groups). If every reader of X is
   a target linear (e.g. shared experts), a linear call of a non-target weight inside the
   block (the router, kept in full precision and rescaled) or the experts module itself, one
   *MoE norm group* is formed: s folds into the producer (e.g. the post-attention norm), the
   router weight and all experts' gate_up input channels are multiplied by s (routing is
   unchanged in exact arithmetic). Graph groups of X (e.g. a fallback group of the shared
   experts) are taken over by it.
2. **search** (:func:`search_experts`, one extra replay of the search sample): the MoE norm
   group's s is searched on the MoE block's output with all experts' gate_up (and the other
   consumers) fake-quantized; then for each expert e, on the tokens routed to e only, the
   scale of its up -> down pair (fold 1/s into expert e's up rows, s into down_proj[e]'s
   input columns: exact because ``_apply_gate`` is linear in the up half, which is checked
   numerically per module) with the loss on expert e's down output, and per-group clipping
   of both of e's weights. Experts that receive no calibration tokens fall back to the
   statistics of the whole block: their search and clipping run on all of the block's
   tokens (as if every token were routed to them); the report counts and names them.
3. **apply** (:func:`quantize_experts`): fold, clip and store each 3-D weight as an
   3-D :class:`~awq_ao.lowering.int4_tensor.Int4WeightTensor`; the module's forward switches
   to the ``"awq_ao_int4"`` experts implementation through a per-module config copy. Every
   edit goes through the convert transaction.
"""

from __future__ import annotations

import copy
import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from awq_ao.config import AWQConfig
from awq_ao.lowering.int4_experts import IMPLEMENTATION
from awq_ao.lowering.int4_tensor import Int4WeightTensor, round_scale, scale_storage_dtype
from awq_ao.lowering.packing import choose_layout
from awq_ao.lowering.quant_math import fake_quantize, quant_params
from awq_ao.observers.activation import first_tensor
from awq_ao.passes.fold import Transaction, _scale_along
from awq_ao.passes.replay import replay_call, snapshot_call
from awq_ao.passes.rounding import error_feedback_codes, full_gram, group_blocks
from awq_ao.passes.search import (
    GroupResult,
    apply_clip,
    clip_ratios,
    grid_search,
    group_gram,
    tie_mean,
    weight_2d,
    weight_mean,
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


# --------------------------------------------------------------------------------------------
# search
# --------------------------------------------------------------------------------------------


def _rows(w: torch.Tensor, transposed: bool) -> torch.Tensor:
    """A logical 3-D weight as stacked ``[E, out, in]`` slabs (a view)."""
    return w.transpose(1, 2) if transposed else w


def _fq3(w: torch.Tensor, s: torch.Tensor | None, transposed: bool, config: AWQConfig) -> torch.Tensor:
    """Fake-quantize every expert slab of ``w`` (input channels scaled by ``s`` first)."""
    r = _rows(w.detach().float(), transposed)
    e, n, k = r.shape
    flat = r.reshape(e * n, k)
    q = fake_quantize(flat * s, config.bits, config.group_size, config.zero_point) / s if s is not None else fake_quantize(
        flat, config.bits, config.group_size, config.zero_point
    )
    q = q.reshape(e, n, k)
    return (q.transpose(1, 2) if transposed else q).contiguous().to(w.dtype)


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).pow(2).mean())


def _experts_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
    names_h = ("hidden_states",)
    names_i = ("top_k_index", "router_indices", "selected_experts")
    vals = list(args)
    h = vals[0] if vals else next((kwargs[k] for k in names_h if k in kwargs), None)
    idx = vals[1] if len(vals) > 1 else next((kwargs[k] for k in names_i if k in kwargs), None)
    if not isinstance(h, torch.Tensor) or not isinstance(idx, torch.Tensor):
        return None
    return h.detach(), idx.detach()


class _ExpertsSearch:
    """Hooks for one replay: MoE norm-group search, then the per-expert search and clipping."""

    def __init__(self, root: nn.Module, plan: MoEPlan, config: AWQConfig) -> None:
        self.root = root
        self.plan = plan
        self.config = config
        self.modules = dict(root.named_modules())
        self.active = True
        self.calls: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.inspect_inputs: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}
        self.clip_inputs: dict[str, torch.Tensor] = {}
        self.group_of = {g.experts: g for g in plan.groups}

    def pre_experts(self, name: str):
        def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if self.active and name not in self.calls:
                c = _experts_call(args, kwargs)
                if c is not None:
                    self.calls[name] = c

        return hook

    def post_experts(self, name: str):
        def hook(mod: nn.Module, args: Any, kwargs: Any, out: Any) -> None:
            if self.active and name not in self.group_of and name not in self.plan.results:
                self._per_expert(name, None)

        return hook

    def pre_inspect(self, gi: int):
        def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if self.active and gi not in self.inspect_inputs:
                self.inspect_inputs[gi] = snapshot_call(args, kwargs)  # caches copied before the call mutates them

        return hook

    def post_inspect(self, gi: int):
        def hook(mod: nn.Module, args: Any, kwargs: Any, out: Any) -> None:
            g = self.plan.groups[gi]
            if not self.active or g.result is not None or gi not in self.inspect_inputs:
                return
            a, kw = self.inspect_inputs.pop(gi)
            self.active = False
            try:
                call = replay_call(mod, a, kw)
                g.result = self._search_group(g, lambda: first_tensor(call()))
                s = g.result.scales
                if g.experts not in self.plan.results:
                    self._per_expert(g.experts, s)
            finally:
                self.active = True

        return hook

    def pre_consumer(self, name: str):
        def hook(mod: nn.Module, args: tuple[Any, ...]) -> None:
            if self.active and name not in self.clip_inputs and args and isinstance(args[0], torch.Tensor):
                self.clip_inputs[name] = group_gram(args[0], self.config.group_size, self.config.clip_tokens).cpu()

        return hook

    # --- the norm group ------------------------------------------------------------------
    def _search_group(self, g: MoENormGroup, run_fn: Any) -> GroupResult:
        cfg = self.config
        info = self.plan.experts[g.experts]
        emod = self.modules[g.experts]
        call = self.calls.get(g.experts)
        if call is None:
            return GroupResult(None, note="the experts module never ran during the search")
        hs = call[0]
        x_mean = hs.reshape(-1, hs.shape[-1]).abs().float().mean(0)
        tie = None if torch.unique(g.channel_map).numel() == g.channel_map.numel() else g.channel_map
        x_mean = tie_mean(x_mean, tie)
        w_up = getattr(emod, info.up_attr)
        mods = [self.modules[c] for c in g.consumers]
        w2d = [weight_2d(m, g.consumer_is_conv1d.get(c, False)) for m, c in zip(mods, g.consumers, strict=True)]
        rows = _rows(w_up.detach().float(), info.transposed).reshape(-1, info.hidden)
        w_mean = tie_mean(weight_mean([rows, *w2d], cfg.group_size), tie) if cfg.duo_scaling else None
        saved_up = w_up.data
        saved = [m.weight.data for m in mods]
        orig = [w.detach().float() for w in w2d]

        def quantized(s: torch.Tensor | None) -> None:
            w_up.data = _fq3(saved_up, s, info.transposed, cfg)
            for m, w, c, old in zip(mods, orig, g.consumers, saved, strict=True):
                q = fake_quantize(w * s, cfg.bits, cfg.group_size, cfg.zero_point) / s if s is not None else fake_quantize(
                    w, cfg.bits, cfg.group_size, cfg.zero_point
                )
                q = q.to(old.dtype)
                m.weight.data = (q.t() if g.consumer_is_conv1d.get(c, False) else q).contiguous()

        def run() -> torch.Tensor:
            out = run_fn()
            if out is None:
                raise RuntimeError(f"module {g.inspect} returned no tensor")
            return out

        try:
            with torch.no_grad():
                ref = run()
                quantized(None)
                loss_rtn = _mse(run(), ref)
                wm = None if w_mean is None else w_mean.to(saved_up.device)

                def loss_of(s: torch.Tensor) -> float:
                    quantized(s)
                    return _mse(run(), ref)

                # the dense groups' grid search: same candidates, refine and tie rules
                best = grid_search(loss_of, (loss_rtn, None, None), x_mean.to(saved_up.device), wm, cfg.n_grid,
                                   cfg.duo_scaling, tie, refine=cfg.search_refine)
        finally:
            w_up.data = saved_up
            for m, w in zip(mods, saved, strict=True):
                m.weight.data = w
        loss, alpha, s = best
        if not math.isfinite(loss):
            raise FloatingPointError(f"the AWQ search loss of {g.inspect} is not finite")
        return GroupResult(None if s is None else s.float(), alpha, loss_rtn, loss)

    # --- one expert at a time ------------------------------------------------------------
    def _per_expert(self, name: str, s_in: torch.Tensor | None) -> None:
        cfg = self.config
        info = self.plan.experts[name]
        mod = self.modules[name]
        e_n = info.num_experts
        gptq = cfg.rounding == "gptq"
        res = ExpertsResult([0] * e_n, [None] * e_n, [None] * e_n, [None] * e_n, [None] * e_n, [None] * e_n)
        self.plan.results[name] = res
        call = self.calls.get(name)
        if call is None:
            return
        hs, idx = call
        hs = hs.reshape(-1, hs.shape[-1])
        idx = idx.reshape(hs.shape[0], -1)
        w_up = _rows(getattr(mod, info.up_attr).detach().float(), info.transposed)
        w_dn = _rows(mod.down_proj.detach().float(), info.transposed)
        b_up = getattr(mod, f"{info.up_attr}_bias", None) if info.has_bias else None
        s_in_d = None if s_in is None else s_in.to(w_up.device, torch.float32)
        with torch.no_grad():
            for e in range(e_n):
                tok = (idx == e).any(dim=-1).nonzero().squeeze(1)
                res.tokens[e] = int(tok.numel())
                # no routed token: fall back to the whole block's tokens (reported)
                xe = hs[tok].float() if tok.numel() else hs.float()
                z = xe @ w_up[e].t()
                if b_up is not None:
                    z = z + b_up[e].float()
                h = mod._apply_gate(z) if info.has_gate else mod.act_fn(z)
                s_e = None
                if cfg.scale_search and info.up_index is not None:
                    s_e = self._search_down(h, w_dn[e], res)
                # the inputs the folded weights will see: x / s_in for up, h / s_e for down
                xu = xe if s_in_d is None else xe / s_in_d
                xd = h if s_e is None else h / s_e
                hu = hd = None
                if gptq:  # error-feedback rounding needs the full Grams; clipping reads their blocks
                    hu, hd = full_gram(xu, cfg.clip_tokens), full_gram(xd, cfg.clip_tokens)
                    res.gram_up[e], res.gram_down[e] = hu.cpu(), hd.cpu()
                if cfg.clip:
                    wu = w_up[e] if s_in_d is None else w_up[e] * s_in_d
                    res.clip_up[e] = self._clip(wu, xu, hu)
                    wd = w_dn[e] if s_e is None else w_dn[e] * s_e
                    res.clip_down[e] = self._clip(wd, xd, hd)
                res.s_down[e] = s_e

    def _search_down(self, h: torch.Tensor, w: torch.Tensor, res: ExpertsResult) -> torch.Tensor | None:
        cfg = self.config
        ref = h @ w.t()
        x_mean = h.abs().mean(0)
        w_mean = weight_mean([w], cfg.group_size) if cfg.duo_scaling else None
        loss_rtn = _mse(h @ fake_quantize(w, cfg.bits, cfg.group_size, cfg.zero_point).t(), ref)

        def loss_of(s: torch.Tensor) -> float:
            return _mse((h / s) @ fake_quantize(w * s, cfg.bits, cfg.group_size, cfg.zero_point).t(), ref)

        loss, _alpha, s = grid_search(loss_of, (loss_rtn, None, None), x_mean, w_mean, cfg.n_grid, cfg.duo_scaling,
                                      refine=cfg.search_refine)
        res.loss_rtn += loss_rtn
        res.loss_best += loss
        if s is not None:
            res.scaled += 1
        return s

    def _clip(self, w: torch.Tensor, x: torch.Tensor, full: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.config
        h = group_blocks(full, cfg.group_size) if full is not None else group_gram(x, cfg.group_size, cfg.clip_tokens)
        return clip_ratios(w, h, cfg.bits, cfg.group_size, cfg.zero_point, cfg.clip_grid, cfg.max_shrink, mode=cfg.clip_mode)

    def run(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        handles = []
        try:
            for name in self.plan.experts:
                m = self.modules[name]
                handles.append(m.register_forward_pre_hook(self.pre_experts(name), with_kwargs=True))
                handles.append(m.register_forward_hook(self.post_experts(name), with_kwargs=True))
            for gi, g in enumerate(self.plan.groups):
                m = self.modules[g.inspect]
                handles.append(m.register_forward_pre_hook(self.pre_inspect(gi), with_kwargs=True))
                handles.append(m.register_forward_hook(self.post_inspect(gi), with_kwargs=True))
                if self.config.clip:
                    for c in g.consumers:
                        handles.append(self.modules[c].register_forward_pre_hook(self.pre_consumer(c)))
            with torch.no_grad():
                self.root(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()
            self.inspect_inputs.clear()
            self.calls.clear()


def search_experts(
    root: nn.Module,
    analysis: Any,
    results: dict[int, GroupResult],
    clip_inputs: dict[str, torch.Tensor],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    config: AWQConfig,
) -> None:
    """Run the experts search (one replay of ``(args, kwargs)``); nothing in the model changes.

    Each MoE norm group with linear consumers is appended to ``analysis.groups`` as a regular
    foldable group (its result in ``results``), so the normal apply folds it into the producer
    and the consumers; the router and the experts are rescaled by :func:`quantize_experts`.
    """
    plan: MoEPlan | None = getattr(analysis, "moe", None)
    if plan is None or not (config.scale_search or config.clip):
        return
    search = _ExpertsSearch(root, plan, config)
    search.run(args, kwargs)
    clip_inputs.update(search.clip_inputs)
    for g in plan.groups:
        if g.result is None:
            g.result = GroupResult(None, note="its MoE block never ran during the search")
        analysis.groups.append(as_scale_group(g))
        results[len(analysis.groups) - 1] = g.result


def as_scale_group(g: MoENormGroup) -> Any:
    """The producer/linear-consumer part of an MoE norm group as a foldable ``ScaleGroup``
    (the router and the experts are rescaled by :func:`quantize_experts`)."""
    from awq_ao.passes.groups import ScaleGroup

    return ScaleGroup(
        x_node=g.x_node, in_features=g.hidden, consumers=list(g.consumers), producer=g.producer,
        foldable=True, inspect=g.inspect, channel_map=g.channel_map, consumer_is_conv1d=dict(g.consumer_is_conv1d),
    )


# --------------------------------------------------------------------------------------------
# apply
# --------------------------------------------------------------------------------------------


def _set_param(txn: Transaction, mod: nn.Module, attr: str, value: torch.Tensor, frozen: bool = False) -> None:
    if frozen:
        txn._save(mod, attr)
        mod._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        txn.set_param(mod, attr, value)


def _error_feedback_experts(
    w: torch.Tensor, target: torch.Tensor, grams: list[torch.Tensor | None], config: AWQConfig, transposed: bool
) -> Int4WeightTensor:
    """Round each expert ``[N, K]`` slab with error feedback, as a linear's weight is rounded:
    the grid (scale, zero) of the clipped slab ``w[e]``, the codes chosen on the unclipped
    scaled slab ``target[e]`` with the expert's input Gram (RTN for an expert without one)."""
    n, k = w.shape[1:]
    layout = choose_layout(w.device, config.bits, n, k, config.group_size)
    slabs = []
    for e in range(w.shape[0]):
        w_now = w[e].contiguous()
        if grams[e] is None:
            slabs.append(Int4WeightTensor.from_float(w_now, config.bits, config.group_size, config.zero_point, layout=layout))
            continue
        gs, zs = quant_params(w_now, config.bits, config.group_size, config.zero_point)
        gs = round_scale(gs, scale_storage_dtype(w_now.dtype, layout))
        codes = error_feedback_codes(
            target[e].to(w_now.dtype), gs, zs, grams[e].to(w_now.device), config.bits, config.group_size,
            damp=config.gptq_damp, act_order=config.gptq_act_order,
        )
        slabs.append(Int4WeightTensor.from_codes(codes, gs, zs, config.bits, config.group_size, w_now.dtype, layout=layout))
    return Int4WeightTensor.from_slabs(slabs, transposed)


def quantize_experts(
    root: nn.Module,
    analysis: Any,
    config: AWQConfig,
    txn: Transaction,
    report: Any,
    prefix: str = "",
    quantize: bool = True,
) -> None:
    """Fold the experts' scales, clip, and store their 3-D weights as INT4 (RTN without a plan).

    ``quantize=False`` only folds the scales (float weights; for tests of the fold).
    """
    from awq_ao.report import GroupReport

    plan: MoEPlan | None = getattr(analysis, "moe", None) if analysis is not None else None
    if plan is None:
        experts = find_experts(root, config)
        if not experts:
            return
        plan = MoEPlan(experts)
    group_of = {g.experts: g for g in plan.groups}
    for note in plan.notes:
        report.warnings.append(prefix + note)
    for name, info in plan.experts.items():
        mod = root.get_submodule(name)
        res = plan.results.get(name)
        g = group_of.get(name)
        s_in = g.result.scales if g is not None and g.result is not None else None
        if s_in is not None:
            for pname, dim in g.rescaled_params:  # routers: kept in full precision
                owner, _, attr = pname.rpartition(".")
                pm = root.get_submodule(owner)
                txn.set_param(pm, attr, _scale_along(getattr(pm, attr), s_in, dim, divide=False))
            report.groups.append(GroupReport(
                "norm", prefix + g.producer.module if g.producer.module else None,
                [f"{prefix}{name}.{info.up_attr}"] + [prefix + p for p, _ in g.rescaled_params],
                prefix + g.inspect, g.result.alpha, g.result.loss_rtn, g.result.loss_best,
                "MoE block input: router rescaled, kept in full precision",
            ))
        w_up = getattr(mod, info.up_attr)
        w_dn = mod.down_proj
        up = _rows(w_up.detach().double(), info.transposed).clone()
        dn = _rows(w_dn.detach().double(), info.transposed).clone()
        b_attr = f"{info.up_attr}_bias"
        b_up = getattr(mod, b_attr, None) if info.has_bias else None
        new_b = None if b_up is None else b_up.detach().double().clone()
        if s_in is not None:
            up = up * s_in.to(up.device, torch.float64)
        for e in range(info.num_experts):
            s_e = res.s_down[e] if res is not None else None
            if s_e is not None and info.up_index is not None:
                s64 = s_e.to(up.device, torch.float64)
                ui = info.up_index.to(up.device)
                up[e, ui] = up[e, ui] / s64[:, None]
                if new_b is not None:
                    new_b[e, ui] = new_b[e, ui] / s64
                dn[e] = dn[e] * s64
        up_t = up.to(w_up.dtype)
        dn_t = dn.to(w_dn.dtype)
        if res is not None:
            for e in range(info.num_experts):
                if res.clip_up[e] is not None:
                    up_t[e] = apply_clip(up_t[e], res.clip_up[e], config.group_size, config.clip_mode)
                if res.clip_down[e] is not None:
                    dn_t[e] = apply_clip(dn_t[e], res.clip_down[e], config.group_size, config.clip_mode)
            if any(c is not None for c in res.clip_up):
                report.clipped += 2
        if new_b is not None and res is not None and any(s is not None for s in res.s_down):
            _set_param(txn, mod, b_attr, new_b.to(b_up.dtype))
        if not quantize:
            for attr, w in ((info.up_attr, up), ("down_proj", dn)):
                logical = w.transpose(1, 2) if info.transposed else w
                _set_param(txn, mod, attr, logical.contiguous().to(getattr(mod, attr).dtype))
            continue
        grams = {info.up_attr: res.gram_up if res is not None else [], "down_proj": res.gram_down if res is not None else []}
        for attr, w, target in ((info.up_attr, up_t, up), ("down_proj", dn_t, dn)):
            if config.rounding == "gptq" and any(g is not None for g in grams[attr]):
                q = _error_feedback_experts(w, target, grams[attr], config, info.transposed)
                report.error_feedback += info.num_experts
            else:
                logical = w.transpose(1, 2) if info.transposed else w
                q = Int4WeightTensor.from_float(logical.contiguous(), config.bits, config.group_size, config.zero_point, transposed=info.transposed)
            _set_param(txn, mod, attr, q, frozen=True)
            report.experts_quantized.append(f"{prefix}{name}.{attr}")
        cfg_copy = copy.copy(mod.config)
        cfg_copy._experts_implementation_internal = IMPLEMENTATION
        txn._save(mod, "config")
        mod.config = cfg_copy
        if res is not None:
            empty = sum(1 for t in res.tokens if t == 0)
            report.experts_no_tokens += empty
            if empty:
                report.warnings.append(
                    f"{prefix}{name}: {empty} of {info.num_experts} experts received no calibration tokens; "
                    "their scale search and clipping fell back to the statistics of the whole block "
                    "(all of the block's calibration tokens); calibrate with more or more varied data "
                    "to cover them"
                )
            rounded = "error feedback (gptq)" if any(g is not None for g in res.gram_up) else "nearest"
            note = (f"per-expert up->down: {res.scaled} scaled, {info.num_experts - res.scaled} unscaled; "
                    f"{empty} without tokens (whole-block statistics); rounded with {rounded}")
            if info.fold_note:
                note = f"{info.fold_note}; rounded with {rounded}"
            report.groups.append(GroupReport(
                "experts", f"{prefix}{name}.{info.up_attr}", [f"{prefix}{name}.down_proj"], prefix + name,
                None, res.loss_rtn if info.up_index is not None else None,
                res.loss_best if info.up_index is not None else None, note,
            ))
