"""AWQ scale search and weight-clipping search.

The scale search for a group tries s = mean|x|^a (optionally divided by mean|w|^(1-a), "duo
scaling") for a in a grid over [0, 1), fake-quantizes the consumers' weights W*s, and
measures the MSE of the output of the smallest module enclosing the consumers (AutoAWQ's
"module2inspect"), with every other weight left in full precision. Everything runs in the
model's own dtype for the module call and float32 for statistics, on the model's device.

The search runs inside forward hooks during one replay of the recorded calibration sample,
so only one module's inputs are held at a time. Nothing in the model changes here: results
are returned and applied afterwards (passes/fold), which keeps a failed search harmless.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from awq_ao.config import AWQConfig
from awq_ao.lowering.quant_math import fake_quantize, fake_quantize_grouped, group_geometry
from awq_ao.observers.activation import ChannelStatsObserver, first_tensor
from awq_ao.passes.groups import GraphAnalysis, ScaleGroup
from awq_ao.passes.replay import replay_call, snapshot_call
from awq_ao.passes.rounding import full_gram, sample_tokens


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


def tie_mean(v: torch.Tensor, classes: torch.Tensor | None) -> torch.Tensor:
    """Replace each entry by the mean over entries of its class (tied scales)."""
    if classes is None:
        return v
    c = classes.to(v.device)
    n = int(c.max()) + 1
    sums = torch.zeros(n, dtype=v.dtype, device=v.device).index_add_(0, c, v)
    cnt = torch.zeros(n, dtype=v.dtype, device=v.device).index_add_(0, c, torch.ones_like(v))
    return (sums / cnt.clamp(min=1))[c]


def weight_mean(weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """Mean over output rows of |w| normalised by its group's max, per input channel."""
    k = weights[0].shape[1]
    g, _, pad = group_geometry(k, group_size)
    total = torch.zeros(k + pad, dtype=torch.float32, device=weights[0].device)
    n = 0
    for w in weights:
        for r0 in range(0, w.shape[0], 512):  # float32 temporaries of one row chunk at a time
            wa = w[r0 : r0 + 512].detach().float().abs()
            if pad:
                wa = torch.cat([wa, wa.new_zeros(wa.shape[0], pad)], dim=1)
            wg = wa.view(wa.shape[0], -1, g)
            total += (wg / (wg.amax(dim=-1, keepdim=True) + 1e-6)).sum(dim=0).view(-1)
            n += wa.shape[0]
    return total[:k] / n


def candidate_scales(
    x_mean: torch.Tensor, w_mean: torch.Tensor | None, alpha: float, tie: torch.Tensor | None
) -> torch.Tensor:
    """AWQ scale for exponent ``alpha`` (normalised so max*min == 1)."""
    if w_mean is not None:
        s = x_mean.pow(alpha) / w_mean.pow(1 - alpha).clamp(min=1e-4)
    else:
        s = x_mean.pow(alpha)
    s = s.clamp(min=1e-4)
    s = tie_mean(s, tie)
    s = s / (s.max() * s.min()).sqrt()
    return s


def scale_candidates(
    x_mean: torch.Tensor,
    w_mean: torch.Tensor | None,
    n_grid: int,
    duo_scaling: bool | str,
    tie: torch.Tensor | None = None,
):
    """Yield ``(alpha, s)`` for every candidate scale of the search grid.

    ``duo_scaling``: True uses mean|x|^a / mean|w|^(1-a), False mean|x|^a, ``"both"`` tries
    both families (2 x n_grid candidates).
    """
    if duo_scaling == "both":
        families = [w_mean, None]
    else:
        families = [w_mean if duo_scaling else None]
    for wm in families:
        for i in range(n_grid):
            alpha = i / n_grid
            yield alpha, candidate_scales(x_mean, wm, alpha, tie)


