"""Weight-clipping search: per-group input Grams (:func:`group_gram`, :func:`scale_gram`), the
best per-(row, group) clipping ratios (:func:`clip_ratios`) and their application
(:func:`apply_clip`)."""

from __future__ import annotations

import math

import torch

from awq_ao.lowering.quant_math import fake_quantize_grouped, group_geometry
from awq_ao.passes.rounding import sample_tokens

__all__ = ["group_gram", "scale_gram", "clip_ratios", "apply_clip"]


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

