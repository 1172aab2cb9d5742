"""Full-precision targets in layer-by-layer mode: correct each linear for the error upstream.

Layer by layer, block ``i`` sees the *quantized* model's hidden state ``h_q`` (the output of
the quantized blocks before it), and every loss of the search, the clipping and the
error-feedback rounding compares the block against its own full-precision weights *on that
input*. The error the earlier blocks left in ``h_q`` is never compensated. Here the
full-precision model's hidden state ``h_fp`` is carried too (one more block forward per
block), and each linear's target becomes what the full-precision model computes:

    minimise  || X_fp W^T - X_q Q^T ||^2 + lam ||Q - W||_H-free^2   over Q

where ``X_q`` / ``X_fp`` are the linear's inputs in the two streams (the same rows). Its
solution is ``Q* = W + W M^T (H + lam I)^-1`` with ``H = X_q^T X_q / T`` (the Gram already
kept for rounding) and ``M = X_q^T (X_fp - X_q) / T`` (the *cross Gram* collected here), and

    || X_fp W^T - X_q Q^T ||^2 = const + || X_q (Q* - Q)^T ||^2,

so clipping and error-feedback rounding of ``Q*`` on the Gram ``H`` (what they already do for
``W``) minimise the full-precision target. This is the asymmetric calibration of GPTAQ (Li et
al., 2025) applied once per linear before clipping; ``lam`` is the rounding's relative damping.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from awq_ao.observers.activation import first_tensor
from awq_ao.passes.sample_chunks import row_chunks, rows_of, splits_rows

__all__ = ["cross_grams", "corrected_weight"]


@torch.no_grad()
def cross_grams(
    block: nn.Module,
    names: list[str],
    q_call: tuple[tuple[Any, ...], dict[str, Any]],
    fp_call: tuple[tuple[Any, ...], dict[str, Any]],
    rows: int,
    chunk: int,
    with_cross: bool = True,
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """``({linear: M [K, K]}, the block's full-precision output)`` over ``rows`` rows.

    ``M = X_q^T (X_fp - X_q) / T`` (float32; float64 for float64 inputs).

    ``q_call`` / ``fp_call``: the block's ``(args, kwargs)`` in the quantized and the
    full-precision stream (they differ in the hidden state only). The block must still hold
    its full-precision weights; it is not modified. Linears reading one input (q/k/v) share
    one ``M`` object. ``with_cross=False`` only runs the full-precision stream (block 0, where
    both streams are equal).
    """
    modules = dict(block.named_modules())
    present = [n for n in names if n in modules]
    if not splits_rows(*q_call, rows):
        chunk = rows
    stash: dict[str, torch.Tensor] = {}
    sums: dict[str, torch.Tensor] = {}
    tokens: dict[str, int] = {}
    shared: dict[int, str] = {}  # id of a q-stream input -> the first linear that read it
    alias: dict[str, str] = {}
    mode = ["fp"]

    def hook_for(name: str):
        def hook(module: nn.Module, a: tuple[Any, ...]) -> None:
            if not a or not isinstance(a[0], torch.Tensor):
                return
            x = a[0].detach()
            if mode[0] == "fp":
                stash.setdefault(name, x)
                return
            if name not in stash or name in seen:
                return
            seen.add(name)
            owner = shared.get(id(a[0]))
            if owner is not None and torch.equal(stash[owner], stash[name]):
                alias[name] = owner
                return
            shared[id(a[0])] = name
            cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
            xq = x.reshape(-1, x.shape[-1]).to(cdt)
            d = stash[name].reshape(-1, x.shape[-1]).to(cdt) - xq
            m = xq.t() @ d
            sums[name] = m if name not in sums else sums[name] + m
            tokens[name] = tokens.get(name, 0) + xq.shape[0]

        return hook

    seen: set[str] = set()
    handles = [modules[n].register_forward_pre_hook(hook_for(n)) for n in present] if with_cross else []
    outs = []
    try:
        for start, stop in row_chunks(rows, chunk):
            stash.clear()
            mode[0] = "fp"
            a, kw = rows_of(*fp_call, rows, start, stop)
            out = first_tensor(block(*a, **kw))
            if out is None:
                return {}, None
            outs.append(out.detach().cpu())
            if with_cross:
                mode[0] = "q"
                seen.clear()
                shared.clear()
                a, kw = rows_of(*q_call, rows, start, stop)
                block(*a, **kw)
            del a, kw
    finally:
        for h in handles:
            h.remove()
    result = {n: s / max(tokens[n], 1) for n, s in sums.items()}
    for n, owner in alias.items():
        if owner in result:
            result[n] = result[owner]
    return result, (outs[0] if len(outs) == 1 else torch.cat(outs, dim=0))


def corrected_weight(w: torch.Tensor, cross: torch.Tensor, full: torch.Tensor, damp: float) -> torch.Tensor:
    """``W + W M^T (H + damp * mean(diag H) * I)^-1`` (float32 ``[N, K]``; see the module doc).

    ``w [N, K]``, ``cross`` ``M [K, K]`` and ``full`` ``H [K, K]`` for the same (scaled) inputs.
    """
    h = full.to(w.device, torch.float64).clone()
    dead = torch.diagonal(h) <= 0
    h[dead, :] = 0
    h[:, dead] = 0
    h[dead, dead] = 1.0
    torch.diagonal(h).add_(damp * float(torch.diagonal(h).mean()))
    chol = torch.linalg.cholesky(h)
    rhs = cross.to(w.device, torch.float64) @ w.to(torch.float64).t()  # M W^T  [K, N]
    rhs[dead] = 0
    delta = torch.cholesky_solve(rhs, chol).t()  # (H + lam I)^-1 M W^T, transposed
    return (w.to(torch.float64) + delta).to(w.dtype)
