"""Scale candidates scored after error-feedback rounding, the rounding convert really applies.

The AWQ search scores each candidate scale ``s`` by the output error of the consumers'
weights quantized at that scale. With ``rounding="gptq"`` the weights are not rounded to
nearest in the end but with error feedback (:func:`awq_ao.passes.rounding.error_feedback_codes`),
which compensates part of the error that round to nearest leaves, and not the same part for
every ``s``: the scale that round to nearest likes best is not always the one that is best
after error feedback. With ``search_rounding="gptq"`` every candidate is therefore rounded the
way convert will round it (on the search chunk's input Gram, the group's round-to-nearest
grid, the same damping and column order), and scored on that.

* Groups scored on a module's output: each candidate's weights are rounded once (cached for
  the stages of the screened search) and swapped in as usual.
* Groups scored through their input's Gram (``v -> o``, ``up -> down``): every candidate (and
  no scaling) is rounded, in batched sweeps, and scored by ``tr((Q - W) H (Q - W)^T) / N``.

The grid is the unclipped one (clipping comes after the search, as before).
"""

from __future__ import annotations

from typing import Any

import torch

from awq_ao.lowering.quant_math import dequantize_codes, quant_params
from awq_ao.passes.rounding import (
    Factor,
    error_feedback_codes_batched,
    inverse_factor,
    scale_full_gram,
    scaled_factor,
)
from awq_ao.passes.scale_grid import candidate_scales, duo_families
from awq_ao.passes.search_loss import gram_output_mse

__all__ = ["rounded_scaled", "RoundedWeights", "rounded_gram_loss", "rounded_gram_losses", "direct_rounded_search"]


#: Most elements of rounded candidate weights :class:`RoundedWeights` keeps (float32: 512 MiB).
CACHE_ELEMS = 1 << 27
#: Most weight rows (all candidates together) rounded in one column sweep: each column's
#: update touches ``rows x 128`` floats, which should stay in the CPU's cache (measured: one
#: sweep of 9 x 3072 rows ran slower than 9 sweeps of 3072).
SWEEP_ROWS = 4096