def grid_search(
    loss_of: Any,
    best: tuple[float, float | None, torch.Tensor | None],
    x_mean: torch.Tensor,
    w_mean: torch.Tensor | None,
    n_grid: int,
    duo_scaling: bool | str,
    tie: torch.Tensor | None = None,
    refine: bool = False,
) -> tuple[float, float | None, torch.Tensor | None]:
    """Minimise ``loss_of(s)`` over the candidates of :func:`scale_candidates`.

    ``best``: ``(loss, alpha, s)`` to beat (plain RTN). ``refine``: per family, try every
    second alpha of the grid, then the two grid neighbours of the best of those (13 of 21
    candidates at ``n_grid=20``); it finds the full grid's minimum wherever the loss is
    unimodal over alpha on the coarse grid's scale. Ties keep the earlier candidate.
    """
    families = [w_mean, None] if duo_scaling == "both" else [w_mean if duo_scaling else None]
    for wm in families:
        if refine and n_grid >= 4:
            coarse = list(range(0, n_grid, 2))
            losses = {i: _grid_point(loss_of, x_mean, wm, i, n_grid, tie) for i in coarse}
            j = min(coarse, key=lambda i: (losses[i][0], i))
            for i in (j - 1, j + 1):
                if 0 <= i < n_grid:
                    losses[i] = _grid_point(loss_of, x_mean, wm, i, n_grid, tie)
        else:
            losses = {i: _grid_point(loss_of, x_mean, wm, i, n_grid, tie) for i in range(n_grid)}
        for i in sorted(losses):  # grid order: ties keep the smaller alpha, as a full scan does
            loss, cand = losses[i]
            if loss < best[0]:
                best = (loss, i / n_grid, cand)
    return best


def _grid_point(
    loss_of: Any, x_mean: torch.Tensor, w_mean: torch.Tensor | None, i: int, n_grid: int, tie: torch.Tensor | None
) -> tuple[float, torch.Tensor]:
    s = candidate_scales(x_mean, w_mean, i / n_grid, tie)
    return loss_of(s), s


class _Swap:
    """Temporarily replaces the weights of the consumers (restored exactly on exit)."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.modules = modules
        self.saved = [m.weight.data for m in modules]

    def set(self, i: int, w: torch.Tensor) -> None:
        self.modules[i].weight.data = w

    def restore(self) -> None:
        for m, w in zip(self.modules, self.saved, strict=True):
            m.weight.data = w


def fake_quantize_scaled(
    w: torch.Tensor,
    s: torch.Tensor | None,
    bits: int,
    group_size: int,
    zero_point: bool,
    transpose: bool = False,
    rows_per_chunk: int = 512,
) -> torch.Tensor:
    """``Q(w * s) / s`` for ``w [N, K]`` in ``w``'s dtype (``transpose``: returned as [K, N]).

    Row chunks are computed in float32 one at a time, so the temporaries are a few chunks,
    not several float32 copies of the whole weight (a 8192 x 2048 bf16 weight would need
    ~5 x 64 MiB at once).
    """
    n = w.shape[0]
    out = torch.empty(w.shape[::-1] if transpose else w.shape, dtype=w.dtype, device=w.device)
    sf = None if s is None else s.to(w.device, torch.float32)
    for r0 in range(0, n, rows_per_chunk):
        wc = w[r0 : r0 + rows_per_chunk].float()
        if sf is None:
            q = fake_quantize(wc, bits, group_size, zero_point)
        else:
            q = fake_quantize(wc * sf, bits, group_size, zero_point) / sf
        if transpose:
            out[:, r0 : r0 + rows_per_chunk] = q.t()
        else:
            out[r0 : r0 + rows_per_chunk] = q
    return out


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).pow(2).mean())


def gram_output_mse(
    weights: list[torch.Tensor],
    s: torch.Tensor | None,
    gram: torch.Tensor,
    bits: int,
    group_size: int,
    zero_point: bool,
    rows_per_chunk: int = 512,
) -> float:
    """Mean squared output error of linears sharing one input, from the input's Gram.

    For weights ``w [N, K]`` reading ``x [T, K]`` with ``gram = x^T x / T``, the error of
    ``Q(w * s) / s`` over the tokens and all outputs is ``sum_n d_n gram d_n^T / sum N``
    (``d = Q(w*s)/s - w``): what the direct search measures as the MSE of ``x @ d^T``, at
    ``N K^2`` instead of ``T N K`` multiply-adds per candidate.
    """
    total, rows = 0.0, 0
    h = gram.to(weights[0].device)
    for w in weights:
        for r0 in range(0, w.shape[0], rows_per_chunk):
            wc = w[r0 : r0 + rows_per_chunk]
            d = fake_quantize_scaled(wc, s, bits, group_size, zero_point).to(h.dtype) - wc.to(h.dtype)
            total += float(((d @ h) * d).sum())
        rows += w.shape[0]
    return total / max(rows, 1)


def use_gram_loss(tokens: int, k: int, rows: int, candidates: int, have_gram: bool) -> bool:
    """Whether the Gram form of a direct group's loss costs fewer multiply-adds."""
    direct = candidates * tokens * rows * k
    gram = candidates * rows * k * k + (0 if have_gram else tokens * k * k)
    return gram < direct


