"""AWQ scale search and weight-clipping search.

The scale search for a group tries s = mean|x|^a (optionally divided by mean|w|^(1-a), "duo
scaling") for a in a grid over [0, 1), fake-quantizes the consumers' weights W*s, and
measures the MSE of the output of the smallest module enclosing the consumers (AutoAWQ's
"module2inspect"), with every other weight left in full precision. Everything runs in the
model's own dtype for the module call and float32 for statistics, on the model's device.

The search runs inside forward hooks during one replay of the recorded calibration sample,
so only one module's inputs are held at a time. Nothing in the model changes here: results
are returned and applied afterwards (passes/fold), which keeps a failed search harmless.

The candidates and the grid are in :mod:`~awq_ao.passes.scale_grid`, the losses a candidate
is scored by in :mod:`~awq_ao.passes.search_loss`, MoE experts' inputs in
:mod:`~awq_ao.passes.experts_search` and the
weight-clipping search in :mod:`~awq_ao.passes.clipping`; their public names are re-exported
here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from awq_ao.config import AWQConfig
from awq_ao.observers.activation import ChannelStatsObserver, abs_column_sums, first_tensor
from awq_ao.passes.candidate_screen import (
    screen_keep,
    screen_stages,
    screened_grid_search,
    stage_chunks,
)
from awq_ao.passes.clipping import apply_clip, clip_ratios, group_gram, scale_gram
from awq_ao.passes.experts_search import ExpertsTaps, SlabSwap, expert_slabs
from awq_ao.passes.groups import GraphAnalysis, ScaleGroup
from awq_ao.passes.replay import replay_call, snapshot_call
from awq_ao.passes.rounded_candidates import RoundedWeights, direct_rounded_search
from awq_ao.passes.rounding import full_gram
from awq_ao.passes.sample_chunks import gram_tokens, rows_of, splits_rows
from awq_ao.passes.scale_grid import (
    candidate_scales,
    duo_families,
    grid_search,
    scale_candidates,
    tie_mean,
    weight_mean,
)
from awq_ao.passes.search_loss import (
    _mse,
    _Swap,
    fake_quantize_scaled,
    gram_output_mse,
    use_gram_loss,
)

__all__ = [
    "GroupResult",
    "weight_2d",
    "tie_mean",
    "weight_mean",
    "candidate_scales",
    "scale_candidates",
    "grid_search",
    "ScaleSearch",
    # re-exported from search_loss and clipping
    "fake_quantize_scaled",
    "gram_output_mse",
    "use_gram_loss",
    "group_gram",
    "scale_gram",
    "clip_ratios",
    "apply_clip",
]



@dataclass
class GroupResult:
    """Outcome of the scale search for one group."""

    scales: torch.Tensor | None  # [in_features] float32 X-channel scales; None: unscaled
    alpha: float | None = None
    loss_rtn: float | None = None
    loss_best: float | None = None
    note: str = ""


def weight_2d(module: nn.Module, is_conv1d: bool) -> torch.Tensor:
    """The weight as [out, in] (a view for Conv1D's [in, out] storage)."""
    w = module.weight
    return w.t() if is_conv1d else w


def _module_loss(search_loss: str, g: ScaleGroup, qk_linears: set[str]) -> bool:
    """Whether group ``g`` is scored on its enclosing module's output (see ``search_loss``)."""
    if search_loss == "attention":
        return bool(set(g.consumers) & qk_linears)
    return search_loss == "module"


def _module_out(call: Any, g: ScaleGroup) -> torch.Tensor:
    out = first_tensor(call())
    if out is None:
        raise RuntimeError(f"module {g.inspect} returned no tensor")
    return out


def _sample_mean_abs(x: torch.Tensor, name: str) -> torch.Tensor:
    """Mean |x| per channel (float64) of one consumer's input in the search sample; a
    non-finite input raises ``FloatingPointError`` naming the layer (``name``: its full name)."""
    k = x.shape[-1]
    s = abs_column_sums(x, k)
    if not torch.isfinite(s).all():
        raise FloatingPointError(
            f"NaN/Inf in the input of layer {name!r} in the search sample. Check the calibration "
            "data and the model's dtype (float16 overflow is common: try bfloat16 or float32)."
        )
    return s / max(x.numel() // k, 1)


def _label(g: ScaleGroup) -> str:
    """The group's name in messages: its enclosing module, first linear or expert slab."""
    if g.inspect or g.consumers:
        return g.inspect or g.consumers[0]
    return g.slabs[0].key(g.slabs[0].index) if g.slabs else g.x_node


def _check_finite(ref: torch.Tensor, g: ScaleGroup, what: str = "the output of") -> None:
    if not torch.isfinite(ref).all():
        raise FloatingPointError(
            f"{what} {_label(g)} contains NaN/Inf on the "
            "calibration sample; check the model in full precision first."
        )


class ScaleSearch:
    """Runs the scale search for every group during one forward of the search sample.

    Module-scored groups are searched when their enclosing module returns (its call is
    replayed per candidate), direct groups when their first consumer is called, and each MoE
    expert's up -> down group when its experts module returns (on the tokens routed to it).
    Collects the consumers' input Grams (``clip_inputs``) for clipping and rounding, the
    experts' under their slab keys.
    """

    def __init__(
        self,
        model: nn.Module,
        analysis: GraphAnalysis,
        observers: dict[str, ChannelStatsObserver],
        config: AWQConfig,
        on_group: Any = None,
        prefix: str = "",
    ) -> None:
        self.model = model
        self.prefix = prefix  # the root's name in the model (layer by layer: the block's), for errors
        self.analysis = analysis
        self.observers = observers
        self.config = config
        self.modules = dict(model.named_modules())
        self.results: dict[int, GroupResult] = {}
        # consumer -> group Gram [G, g, g], or the full Gram [K, K] for rounding="gptq"
        self.clip_inputs: dict[str, torch.Tensor] = {}
        self.gram_tokens: dict[str, int] = {}  # consumer -> tokens its Gram averages over
        self._last_gram: tuple[torch.Tensor, torch.Tensor] | None = None
        # channel_stats="sample": consumer -> mean |x| per channel of its input in the sample
        self._sample_mean: dict[str, torch.Tensor] = {}
        self.active = True
        self.on_group = on_group  # called with each searched group (progress)
        self._inputs: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}
        self._by_inspect: dict[str, list[int]] = {}
        self._direct: dict[str, list[int]] = {}
        self._rows = 0  # batch rows of the replayed sample (the screen cuts its rows)
        sr = config.search_rounding
        self._search_rounding = config.rounding if sr == "auto" else sr
        self._per_expert: dict[str, dict[int, int]] = {}  # experts module -> {expert: up->down group}
        self.experts = ExpertsTaps(self.modules, getattr(analysis, "experts", {}) or {}, config)
        for i, g in enumerate(analysis.groups):
            if g.slabs and g.slabs[0].index is not None:  # one expert's up -> down pair
                self._per_expert.setdefault(g.slabs[0].module, {})[g.slabs[0].index] = i
            elif not g.searched:
                continue
            elif g.inspect is not None and (g.slabs or _module_loss(config.search_loss, g, analysis.qk_linears)):
                self._by_inspect.setdefault(g.inspect, []).append(i)  # MoE block inputs: always the block's output
            else:
                self._direct.setdefault(g.consumers[0], []).append(i)

    # --- hooks -------------------------------------------------------------------------
    def _pre_inspect(self, name: str):
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if self.active and name not in self._inputs:
                self._inputs[name] = snapshot_call(args, kwargs)  # caches copied before the call mutates them

        return hook

    def _post_inspect(self, name: str):
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            if not self.active or name not in self._inputs:
                return
            a, kw = self._inputs[name]
            x = a[0] if a and isinstance(a[0], torch.Tensor) else None
            total = self._rows

            def rows_call(start: int, stop: int) -> Any:
                return replay_call(module, *rows_of(a, kw, total, start, stop))

            can_split = total > 1 and splits_rows(a, kw, total)
            for gi in self._by_inspect.get(name, []):
                if gi not in self.results:
                    self._run_group(gi, replay_call(module, a, kw), x, rows_call if can_split else None)
            self._inputs[name] = ((), {})  # free the activations; keep the "seen" marker

        return hook

    def _pre_consumer(self, name: str):
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if not self.active or not args or not isinstance(args[0], torch.Tensor):
                return
            x = args[0]
            if self.config.channel_stats == "sample" and name not in self._sample_mean and x.numel():
                self._sample_mean[name] = _sample_mean_abs(x, self.prefix + name)
            if name not in self.clip_inputs and self.config.rounding == "gptq":
                # the full Gram: error-feedback rounding needs it, clipping reads its diagonal
                # blocks; linears reading the same tensor (q/k/v, gate/up) share one
                if self._last_gram is None or self._last_gram[0] is not x:
                    self._last_gram = (x, full_gram(x, self.config.clip_tokens).cpu())
                self.clip_inputs[name] = self._last_gram[1]
                self.gram_tokens[name] = gram_tokens(x, self.config.clip_tokens)
            elif name not in self.clip_inputs and self.config.clip:
                self.clip_inputs[name] = group_gram(x, self.config.group_size, self.config.clip_tokens).cpu()
                self.gram_tokens[name] = gram_tokens(x, self.config.clip_tokens)
            for gi in self._direct.get(name, []):
                if gi not in self.results:
                    self._run_group(gi, None, x)

        return hook

    def _pre_experts(self, name: str):
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if self.active:
                self.experts.record(name, args, kwargs)

        return hook

    def _post_experts(self, name: str):
        def hook(module: nn.Module, args: Any, kwargs: Any, out: Any) -> None:
            if not self.active or name in self.experts.tokens:
                return
            groups = self._per_expert.get(name, {})

            def on_expert(e: int, h: torch.Tensor) -> None:
                if e in groups:
                    self._run_group(groups[e], None, h)

            self.experts.per_expert(name, self.clip_inputs, self.gram_tokens, on_expert)

        return hook

    # --- search ------------------------------------------------------------------------
    def _run_group(self, gi: int, call: Any, x: torch.Tensor | None = None, rows_call: Any = None) -> None:
        g = self.analysis.groups[gi]
        self.active = False
        try:
            self.results[gi] = self._search(g, call, x, rows_call)
        finally:
            self.active = True
            if self.on_group is not None:
                self.on_group(g)

    def _search(self, g: ScaleGroup, call: Any, x: torch.Tensor | None, rows_call: Any = None) -> GroupResult:
        cfg = self.config
        if not cfg.scale_search:
            return GroupResult(None)
        if not g.foldable and cfg.fallback == "skip":
            return GroupResult(None, note="not foldable; left unscaled (fallback='skip')")
        xm = self._x_mean(g, x)
        if xm is None:
            where = "its first consumer saw no tokens in the search sample (channel_stats='sample')" \
                if cfg.channel_stats == "sample" and g.consumers else "no calibration activations reached this group"
            return GroupResult(None, note=where)
        mods = [self.modules[c] for c in g.consumers]
        conv = [g.consumer_is_conv1d.get(c, False) for c in g.consumers]
        # experts' rows as per-expert [N, K] views in the weights' dtype (no float32 copy of all experts)
        slabs = [r for sl in g.slabs for r in expert_slabs(getattr(self.modules[sl.module], sl.attr), sl)]
        tie = g.tie_groups()
        x_mean = tie_mean(xm.to((mods[0].weight if mods else slabs[0]).device, torch.float32), tie)
        w2d = [weight_2d(m, c) for m, c in zip(mods, conv, strict=True)]
        w_mean = tie_mean(weight_mean(slabs + w2d, cfg.group_size), tie) if cfg.duo_scaling else None
        swap = _Swap(mods)
        slab_swap = SlabSwap(self.modules, g.slabs, cfg) if call is not None else None
        orig = [w.detach() for w in w2d]

        rounded = self._rounded(g, orig, conv)

        def quantized(s: torch.Tensor | None) -> None:
            if slab_swap is not None:
                slab_swap.set(s)
            if rounded is not None:  # search_rounding="gptq": as convert will round them
                for i, w in enumerate(rounded(s)):
                    swap.set(i, w)
                return
            for i, (w, c) in enumerate(zip(orig, conv, strict=True)):
                swap.set(i, fake_quantize_scaled(w, s, cfg.bits, cfg.group_size, cfg.zero_point, c))

        gram = None
        if call is None and g.slabs:  # one expert's down slab: its own output error, through its input's Gram
            have = self.clip_inputs.get(g.slabs[0].key(g.slabs[0].index))  # rounding="gptq": already there
            reuse = have is not None and have.dim() == 2 and cfg.clip_tokens is None
            orig, gram = [s.float() for s in slabs], have.to(x.device) if reuse else full_gram(x)
        elif x is not None and (call is None or g.consumers == [g.inspect]):
            # the loss is the consumers' own output error: cheaper through their input's Gram
            gram = self._direct_gram(g.consumers[0], x, sum(w.shape[0] for w in orig))
        if call is None:
            assert x is not None

            def run() -> torch.Tensor:
                return torch.cat([m(x).flatten() for m in mods])
        else:

            def run() -> torch.Tensor:
                return _module_out(call, g)

        total = self._rows
        keep = screen_keep(cfg.screen_keep, rounded is not None)
        stages = screen_stages(total, cfg.screen_rows, keep) if cfg.screen_rows else []
        try:
            with torch.no_grad():
                if gram is not None and self._search_rounding == "gptq" and not g.slabs:
                    _check_finite(gram, g, "the input Gram of")
                    best, loss_rtn = direct_rounded_search(orig, gram, x_mean, w_mean, tie, cfg)
                else:
                    if rounded is not None:  # every candidate rounded up front, in batched sweeps
                        rounded.prepare([None] + [c for _, c in scale_candidates(x_mean, w_mean, cfg.n_grid,
                                                                                 cfg.duo_scaling, tie)])
                    if gram is None and call is not None and rows_call is not None and stages:
                        best, loss_rtn = self._screened(g, rows_call, total, stages, quantized, x_mean, w_mean, tie)
                    else:
                        best, loss_rtn = self._full_grid(g, run, gram, orig, quantized, x_mean, w_mean, tie)
        finally:
            swap.restore()
            if slab_swap is not None:
                slab_swap.restore()
        loss, alpha, s = best
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"the AWQ search loss of {_label(g)} is not finite"
            )
        if s is None:
            return GroupResult(None, None, loss_rtn, loss_rtn)
        return GroupResult(s.float(), alpha, loss_rtn, loss)

    def _full_grid(self, g: ScaleGroup, run: Any, gram: torch.Tensor | None, orig: list[torch.Tensor],
                   quantized: Any, x_mean: torch.Tensor, w_mean: torch.Tensor | None, tie: Any) -> tuple[Any, float]:
        """Every grid candidate scored on the whole search chunk (``refine``: a subset)."""
        cfg = self.config
        ref = run() if gram is None else None
        _check_finite(gram if ref is None else ref, g, "the input Gram of" if ref is None else "the output of")

        def loss_of(s: torch.Tensor | None) -> float:
            if gram is not None:  # a direct group: the same MSE through the input's Gram
                return gram_output_mse(orig, s, gram, cfg.bits, cfg.group_size, cfg.zero_point)
            quantized(s)
            return _mse(run(), ref)

        loss_rtn = loss_of(None)
        # s = 1 (plain RTN) is a candidate too: the search never does worse than RTN
        best = grid_search(loss_of, (loss_rtn, None, None), x_mean, w_mean, cfg.n_grid,
                           cfg.duo_scaling, tie, refine=cfg.search_refine)
        return best, loss_rtn

    def _screened(self, g: ScaleGroup, rows_call: Any, total: int, stages: list[tuple[int, int]],
                  quantized: Any, x_mean: torch.Tensor, w_mean: torch.Tensor | None, tie: Any) -> tuple[Any, float]:
        """The module loss by successive halving over row chunks (see passes/candidate_screen)."""
        cfg = self.config
        chunks = stage_chunks(total, stages)
        calls = [rows_call(a, b) for a, b in chunks]
        refs = []
        for c in calls:
            refs.append(_module_out(c, g))
            _check_finite(refs[-1], g)
        current: list[Any] = [object()]  # the scale the swapped-in weights were quantized at

        def chunk_loss(s: torch.Tensor | None, j: int) -> tuple[float, int]:
            if current[0] is not s:
                quantized(s)
                current[0] = s
            d = _module_out(calls[j], g).float() - refs[j].float()
            return float(d.pow(2).sum()), d.numel()

        parts = [chunk_loss(None, j) for j in range(len(calls))]
        loss_rtn = sum(e for e, _ in parts) / max(sum(n for _, n in parts), 1)
        ends = [(sum(1 for _, b in chunks if b <= rows), keep) for rows, keep in stages]
        families = [[candidate_scales(x_mean, wm, i / cfg.n_grid, tie) for i in range(cfg.n_grid)]
                    for wm in duo_families(w_mean, cfg.duo_scaling)]
        best = screened_grid_search(chunk_loss, len(calls), ends, (loss_rtn, None, None), families)
        return best, loss_rtn

    def _rounded(self, g: ScaleGroup, orig: list[torch.Tensor], conv: list[bool]) -> RoundedWeights | None:
        """The consumers' weights rounded with error feedback per candidate, where the search
        rounds that way (``search_rounding="gptq"``) and they read one input with a full Gram."""
        if self._search_rounding != "gptq" or not orig or g.slabs:
            return None
        grams = [self.clip_inputs.get(c) for c in g.consumers]
        if grams[0] is None or grams[0].dim() != 2 or any(h is not grams[0] for h in grams):
            return None
        return RoundedWeights(orig, conv, grams[0], self.config)

    def _x_mean(self, g: ScaleGroup, x: torch.Tensor | None) -> torch.Tensor | None:
        """Mean |x| per input channel: the consumers' input in the search sample
        (``channel_stats="sample"``) or their observer (every calibration batch), else for
        experts the search sample's (one expert's down input ``x``, or the block input)."""
        if g.consumers and self.config.channel_stats == "sample":
            got = self._sample_mean.get(g.consumers[0])
            if got is not None or not g.slabs:  # (the observers saw nothing in this mode)
                return got
        elif g.consumers:
            obs = self.observers.get(g.consumers[0])
            if obs is not None:
                return obs.mean_abs()
        if g.slabs and g.slabs[0].index is not None:
            return None if x is None else x.abs().float().mean(0)
        return self.experts.hidden_mean(g.slabs[0].module) if g.slabs else None

    def _direct_gram(self, consumer: str, x: torch.Tensor, rows: int) -> torch.Tensor | None:
        """The Gram of a direct group's input when its loss is cheaper through it (else None).

        With ``rounding="gptq"`` (and all tokens kept) the full Gram is already there.
        """
        cfg = self.config
        have = self.clip_inputs.get(consumer)
        have = have if have is not None and have.dim() == 2 and cfg.clip_tokens is None else None
        tokens, k = x.numel() // x.shape[-1], x.shape[-1]
        n_cand = cfg.n_grid * (2 if cfg.duo_scaling == "both" else 1) + 1
        if not use_gram_loss(tokens, k, rows, n_cand, have is not None):
            return None
        if have is not None:
            return have.to(x.device)
        return full_gram(x)

    def run(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[int, GroupResult]:
        """Replay the sample with search hooks attached; return results by group index."""
        handles = []
        first = first_tensor((args, kwargs))
        self._rows = first.shape[0] if first is not None and first.dim() > 1 else 0
        try:
            for name in self._by_inspect:
                m = self.modules[name]
                handles.append(m.register_forward_pre_hook(self._pre_inspect(name), with_kwargs=True))
                handles.append(m.register_forward_hook(self._post_inspect(name), with_kwargs=True))
            names = {c for g in self.analysis.groups for c in g.consumers}
            for name in sorted(names):
                handles.append(self.modules[name].register_forward_pre_hook(self._pre_consumer(name)))
            for name in self.experts.experts:
                m = self.modules[name]
                handles.append(m.register_forward_pre_hook(self._pre_experts(name), with_kwargs=True))
                handles.append(m.register_forward_hook(self._post_experts(name), with_kwargs=True))
            with torch.no_grad():
                self.model(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()
            self._inputs.clear()
            self._last_gram = None
            self.experts.calls.clear()
        return self.results