def _per_sweep(weights: list[torch.Tensor]) -> int:
    return max(1, SWEEP_ROWS // max(sum(w.shape[0] for w in weights), 1))


def _key(s: torch.Tensor | None) -> bytes | None:
    return None if s is None else s.detach().float().cpu().numpy().tobytes()


def shared_base(gram: torch.Tensor, config: Any) -> Factor | None:
    """With ``gptq_shared_factor``, the unscaled Gram's ``(perm, U)`` that every candidate's
    factor is scaled from (float64 for a float64 ``gram``, else float32); else None (each
    candidate is factorized on its own)."""
    if not getattr(config, "gptq_shared_factor", False):
        return None
    return inverse_factor(gram, config.gptq_damp, config.gptq_act_order)


def rounded_scaled(
    weights: list[torch.Tensor], scales: list[torch.Tensor | None], gram: torch.Tensor, config: Any,
    base: Factor | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``[(Q, W, H)]`` per candidate scale ``s``, in the scaled space: ``W = [w_1; w_2; ...] * s``
    (float32 ``[sum N, K]``), ``Q`` its error-feedback rounding on ``W``'s round-to-nearest grid,
    ``H`` the Gram of ``x / s``. The weights read one input whose Gram (unscaled) is
    ``gram [K, K]``. The candidates are rounded in one column sweep
    (:func:`~awq_ao.passes.rounding.error_feedback_codes_batched`). ``base``: the unscaled
    Gram's factor (:func:`shared_base`) that each candidate's factor is scaled from, with
    ``gptq_shared_factor`` (computed here if not given)."""
    w0 = torch.cat([t.float() for t in weights])
    h0 = gram.to(w0.device, torch.float32)
    if base is None:
        base = shared_base(h0, config)
    ws, hs, grids = [], [], []
    for s in scales:
        w, h = w0, h0
        if s is not None:
            sf = s.to(w0.device, torch.float32)
            w, h = w0 * sf, scale_full_gram(h0, sf)
        ws.append(w)
        hs.append(h)
        grids.append(quant_params(w, config.bits, config.group_size, config.zero_point))
    rows = w0.shape[0] if len(scales) * w0.shape[0] <= SWEEP_ROWS else None  # one sweep if it fits
    factors = None if base is None else [scaled_factor(base, s) for s in scales]
    codes = error_feedback_codes_batched(ws, [p[0] for p in grids], [p[1] for p in grids], hs, config.bits,
                                         config.group_size, config.gptq_damp, rows_per_chunk=rows,
                                         act_order=config.gptq_act_order, factors=factors)
    return [(dequantize_codes(c, scale, zero, config.group_size), w, h)
            for c, (scale, zero), w, h in zip(codes, grids, ws, hs, strict=True)]


class RoundedWeights:
    """The consumers' weights error-feedback rounded at a candidate scale, cached per candidate.

    ``weights``: the consumers' ``[N, K]`` weights (unscaled), all reading one input with the
    full Gram ``gram``; ``transpose[i]``: consumer ``i`` stores its weight ``[K, N]`` (Conv1D).
    :meth:`prepare` rounds a list of candidates in batched sweeps (as many as
    :data:`CACHE_ELEMS` allows); a candidate not prepared is rounded when asked for.
    """

    def __init__(self, weights: list[torch.Tensor], transpose: list[bool], gram: torch.Tensor, config: Any) -> None:
        self.weights, self.transpose, self.gram, self.config = weights, transpose, gram, config
        self._elems = sum(w.numel() for w in weights)
        self._room = max(1, CACHE_ELEMS // max(self._elems, 1))  # candidates the cache holds
        self._cache: dict[bytes | None, list[torch.Tensor]] = {}
        self._base: Factor | None = None  # gptq_shared_factor: the unscaled factor, once

    def prepare(self, scales: list[torch.Tensor | None]) -> None:
        """Round the candidates ``scales`` (those the cache has room for) in batched sweeps."""
        todo, keys = [], set()
        for s in scales:
            k = _key(s)
            if k not in self._cache and k not in keys:
                todo.append(s)
                keys.add(k)
        todo = todo[: max(0, self._room - len(self._cache))]
        per_sweep = _per_sweep(self.weights)
        for b0 in range(0, len(todo), per_sweep):
            self._store(todo[b0 : b0 + per_sweep])

    def _store(self, scales: list[torch.Tensor | None]) -> None:
        if len(self._cache) + len(scales) > self._room:
            self._cache.clear()
        if self._base is None:
            self._base = shared_base(self.gram.to(self.weights[0].device), self.config)
        for s, (q, _, _) in zip(scales, rounded_scaled(self.weights, scales, self.gram, self.config, self._base),
                                strict=True):
            if s is not None:
                q = q / s.to(q.device, torch.float32)
            out = []
            for part, w, t in zip(q.split([w.shape[0] for w in self.weights]), self.weights, self.transpose,
                                  strict=True):
                part = part.to(w.dtype)
                out.append(part.t().contiguous() if t else part)
            self._cache[_key(s)] = out

    def __call__(self, s: torch.Tensor | None) -> list[torch.Tensor]:
        """``Q(w * s) / s`` for each consumer, in its weight's dtype and storage layout."""
        k = _key(s)
        if k not in self._cache:
            self._store([s])
        return self._cache[k]


def rounded_gram_loss(weights: list[torch.Tensor], s: torch.Tensor | None, gram: torch.Tensor, config: Any) -> float:
    """Output MSE of the error-feedback rounded weights at scale ``s``, through the input's Gram
    (the same measure as :func:`~awq_ao.passes.search_loss.gram_output_mse`)."""
    return rounded_gram_losses(weights, [s], gram, config)[0]


def rounded_gram_losses(
    weights: list[torch.Tensor], scales: list[torch.Tensor | None], gram: torch.Tensor, config: Any
) -> list[float]:
    """:func:`rounded_gram_loss` of several candidate scales, rounded in batched sweeps."""
    per_sweep = _per_sweep(weights)
    base = shared_base(gram.to(weights[0].device), config)
    out = []
    for b0 in range(0, len(scales), per_sweep):
        for q, w, h in rounded_scaled(weights, scales[b0 : b0 + per_sweep], gram, config, base):
            d = q - w
            out.append(float(((d @ h) * d).sum()) / max(w.shape[0], 1))
    return out


def direct_rounded_search(
    weights: list[torch.Tensor],
    gram: torch.Tensor,
    x_mean: torch.Tensor,
    w_mean: torch.Tensor | None,
    tie: torch.Tensor | None,
    config: Any,
    keep: int | None = None,
) -> tuple[tuple[float, float | None, torch.Tensor | None], float]:
    """The best ``(loss, alpha, s)`` of a Gram-scored group after error-feedback rounding, and
    the loss of no scaling.

    ``keep=None`` (what the search uses) rounds and scores every grid candidate; an integer
    ranks them by the round-to-nearest loss first and rounds only the best ``keep`` (ties in
    grid order; measured worse on validation, see docs/results.md). Ties keep no scaling,
    then grid order.
    """
    ranked: list[tuple[float, int, float, torch.Tensor]] = []
    for wm in duo_families(w_mean, config.duo_scaling):
        for i in range(config.n_grid):
            s = candidate_scales(x_mean, wm, i / config.n_grid, tie)
            loss = 0.0 if keep is None else gram_output_mse(weights, s, gram, config.bits, config.group_size,
                                                            config.zero_point)
            ranked.append((loss, len(ranked), i / config.n_grid, s))
    ranked.sort(key=lambda r: (r[0], r[1]))
    chosen = sorted(ranked if keep is None else ranked[: max(1, keep)], key=lambda r: r[1])
    losses = rounded_gram_losses(weights, [None] + [r[3] for r in chosen], gram, config)
    loss_none = losses[0]
    best: tuple[float, float | None, torch.Tensor | None] = (loss_none, None, None)
    for (_, _, alpha, s), loss in zip(chosen, losses[1:], strict=True):
        if loss < best[0]:
            best = (loss, alpha, s)
    return best, loss_none
