"""Error-feedback rounding of AWQ-scaled, clipped weights (the GPTQ update, fixed groups).

AWQ chooses *how* to scale and clip a weight; every code is then rounded to nearest. With the
input Gram ``H = X^T X / T`` of a linear layer (already collected for the clipping search),
the rounding error of one input column can be compensated by the columns not yet rounded:
processing columns in order, the error ``e_j`` of column ``j`` is spread over the later columns
through the Cholesky factor of ``H^-1`` (Frantar et al., GPTQ). The group scales and zeros
are fixed beforehand (from the clipped weight), so the result is stored exactly like a
round-to-nearest weight: same codes, same kernels, same checkpoint formats.

Rows are independent given ``H``, so the weight is processed in row chunks (bounded memory);
columns in blocks of ``block`` with one matrix product per block for the later columns.
"""

from __future__ import annotations

from typing import Any

import torch

from awq_ao.lowering.quant_math import group_geometry


def sample_tokens(x: torch.Tensor, max_tokens: int | None = None) -> torch.Tensor:
    """Activations ``x [..., K]`` as ``[T, K]`` rows, evenly subsampled to ``max_tokens``."""
    x2 = x.detach().reshape(-1, x.shape[-1])
    if max_tokens is not None and x2.shape[0] > max_tokens:
        idx = torch.linspace(0, x2.shape[0] - 1, max_tokens, device=x2.device).round().long()
        x2 = x2[idx]
    return x2


def full_gram(x: torch.Tensor, max_tokens: int | None = None) -> torch.Tensor:
    """``X^T X / T`` (float32 ``[K, K]``; float64 for float64 ``x``) of activations ``x [..., K]``
    (tokens subsampled by :func:`sample_tokens`)."""
    x2 = sample_tokens(x, max_tokens)
    xf = x2 if x2.dtype == torch.float64 else x2.float()
    return (xf.t() @ xf) / max(xf.shape[0], 1)


def group_blocks(h: torch.Tensor, group_size: int) -> torch.Tensor:
    """The per-group diagonal blocks ``[G, g, g]`` of a full Gram ``[K, K]``.

    Equals :func:`search.group_gram` of the same tokens (ragged last group zero-padded).
    """
    k = h.shape[0]
    g, groups, pad = group_geometry(k, group_size)
    hp = torch.nn.functional.pad(h, (0, pad, 0, pad)) if pad else h
    idx = torch.arange(groups, device=h.device)
    return hp.view(groups, g, groups, g)[idx, :, idx, :]


