"""The MoE experts search: data only, the model is left as it was (step 2 of :mod:`awq_ao.passes.experts`)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from awq_ao.config import AWQConfig
from awq_ao.lowering.quant_math import fake_quantize
from awq_ao.observers.activation import first_tensor
from awq_ao.passes.experts import ExpertsResult, MoENormGroup, MoEPlan, as_scale_group, expert_rows
from awq_ao.passes.replay import replay_call, snapshot_call
from awq_ao.passes.rounding import full_gram, group_blocks
from awq_ao.passes.search import (
    GroupResult,
    clip_ratios,
    grid_search,
    group_gram,
    tie_mean,
    weight_2d,
    weight_mean,
)

# --------------------------------------------------------------------------------------------
# search
# --------------------------------------------------------------------------------------------


def _fq3(w: torch.Tensor, s: torch.Tensor | None, transposed: bool, config: AWQConfig) -> torch.Tensor:
    """Fake-quantize every expert slab of ``w`` (input channels scaled by ``s`` first)."""
    r = expert_rows(w.detach().float(), transposed)
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
        rows = expert_rows(w_up.detach().float(), info.transposed).reshape(-1, info.hidden)
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
        w_up = expert_rows(getattr(mod, info.up_attr).detach().float(), info.transposed)
        w_dn = expert_rows(mod.down_proj.detach().float(), info.transposed)
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
