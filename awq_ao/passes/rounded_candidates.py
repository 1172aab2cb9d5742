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
* Groups scored through their input's Gram (``v -> o``, ``up -> down``): every candidate is
  ranked by its cheap round-to-nearest loss, and the best ``keep`` of them (plus no scaling)
  are rounded and scored by ``tr((Q - W) H (Q - W)^T) / N``.

The grid is the unclipped one (clipping comes after the search, as before).
"""

from __future__ import annotations

from typing import Any

import torch

from awq_ao.lowering.quant_math import group_geometry, quant_params
from awq_ao.passes.rounding import error_feedback_codes, scale_full_gram
from awq_ao.passes.scale_grid import candidate_scales, duo_families
from awq_ao.passes.search_loss import gram_output_mse

__all__ = ["rounded_scaled", "RoundedWeights", "rounded_gram_loss", "direct_rounded_search"]


def rounded_scaled(
    weights: list[torch.Tensor], s: torch.Tensor | None, gram: torch.Tensor, config: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(Q, W, H)`` in the scaled space: ``W = [w_1; w_2; ...] * s`` (float32 ``[sum N, K]``),
    ``Q`` its error-feedback rounding on ``W``'s round-to-nearest grid, ``H`` the Gram of
    ``x / s``. The weights read one input whose Gram (unscaled) is ``gram [K, K]``."""
    w = torch.cat([t.float() for t in weights])
    h = gram.to(w.device, torch.float32)
    if s is not None:
        sf = s.to(w.device, torch.float32)
        w = w * sf
        h = scale_full_gram(h, sf)
    scale, zero = quant_params(w, config.bits, config.group_size, config.zero_point)
    codes = error_feedback_codes(w, scale, zero, h, config.bits, config.group_size, config.gptq_damp,
                                 act_order=config.gptq_act_order)
    col_group = torch.arange(w.shape[1], device=w.device) // group_geometry(w.shape[1], config.group_size).size
    q = (codes.float() - zero[:, col_group]) * scale[:, col_group]
    return q, w, h


class RoundedWeights:
    """The consumers' weights error-feedback rounded at a candidate scale, cached per candidate.

    ``weights``: the consumers' ``[N, K]`` weights (unscaled), all reading one input with the
    full Gram ``gram``; ``transpose[i]``: consumer ``i`` stores its weight ``[K, N]`` (Conv1D).
    """

    def __init__(self, weights: list[torch.Tensor], transpose: list[bool], gram: torch.Tensor, config: Any) -> None:
        self.weights, self.transpose, self.gram, self.config = weights, transpose, gram, config
        self._cache: dict[int, tuple[torch.Tensor | None, list[torch.Tensor]]] = {}

    def __call__(self, s: torch.Tensor | None) -> list[torch.Tensor]:
        """``Q(w * s) / s`` for each consumer, in its weight's dtype and storage layout."""
        hit = self._cache.get(id(s))
        if hit is not None and hit[0] is s:
            return hit[1]
        q, _, _ = rounded_scaled(self.weights, s, self.gram, self.config)
        if s is not None:
            q = q / s.to(q.device, torch.float32)
        out = []
        for part, w, t in zip(q.split([w.shape[0] for w in self.weights]), self.weights, self.transpose, strict=True):
            part = part.to(w.dtype)
            out.append(part.t().contiguous() if t else part)
        self._cache[id(s)] = (s, out)  # the scale is kept alive with its entry: ids stay unique
        return out


def rounded_gram_loss(weights: list[torch.Tensor], s: torch.Tensor | None, gram: torch.Tensor, config: Any) -> float:
    """Output MSE of the error-feedback rounded weights at scale ``s``, through the input's Gram
    (the same measure as :func:`~awq_ao.passes.search_loss.gram_output_mse`)."""
    q, w, h = rounded_scaled(weights, s, gram, config)
    d = q - w
    return float(((d @ h) * d).sum()) / max(w.shape[0], 1)


def direct_rounded_search(
    weights: list[torch.Tensor],
    gram: torch.Tensor,
    x_mean: torch.Tensor,
    w_mean: torch.Tensor | None,
    tie: torch.Tensor | None,
    config: Any,
    keep: int,
) -> tuple[tuple[float, float | None, torch.Tensor | None], float]:
    """The best ``(loss, alpha, s)`` of a Gram-scored group after error-feedback rounding, and
    the loss of no scaling.

    Every grid candidate is ranked by its round-to-nearest loss; the first ``keep`` (ties in
    grid order) and no scaling are rounded and scored. Ties keep no scaling, then grid order.
    """
    ranked: list[tuple[float, int, float, torch.Tensor]] = []
    for wm in duo_families(w_mean, config.duo_scaling):
        for i in range(config.n_grid):
            s = candidate_scales(x_mean, wm, i / config.n_grid, tie)
            loss = gram_output_mse(weights, s, gram, config.bits, config.group_size, config.zero_point)
            ranked.append((loss, len(ranked), i / config.n_grid, s))
    ranked.sort(key=lambda r: (r[0], r[1]))
    loss_none = rounded_gram_loss(weights, None, gram, config)
    best: tuple[float, float | None, torch.Tensor | None] = (loss_none, None, None)
    for _, _, alpha, s in sorted(ranked[: max(1, keep)], key=lambda r: r[1]):
        loss = rounded_gram_loss(weights, s, gram, config)
        if loss < best[0]:
            best = (loss, alpha, s)
    return best, loss_none