def _module_loss(search_loss: str, g: ScaleGroup, qk_linears: set[str]) -> bool:
    """Whether group ``g`` is scored on its enclosing module's output (see ``search_loss``)."""
    if search_loss == "attention":
        return bool(set(g.consumers) & qk_linears)
    return search_loss == "module"


class ScaleSearch:
    """Runs the scale search for every group during one forward of the search sample."""

    def __init__(
        self,
        model: nn.Module,
        analysis: GraphAnalysis,
        observers: dict[str, ChannelStatsObserver],
        config: AWQConfig,
        on_group: Any = None,
    ) -> None:
        self.model = model
        self.analysis = analysis
        self.observers = observers
        self.config = config
        self.modules = dict(model.named_modules())
        self.results: dict[int, GroupResult] = {}
        # consumer -> group Gram [G, g, g], or the full Gram [K, K] for rounding="gptq"
        self.clip_inputs: dict[str, torch.Tensor] = {}
        self._last_gram: tuple[torch.Tensor, torch.Tensor] | None = None
        self.active = True
        self.on_group = on_group  # called with each searched group (progress)
        self._inputs: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}
        self._by_inspect: dict[str, list[int]] = {}
        self._direct: dict[str, list[int]] = {}
        for i, g in enumerate(analysis.groups):
            if not g.consumers:
                continue
            if g.inspect is None or not _module_loss(config.search_loss, g, analysis.qk_linears):
                self._direct.setdefault(g.consumers[0], []).append(i)
            else:
                self._by_inspect.setdefault(g.inspect, []).append(i)

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
            for gi in self._by_inspect.get(name, []):
                if gi not in self.results:
                    self._run_group(gi, replay_call(module, a, kw), x)
            self._inputs[name] = ((), {})  # free the activations; keep the "seen" marker

        return hook

    def _pre_consumer(self, name: str):
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if not self.active or not args or not isinstance(args[0], torch.Tensor):
                return
            x = args[0]
            if name not in self.clip_inputs and self.config.rounding == "gptq":
                # the full Gram: error-feedback rounding needs it, clipping reads its diagonal
                # blocks; linears reading the same tensor (q/k/v, gate/up) share one
                if self._last_gram is None or self._last_gram[0] is not x:
                    self._last_gram = (x, full_gram(x, self.config.clip_tokens).cpu())
                self.clip_inputs[name] = self._last_gram[1]
            elif name not in self.clip_inputs and self.config.clip:
                self.clip_inputs[name] = group_gram(x, self.config.group_size, self.config.clip_tokens).cpu()
            for gi in self._direct.get(name, []):
                if gi not in self.results:
                    self._run_group(gi, None, x)

        return hook

    # --- search ------------------------------------------------------------------------
    def _run_group(self, gi: int, call: Any, x: torch.Tensor | None = None) -> None:
        g = self.analysis.groups[gi]
        self.active = False
        try:
            self.results[gi] = self._search(g, call, x)
        finally:
            self.active = True
            if self.on_group is not None:
                self.on_group(g)

    def _search(self, g: ScaleGroup, call: Any, x: torch.Tensor | None) -> GroupResult:
        cfg = self.config
        if not cfg.scale_search:
            return GroupResult(None)
        if not g.foldable and cfg.fallback == "skip":
            return GroupResult(None, note="not foldable; left unscaled (fallback='skip')")
        obs = self.observers.get(g.consumers[0])
        xm = obs.mean_abs() if obs is not None else None
        if xm is None:
            return GroupResult(None, note="no calibration activations reached this group")
        mods = [self.modules[c] for c in g.consumers]
        conv = [g.consumer_is_conv1d.get(c, False) for c in g.consumers]
        dev = mods[0].weight.device
        tie = g.tie_groups()
        x_mean = tie_mean(xm.to(dev, torch.float32), tie)
        w2d = [weight_2d(m, c) for m, c in zip(mods, conv, strict=True)]
        w_mean = tie_mean(weight_mean(w2d, cfg.group_size), tie) if cfg.duo_scaling else None
        swap = _Swap(mods)
        orig = [w.detach() for w in w2d]

        def quantized(s: torch.Tensor | None) -> None:
            for i, (w, c) in enumerate(zip(orig, conv, strict=True)):
                swap.set(i, fake_quantize_scaled(w, s, cfg.bits, cfg.group_size, cfg.zero_point, c))

        gram = None
        if x is not None and (call is None or g.consumers == [g.inspect]):
            # the loss is the consumers' own output error: cheaper through their input's Gram
            gram = self._direct_gram(g.consumers[0], x, sum(w.shape[0] for w in orig))
        if call is None:
            assert x is not None

            def run() -> torch.Tensor:
                return torch.cat([m(x).flatten() for m in mods])
        else:

            def run() -> torch.Tensor:
                out = first_tensor(call())
                if out is None:
                    raise RuntimeError(f"module {g.inspect} returned no tensor")
                return out

        try:
            with torch.no_grad():
                ref = run()
                if not torch.isfinite(ref).all():
                    raise FloatingPointError(
                        f"the output of {g.inspect or g.consumers[0]} contains NaN/Inf on the "
                        "calibration sample; check the model in full precision first."
                    )

                def loss_of(s: torch.Tensor | None) -> float:
                    if gram is not None:  # a direct group: the same MSE through the input's Gram
                        return gram_output_mse(orig, s, gram, cfg.bits, cfg.group_size, cfg.zero_point)
                    quantized(s)
                    return _mse(run(), ref)

                loss_rtn = loss_of(None)
                # s = 1 (plain RTN) is a candidate too: the search never does worse than RTN
                best = grid_search(loss_of, (loss_rtn, None, None), x_mean, w_mean, cfg.n_grid,
                                   cfg.duo_scaling, tie, refine=cfg.search_refine)
        finally:
            swap.restore()
        loss, alpha, s = best
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"the AWQ search loss of {g.inspect or g.consumers[0]} is not finite"
            )
        if s is None:
            return GroupResult(None, None, loss_rtn, loss_rtn)
        return GroupResult(s.float(), alpha, loss_rtn, loss)

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
        try:
            for name in self._by_inspect:
                m = self.modules[name]
                handles.append(m.register_forward_pre_hook(self._pre_inspect(name), with_kwargs=True))
                handles.append(m.register_forward_hook(self._post_inspect(name), with_kwargs=True))
            names = {c for g in self.analysis.groups for c in g.consumers}
            for name in sorted(names):
                handles.append(self.modules[name].register_forward_pre_hook(self._pre_consumer(name)))
            with torch.no_grad():
                self.model(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()
            self._inputs.clear()
            self._last_gram = None
        return self.results


def _clip_bounds(wg: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group clipping bounds at ratio 1 for grouped weights ``[n, G, g]``.

    ``"symmetric"`` (AutoAWQ): ±max|w|. ``"range"`` and ``"asymmetric"``: [min(w, 0),
    max(w, 0)], so shrinking moves the ends of an asymmetric group's range toward 0.
    """
    if mode == "symmetric":
        amax = wg.abs().amax(dim=-1)
        return -amax, amax
    return wg.amin(dim=-1).clamp(max=0), wg.amax(dim=-1).clamp(min=0)


def _expand(v: torch.Tensor, g: int, k: int) -> torch.Tensor:
    return v.repeat_interleave(g, dim=1)[:, :k]


def group_gram(x: torch.Tensor, group_size: int, max_tokens: int | None = None) -> torch.Tensor:
    """Per-group second moments ``[G, g, g]`` of activations ``x [..., K]`` (float32).

    ``H[j] = X_j^T X_j / T`` for the columns of group ``j`` (the last, ragged group is padded
    with zeros). The clipping error of a weight change ``d`` in group ``j`` averaged over the
    tokens is ``d^T H[j] d``, so the search needs only these ``K x g`` numbers instead of the
    tokens themselves: cheaper to keep and, for T > g, cheaper to evaluate. ``max_tokens``
    evenly subsamples the tokens first.
    """
    x2 = sample_tokens(x, max_tokens)
    t, k = x2.shape
    g, groups, pad = group_geometry(k, group_size)
    xf = x2.float()
    if pad:
        xf = torch.cat([xf, xf.new_zeros(t, pad)], dim=1)
    xg = xf.view(t, groups, g).permute(1, 0, 2)  # [G, T, g]
    return torch.bmm(xg.transpose(1, 2), xg) / max(t, 1)


def scale_gram(h: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The Gram of ``x / s`` from the Gram ``h [G, g, g]`` of ``x`` (``s``: [K] scales)."""
    groups, g, _ = h.shape
    sp = s.to(h.device, torch.float32)
    pad = groups * g - sp.numel()
    if pad:
        sp = torch.cat([sp, sp.new_ones(pad)])
    inv = (1.0 / sp).view(groups, g)
    return h * inv[:, :, None] * inv[:, None, :]


def _gram_error(d: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Mean squared partial-output error ``[n, G]`` of group weight errors ``d [n, G, g]``."""
    dt = d.permute(1, 0, 2)  # [G, n, g]
    return (torch.bmm(dt, h) * dt).sum(dim=-1).t()


def clip_ratios(
    w: torch.Tensor,
    x: torch.Tensor,
    bits: int,
    group_size: int,
    zero_point: bool,
    grid: int = 20,
    max_shrink: float = 0.5,
    rows_per_chunk: int = 256,
    mode: str = "range",
) -> torch.Tensor:
    """Best per-(row, group) clipping ratios for the bounds of :func:`_clip_bounds`.

    Minimises the mean squared error of each group's partial output x_g · w_g over the
    sample ``x``: tokens ``[T, K]`` or their per-group Gram ``[G, g, g]`` from
    :func:`group_gram` (the error is evaluated through the Gram either way). Ratios lie in
    (1 - max_shrink, 1]. Returns ``[N, G, 2]`` float32 ratios for the (lower, upper) bound:
    equal for ``"range"``/``"symmetric"`` (one ratio searched); for ``"asymmetric"`` the
    common ratio is refined by a search of the lower bound's ratio (upper fixed), then the
    upper bound's (lower fixed), which can only lower the error. Rows are searched in chunks
    of ``rows_per_chunk`` (their temporaries stay in cache).
    """
    n, k = w.shape
    g, groups, pad = group_geometry(k, group_size)
    h = x.to(w.device, torch.float32) if x.dim() == 3 else group_gram(x.to(w.device), group_size)
    if h.shape != (groups, g, g):
        raise ValueError(f"clip_ratios: Gram of shape {tuple(h.shape)} does not fit weight {tuple(w.shape)}")
    steps = max(1, int(max_shrink * grid))
    cand = [1.0 - i / grid for i in range(steps)]
    ratios = torch.ones(n, groups, 2, device=w.device)
    chunk = rows_per_chunk
    for r0 in range(0, n, chunk):
        wc = w[r0 : r0 + chunk].float()
        nc = wc.shape[0]
        # zero padding: the clamp keeps it 0 (the bounds include 0), so it adds no error
        wg = (torch.cat([wc, wc.new_zeros(nc, pad)], dim=1) if pad else wc).view(nc, groups, g)
        lo, hi = _clip_bounds(wg, mode)  # [n, G]

        best_err = torch.full((nc, groups), math.inf, device=w.device)
        best_lo = torch.ones(nc, groups, device=w.device)
        best_hi = torch.ones(nc, groups, device=w.device)
        passes = ("both", "lo", "hi") if mode == "asymmetric" else ("both",)
        for which in passes:
            base_lo, base_hi = best_lo.clone(), best_hi.clone()
            for r in cand:
                full = torch.full_like(best_lo, r)
                r_lo = base_lo if which == "hi" else full
                r_hi = base_hi if which == "lo" else full
                clamped = torch.minimum(torch.maximum(wg, (lo * r_lo).unsqueeze(-1)), (hi * r_hi).unsqueeze(-1))
                err = _gram_error(fake_quantize_grouped(clamped, bits, zero_point) - wg, h)
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_lo = torch.where(better, r_lo, best_lo)
                best_hi = torch.where(better, r_hi, best_hi)
        ratios[r0 : r0 + nc, :, 0] = best_lo
        ratios[r0 : r0 + nc, :, 1] = best_hi
    return ratios


def apply_clip(
    w: torch.Tensor, ratios: torch.Tensor, group_size: int, mode: str = "range", rows_per_chunk: int = 512
) -> torch.Tensor:
    """Clamp ``w [N, K]`` to ratio × the group's bounds (returns a new tensor, same dtype).

    ``ratios`` is ``[N, G]`` (one ratio for both bounds) or ``[N, G, 2]`` (lower, upper).
    """
    n, k = w.shape
    g, _, pad = group_geometry(k, group_size)
    r = ratios.to(w.device)
    r_lo, r_hi = (r[..., 0], r[..., 1]) if r.dim() == 3 else (r, r)
    out = torch.empty_like(w)
    for r0 in range(0, n, rows_per_chunk):  # float32 temporaries of one chunk at a time
        rows = slice(r0, r0 + rows_per_chunk)
        wf = w[rows].float()
        wp = torch.cat([wf, wf.new_zeros(wf.shape[0], pad)], dim=1) if pad else wf
        lo, hi = _clip_bounds(wp.view(wf.shape[0], -1, g), mode)
        out[rows] = torch.minimum(torch.maximum(wf, _expand(lo * r_lo[rows], g, k)), _expand(hi * r_hi[rows], g, k))
    return out

