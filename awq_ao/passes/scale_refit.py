"""Least-squares refit of the group scales once the codes are fixed.

Error-feedback rounding (:mod:`awq_ao.passes.rounding`) chooses the codes ``q`` on a grid
``(scale, zero)`` fixed beforehand from the clipped weight. With the codes chosen, each
row's dequantized weight ``Q = scale_g * (q - zero_g)`` is linear in its group scales, so
the scales that minimise the layer's expected output error

    ``(w - Q) H (w - Q)^T``  (``H``: the Gram of the layer's inputs, damped)

are the solution of one small ``G x G`` linear system per row (``G``: groups per row). The
zero points stay the integers they were (checkpoint formats store integer zeros); the codes
do not change. A row whose refit does not lower its error keeps its scales.

:func:`alternate_grid` repeats the two steps: the codes are rounded again on the refit scales,
the scales refit to the new codes, and so on, each row keeping whichever step lowered its
error. Every step lowers (or keeps) the same objective.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from awq_ao.lowering.quant_math import group_geometry

__all__ = ["refit_scales", "alternate_grid"]

#: Rows solved at once: their ``[rows, K, G]`` temporaries stay a few tens of MiB.
ROWS_PER_CHUNK = 256


def _row_errors(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    d = w - q
    return ((d @ h) * d).sum(dim=1)


def _damped(h: torch.Tensor, damp: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    hd = h.to(device, dtype).clone()
    hd.diagonal().add_(damp * float(hd.diagonal().mean()))
    return hd


def _dequant(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, col_group: torch.Tensor,
             dtype: torch.dtype) -> torch.Tensor:
    return (codes.to(dtype) - zero.to(dtype)[:, col_group]) * scale.to(dtype)[:, col_group]


@torch.no_grad()
def refit_scales(
    w: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    h: torch.Tensor,
    group_size: int,
    damp: float = 0.1,
    rows_per_chunk: int = ROWS_PER_CHUNK,
) -> torch.Tensor:
    """The per-group scales ``[N, G]`` minimising ``(w - Q) (H + λI) (w - Q)^T`` row by row.

    ``w [N, K]``: the weight the codes stand for (in the space ``h`` is the Gram of: for an
    AWQ-scaled weight, the scaled weight and the Gram of the scaled inputs); ``codes uint8 [N, K]``
    on the grid ``(scale, zero) [N, G]``; ``h [K, K]``; ``damp``: ``λ = damp * mean(diag H)``,
    as the error-feedback rounding damps it. Returns float32 (float64 for a float64 ``w``).
    Groups whose codes all sit on the zero point, rows whose refit is not finite, has a
    non-positive scale or does not lower the row's error keep their scales.
    """
    n, k = w.shape
    g, groups, pad = group_geometry(k, group_size)
    if codes.shape != (n, k) or scale.shape != (n, groups) or zero.shape != (n, groups) or h.shape != (k, k):
        raise ValueError(
            f"refit_scales: shapes do not fit: w {tuple(w.shape)}, codes {tuple(codes.shape)}, "
            f"scale {tuple(scale.shape)}, zero {tuple(zero.shape)}, Gram {tuple(h.shape)}"
        )
    cdt = torch.float64 if w.dtype == torch.float64 else torch.float32
    dev = w.device
    hd = _damped(h, damp, cdt, dev)
    hp = torch.nn.functional.pad(hd, (0, pad, 0, pad)) if pad else hd
    h_cols = hp[:k].reshape(k, groups, g)  # [K, G, g]: H's columns grouped
    col_group = torch.arange(k, device=dev) // g
    out = scale.to(dev, cdt).clone()
    eye = torch.eye(groups, device=dev, dtype=cdt)
    for r0 in range(0, n, rows_per_chunk):
        rows = slice(r0, r0 + rows_per_chunk)
        wc = w[rows].to(cdt)
        s0 = out[rows]
        c = codes[rows].to(cdt) - zero[rows].to(dev, cdt)[:, col_group]  # [n, K]: Q = c * scale
        cp = torch.nn.functional.pad(c, (0, pad)) if pad else c
        cg = cp.view(-1, groups, g)
        hc = torch.einsum("kjb,njb->nkj", h_cols, cg)  # [n, K, G]: H A_n
        hcp = torch.nn.functional.pad(hc, (0, 0, 0, pad)) if pad else hc
        m = torch.einsum("nia,niaj->nij", cg, hcp.view(-1, groups, g, groups))  # A_n^T H A_n
        v = torch.einsum("nk,nkj->nj", wc, hc)  # A_n^T H w_n
        # a tiny pull toward the old scales keeps groups of all-zero codes (m's row 0) solvable
        dm = torch.diagonal(m, dim1=1, dim2=2)
        reg = 1e-6 * dm.mean(dim=1, keepdim=True).clamp(min=torch.finfo(cdt).tiny) + 1e-9 * dm
        s = torch.linalg.solve(m + reg.unsqueeze(-1) * eye, (v + reg * s0).unsqueeze(-1)).squeeze(-1)
        dead = dm <= 0
        s = torch.where(dead, s0, s)
        ok = torch.isfinite(s).all(dim=1) & (s > 0).all(dim=1)
        s = torch.where(ok[:, None], s, s0)
        before = _row_errors(wc, c * s0[:, col_group], hd)
        after = _row_errors(wc, c * s[:, col_group], hd)
        out[rows] = torch.where((after < before)[:, None], s, s0)
    return out


@torch.no_grad()
def alternate_grid(
    w: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    h: torch.Tensor,
    group_size: int,
    damp: float,
    rounds: int,
    round_codes: Callable[[torch.Tensor], torch.Tensor],
    store: Callable[[torch.Tensor], torch.Tensor] = lambda s: s,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and scales by alternating rounding and :func:`refit_scales`, ``rounds`` refits.

    ``round_codes(scale)``: the codes ``uint8 [N, K]`` of ``w`` on the grid ``(scale, zero)``
    (error-feedback rounding on ``h``); ``store(scale)``: the scales as they will be stored
    (e.g. rounded to bfloat16), applied to every refit. Starts from ``round_codes(scale)``;
    then ``rounds`` times: refit the scales, and (but after the last refit) round the codes
    again on them. A row takes a step's result only if it lowers its error
    ``(w - Q) (H + damp * mean(diag H) * I) (w - Q)^T``. ``rounds=0``: the first codes, the
    given scales. Returns ``(codes, scale)``.
    """
    if rounds < 0:
        raise ValueError(f"alternate_grid: rounds must be >= 0, got {rounds}")
    cdt = torch.float64 if w.dtype == torch.float64 else torch.float32
    dev = w.device
    col_group = torch.arange(w.shape[1], device=dev) // group_geometry(w.shape[1], group_size).size
    hd = _damped(h, damp, cdt, dev)
    wc = w.to(cdt)
    codes, scale = round_codes(scale), scale.to(dev, cdt)
    err = _row_errors(wc, _dequant(codes, scale, zero, col_group, cdt), hd)
    for r in range(rounds):
        s_new = store(refit_scales(wc, codes, scale, zero, h, group_size, damp)).to(cdt)
        e_new = _row_errors(wc, _dequant(codes, s_new, zero, col_group, cdt), hd)
        better = e_new < err
        scale = torch.where(better[:, None], s_new, scale)
        err = torch.where(better, e_new, err)
        if r + 1 == rounds:
            break
        c_new = round_codes(scale)
        e_new = _row_errors(wc, _dequant(c_new, scale, zero, col_group, cdt), hd)
        better = e_new < err
        codes = torch.where(better[:, None], c_new, codes)
        err = torch.where(better, e_new, err)
    return codes, scale
