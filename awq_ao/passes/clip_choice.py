"""Choosing each row's clipping after error-feedback rounding (``clip_after_rounding``).

The clipping search (:mod:`~awq_ao.passes.clipping`) picks per-(row, group) ratios that
minimise the *round-to-nearest* error of each group's partial output. Error-feedback rounding
then chooses the codes on that grid, compensating each column's error in the columns after
it, which changes how much a shrunk range is worth. Here every linear is rounded on three
grids, clipped as searched (``t = 1``), half as much (each ratio ``1 - t (1 - r)`` at
``t = 1/2``) and not at all (``t = 0``), in one batched sweep sharing one inverse factor; the
output rows round independently given the input Gram ``H``, so each row keeps the grid whose
codes ``Q`` give the lowest ``(Q - W) H (Q - W)^T``.
"""

from __future__ import annotations

import torch

from awq_ao.lowering.quant_math import dequantize_codes
from awq_ao.passes.clipping import apply_clip, clip_ratios
from awq_ao.passes.rounding import Factor, error_feedback_codes_batched

__all__ = ["CLIP_STRENGTHS", "clip_alternatives", "row_output_error", "round_choosing_rows"]

#: the clipping strengths ``t`` tried per row, in order of preference on ties
CLIP_STRENGTHS = (1.0, 0.5, 0.0)


def clip_alternatives(w: torch.Tensor, group_gram: torch.Tensor, config: object) -> list[torch.Tensor]:
    """``w [N, K]`` clipped at each strength of :data:`CLIP_STRENGTHS` (``t = 0``: ``w`` itself)."""
    ratios = clip_ratios(w, group_gram, config.bits, config.group_size, config.zero_point,
                         config.clip_grid, config.max_shrink, mode=config.clip_mode)
    out = []
    for t in CLIP_STRENGTHS:
        out.append(w if t == 0.0 else apply_clip(w, 1.0 - t * (1.0 - ratios), config.group_size, config.clip_mode))
    return out


def row_output_error(q: torch.Tensor, w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``diag((q - w) h (q - w)^T)``: each output row's squared error through the Gram ``h``."""
    d = q - w
    return ((d @ h) * d).sum(dim=1)


def round_choosing_rows(
    w: torch.Tensor,
    grids: list[tuple[torch.Tensor, torch.Tensor]],
    full: torch.Tensor,
    factor: Factor,
    config: object,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round ``w [N, K]`` with error feedback on each ``(scale, zero) [N, G]`` of ``grids`` and
    keep, per row, the grid with the lowest :func:`row_output_error` through ``full`` (the
    first on ties). Returns ``(codes, scale, zero, [N] index of the grid each row kept)``."""
    cdt = torch.float64 if w.dtype == torch.float64 else torch.float32
    wc = w.to(cdt)
    nb = len(grids)
    codes = error_feedback_codes_batched([wc] * nb, [g[0] for g in grids], [g[1] for g in grids], [full] * nb,
                                         config.bits, config.group_size, config.gptq_damp,
                                         act_order=config.gptq_act_order, factors=[factor] * nb)
    h = full.to(wc.device, cdt)
    errors = torch.stack([row_output_error(dequantize_codes(c, s.to(cdt), z.to(cdt), config.group_size, cdt), wc, h)
                          for c, (s, z) in zip(codes, grids, strict=True)])  # [nb, N]
    best = torch.argmin(errors, dim=0)  # the first minimum: the searched clipping on ties
    pick = best[:, None]
    out_codes = torch.stack(codes).gather(0, pick[None].expand(1, *codes[0].shape)).squeeze(0) \
        if nb > 1 else codes[0]
    scale = torch.stack([g[0] for g in grids]).gather(0, pick[None].expand(1, *grids[0][0].shape)).squeeze(0)
    zero = torch.stack([g[1] for g in grids]).gather(0, pick[None].expand(1, *grids[0][1].shape)).squeeze(0)
    return out_codes, scale, zero, best
