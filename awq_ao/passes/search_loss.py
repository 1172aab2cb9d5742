"""What a candidate AWQ scale costs: the consumers' weights fake-quantized at that scale
(``Q(w * s) / s``), swapped in and restored exactly, and the output MSE it is scored by,
measured directly or computed from the input's Gram when that is cheaper."""

from __future__ import annotations

import torch
from torch import nn

from awq_ao.lowering.quant_math import fake_quantize

__all__ = ["fake_quantize_scaled", "gram_output_mse", "use_gram_loss"]


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
