"""The AWQ scale candidates and the grid search over them.

For a group with per-channel input magnitudes ``mean|x|`` (and, with duo scaling, the weights'
``mean|w|``), candidate ``a`` of the grid is ``s = mean|x|^a / mean|w|^(1-a)`` normalised so
that ``max(s) * min(s) == 1``; channels tied to one producer channel share their mean.
:func:`grid_search` scores the candidates with a caller's loss (the whole grid, or a coarse
grid and the best one's neighbours).
"""

from __future__ import annotations

from typing import Any

import torch

from awq_ao.lowering.quant_math import group_geometry

__all__ = ["tie_mean", "weight_mean", "candidate_scales", "scale_candidates", "duo_families", "grid_search"]


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
    for wm in duo_families(w_mean, duo_scaling):
        for i in range(n_grid):
            alpha = i / n_grid
            yield alpha, candidate_scales(x_mean, wm, alpha, tie)


def duo_families(w_mean: torch.Tensor | None, duo_scaling: bool | str) -> list[torch.Tensor | None]:
    """The weight terms of the searched scale families: with it, without it, or both."""
    return [w_mean, None] if duo_scaling == "both" else [w_mean if duo_scaling else None]


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
    for wm in duo_families(w_mean, duo_scaling):
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