def scale_full_gram(h: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The Gram of ``x / s`` from the Gram ``h [K, K]`` of ``x`` (``s``: [K] scales)."""
    inv = 1.0 / s.to(h.device, torch.float32)
    return h * inv[:, None] * inv[None, :]


def inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1`` (``[K, K]``, in ``h``'s
    precision: float32, or float64 for a float64 ``h``).

    Channels that never saw a non-zero input get a unit diagonal. If the damped matrix is
    still not positive definite (collinear inputs in low precision), the damping is raised
    tenfold up to three times before a ``torch.linalg.LinAlgError`` propagates. About four
    ``[K, K]`` matrices are alive at once (K = 8192: 1 GiB in float32).
    """
    hh = h.to(torch.float64 if h.dtype == torch.float64 else torch.float32).clone()
    dead = torch.diagonal(hh) <= 0
    hh[dead, :] = 0
    hh[:, dead] = 0
    hh[dead, dead] = 1.0
    mean_diag = float(torch.diagonal(hh).mean())
    added = 0.0
    for attempt in range(4):
        lam = damp * (10**attempt) * mean_diag
        torch.diagonal(hh).add_(lam - added)  # in place: no identity matrix, no extra copy
        added = lam
        # the Cholesky factor of the reversed matrix, L L^T = J A J (J: the reversal), gives
        # the factor wanted: A^-1 = J L^-T L^-1 J = U^T U with U = J L^-1 J upper triangular.
        # One factorization and one triangular inverse (2.2x faster than factorizing A,
        # inverting it and factorizing the inverse, at the same accuracy).
        chol, info = torch.linalg.cholesky_ex(hh.flip(0, 1))
        if int(info) == 0:
            return lower_triangular_inverse(chol).flip(0, 1)
    raise torch.linalg.LinAlgError(
        f"the input Gram ({hh.shape[0]} channels) is not positive definite even with damping "
        f"{damp * 1000:g}; use rounding='nearest' for this model or more calibration data."
    )


def lower_triangular_inverse(lower: torch.Tensor, leaf: int = 128) -> torch.Tensor:
    """The inverse of a lower-triangular ``[K, K]`` matrix with a non-zero diagonal.

    Recursive 2 x 2 blocks, ``inv([[A, 0], [B, C]]) = [[A^-1, 0], [-C^-1 B A^-1, C^-1]]``:
    about ``K^3 / 3`` multiply-adds, nearly all in matrix products (a triangular solve against
    the identity costs ``K^3``); blocks of at most ``leaf`` rows are solved directly.
    """
    k = lower.shape[0]
    if k <= leaf:
        return torch.linalg.solve_triangular(lower, torch.eye(k, dtype=lower.dtype, device=lower.device),
                                             upper=False)
    h = k // 2
    a_inv = lower_triangular_inverse(lower[:h, :h], leaf)
    c_inv = lower_triangular_inverse(lower[h:, h:], leaf)
    out = torch.zeros_like(lower)
    out[:h, :h] = a_inv
    out[h:, h:] = c_inv
    out[h:, :h] = -(c_inv @ (lower[h:, :h] @ a_inv))
    return out


#: ``(perm, U)``: the column order (None: left to right) and the upper Cholesky factor of the
#: damped inverse Gram in that order, as :func:`error_feedback_codes_batched` uses them.
Factor = tuple[torch.Tensor | None, torch.Tensor]


def inverse_factor(h: torch.Tensor, damp: float, act_order: bool) -> Factor:
    """``(perm, U)`` of the Gram ``h [K, K]``: ``perm`` orders the columns by decreasing
    ``diag(h)`` (``act_order``; else None) and ``U`` is :func:`inverse_cholesky` of the Gram
    permuted that way (float32, or float64 for a float64 ``h``)."""
    hc = h.to(torch.float64 if h.dtype == torch.float64 else torch.float32)
    perm = torch.argsort(torch.diagonal(hc), descending=True, stable=True) if act_order else None
    if perm is not None:
        hc = hc[perm][:, perm]
    return perm, inverse_cholesky(hc, damp)


def scaled_factor(base: Factor, s: torch.Tensor | None) -> Factor:
    """The factor of the inputs ``x / s`` from ``base``, the factor of the inputs ``x``, with the
    damping and the column order kept on ``x`` (``gptq_shared_factor``).

    With ``D = diag(1 / s)`` the damped Gram of ``x / s`` is taken as ``D (H + lam I) D``, whose
    inverse is ``diag(s) A^-1 diag(s)``, so its factor is ``U diag(s)`` in the same column order:
    no factorization per scale. (The default rounding damps ``D H D`` by its own mean diagonal
    and orders by its own diagonal, which needs a factorization per scale.)
    """
    perm, u = base
    if s is None:
        return perm, u
    sc = s.to(u.device, u.dtype)
    return perm, u * (sc[perm] if perm is not None else sc)[None, :]


#: Elements of one row chunk of :func:`error_feedback_codes` (the weight chunk and its
#: expanded scales and zeros: three float32 tensors of this size, 48 MiB).
ROUND_CHUNK_ELEMS = 1 << 22


def error_feedback_codes(
    w: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    h: torch.Tensor,
    bits: int,
    group_size: int,
    damp: float = 0.1,
    block: int = 128,
    rows_per_chunk: int | None = None,
    act_order: bool = False,
    factor: Factor | None = None,
) -> torch.Tensor:
    """Round ``w [N, K]`` on the fixed grid ``(scale, zero) [N, G]`` with GPTQ error feedback.

    ``h [K, K]``: Gram of the layer's inputs (for a scaled weight, of the scaled inputs).
    Returns the codes, ``uint8 [N, K]``: the weight they stand for is ``(code - zero) *
    scale`` of each group, and they go to packing as they are. The expected output error
    ``tr((W - Q) H (W - Q)^T)`` is what they lower. ``act_order``: round the columns in order
    of decreasing input energy (``diag H``) instead of left to right; each column keeps its
    own group's grid, so the storage format does not change. Rows are processed in chunks of
    ``rows_per_chunk`` (default: at least 1024 rows and up to :data:`ROUND_CHUNK_ELEMS`
    elements), each chunk one sweep over the columns. ``factor``: the ``(perm, U)`` to use
    instead of computing it from ``h``, ``damp`` and ``act_order`` (:func:`scaled_factor`).
    """
    n, k = w.shape
    if h.shape != (k, k):
        raise ValueError(f"error_feedback_round: Gram of shape {tuple(h.shape)} does not fit weight {tuple(w.shape)}")
    return error_feedback_codes_batched([w], [scale], [zero], [h], bits, group_size, damp, block, rows_per_chunk,
                                        act_order, None if factor is None else [factor])[0]


def _sweep_block(wb: torch.Tensor, u: torch.Tensor, diag: torch.Tensor, st: torch.Tensor, zt: torch.Tensor,
                 out: torch.Tensor, err: torch.Tensor, b0: int, b1: int, max_int: int) -> None:
    """Round columns ``[b0, b1)`` (``wb``: their ``[B, b1 - b0, rows]`` view, updated in place),
    writing their codes into ``out`` and scaled errors into ``err``."""
    for i in range(b1 - b0):
        c = b0 + i
        sc, zc = st[:, c], zt[:, c]
        q = (torch.round(wb[:, i] / sc) + zc).clamp_(0, max_int)
        out[:, c] = q.to(torch.uint8)
        e = (wb[:, i] - (q - zc) * sc) / diag[:, c]
        err[:, i] = e
        if i + 1 < b1 - b0:
            wb[:, i + 1 :] -= u[:, c, c + 1 : b1].unsqueeze(-1) * e.unsqueeze(1)


def _sweep_kernel(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the column sweep runs in awq_ao's C++ kernel (float32 on CPU, where it builds);
    it gives the torch loop's codes bit for bit, several times faster."""
    if dtype != torch.float32 or device.type != "cpu":
        return False
    from awq_ao.lowering import cpu_ext

    return cpu_ext.load()


def error_feedback_codes_batched(
    ws: list[torch.Tensor],
    scales: list[torch.Tensor],
    zeros: list[torch.Tensor],
    hs: list[torch.Tensor],
    bits: int,
    group_size: int,
    damp: float = 0.1,
    block: int = 128,
    rows_per_chunk: int | None = None,
    act_order: bool = False,
    factors: list[Factor] | None = None,
) -> list[torch.Tensor]:
    """:func:`error_feedback_codes` of several ``(w_b [N, K], grid, Gram h_b [K, K])`` at once.

    Every item is rounded exactly as alone (same column order, factor and damping per item),
    but the column sweep runs once for all of them: each per-column step works on a
    ``[B, rows]`` tile, so small weights (or many AWQ candidates of one weight) share the
    per-column cost. All items have the same shape. ``factors``: each item's ``(perm, U)``
    given (:func:`inverse_factor`, :func:`scaled_factor`) instead of computed from its Gram,
    ``damp`` and ``act_order``.
    """
    nb = len(ws)
    n, k = ws[0].shape
    if any(w.shape != (n, k) for w in ws) or any(h.shape != (k, k) for h in hs):
        raise ValueError("error_feedback_codes_batched: every weight must be [N, K] and every Gram [K, K] alike")
    dev = ws[0].device
    g = group_geometry(k, group_size).size
    max_int = 2**bits - 1
    cdt = torch.float64 if ws[0].dtype == torch.float64 else torch.float32
    base_group = torch.arange(k, device=dev) // g
    if factors is not None and (len(factors) != nb or any(f[1].shape != (k, k) for f in factors)):
        raise ValueError("error_feedback_codes_batched: one [K, K] factor per weight is needed")
    perms, col_groups, us = [], [], []
    for b, h in enumerate(hs):
        perm, u_b = factors[b] if factors is not None else inverse_factor(h.to(dev, cdt), damp, act_order)
        us.append(u_b.to(dev, cdt))
        perms.append(perm)
        col_groups.append(base_group[perm] if perm is not None else base_group)
    u = torch.stack(us)  # [B, K, K]
    del us
    diag = torch.diagonal(u, dim1=1, dim2=2).unsqueeze(-1)  # [B, K, 1]
    codes = [torch.empty(n, k, dtype=torch.uint8, device=dev) for _ in range(nb)]
    use_kernel = _sweep_kernel(cdt, dev)
    rows_per_chunk = rows_per_chunk or max(1024 // nb, 1, ROUND_CHUNK_ELEMS // (k * nb))
    for r0 in range(0, n, rows_per_chunk):
        # columns as contiguous rows ([B, K, rows]): every per-column step reads and writes one
        # contiguous [B, rows] tile instead of stride-K columns
        wt = torch.stack([(w[r0 : r0 + rows_per_chunk].to(cdt)[:, p] if p is not None else w[r0 : r0 + rows_per_chunk].to(cdt)).t()
                          for w, p in zip(ws, perms, strict=True)])  # a copy, always
        rows = wt.shape[2]
        st = torch.stack([sc[r0 : r0 + rows].to(dev, cdt).t()[cg] for sc, cg in zip(scales, col_groups, strict=True)])
        zt = torch.stack([zr[r0 : r0 + rows].to(dev, cdt).t()[cg] for zr, cg in zip(zeros, col_groups, strict=True)])
        out = torch.empty(nb, k, rows, dtype=torch.uint8, device=dev)
        for b0 in range(0, k, block):
            b1 = min(b0 + block, k)
            wb = wt[:, b0:b1]
            err = torch.empty_like(wb)
            if use_kernel:  # the same operations in C++
                torch.ops.awq_ao_cpu.ef_round_block(wt, u, st, zt, out, err, b0, b1, float(max_int))
            else:
                _sweep_block(wb, u, diag, st, zt, out, err, b0, b1, max_int)
            if b1 < k:
                wt[:, b1:] -= torch.bmm(u[:, b0:b1, b1:].transpose(1, 2), err)
        for b in range(nb):
            ob = out[b].t()  # [rows, K] in sweep order
            if perms[b] is not None:
                codes[b][r0 : r0 + rows, perms[b]] = ob
            else:
                codes[b][r0 : r0 + rows] = ob
    return codes


def error_feedback_round(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, h: torch.Tensor, bits: int, group_size: int,
    **options: Any,
) -> torch.Tensor:
    """:func:`error_feedback_codes`, dequantized: ``[N, K]`` float32 (float64 for a float64 ``w``).

    Every value is ``(code - zero) * scale`` of its group, so quantizing it again with the
    same ``(scale, zero)`` gives back the codes. ``options``: those of
    :func:`error_feedback_codes` (``damp``, ``block``, ``rows_per_chunk``, ``act_order``, ``factor``).
    """
    codes = error_feedback_codes(w, scale, zero, h, bits, group_size, **options)
    cdt = torch.float64 if w.dtype == torch.float64 else torch.float32
    g = group_geometry(w.shape[1], group_size).size
    col_group = torch.arange(w.shape[1], device=w.device) // g
    s = scale.to(w.device, cdt)[:, col_group]
    z = zero.to(w.device, cdt)[:, col_group]
    return (codes.to(cdt) - z) * s
