"""The prefill path of the ``cpu_tinygemm`` layout: dequantization + float32 matmul.

:func:`awq_ao.lowering.cpu_kernels.linear` sends larger activation batches here
(``M > decode_max_m()``, a weight the decode kernels cannot run, or
``forced_path("dequant")``). :func:`dequant_matmul` dequantizes the weight in column blocks
of about 16 MiB straight from the packed layout to a transposed float32 ``[K, R]`` block and
multiplies each by the float32 activations. The blocks come from awq_ao's C++ kernel
(``awq_ao_cpu::int4_dequant_t``, into a float32 buffer kept per thread) where it can run the
weight, else from :func:`dequant_transposed`, compiled by inductor for big weights (eager if
inductor fails, or for small weights). A tail of fewer rows than one block is unpacked
row-major (:func:`dequant_rows`). Which path runs, and the path log, stay in
:mod:`awq_ao.lowering.cpu_kernels`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import torch

from awq_ao.lowering.packing import (
    LAYOUT_CPU_TINYGEMM,
    parse_variant,
    tinygemm_geometry,
    unpack,
)

__all__ = [
    "COMPILE_MIN_ELEMS",
    "dequant_matmul",
    "dequant_rows",
    "dequant_transposed",
]

log = logging.getLogger(__name__)

#: Weights with at least this many elements use the compiled dequantization.
COMPILE_MIN_ELEMS = 1 << 20

#: Target elements of one dequantized float32 block (16 MiB). Measured at M=512 with the
#: vectorised dequantization (2-core AVX512 Xeon, median of 5, interleaved with the dense
#: matmul; 8192x2048 / 2048x8192 ms): 2^18 69.5 / 80.7, 2^19 61.1 / 78.1, 2^20 57.9 / 66.7,
#: 2^21 54.8 / 62.0, 2^22 54.7 / 55.9 (dense 49.5 / 52.7); a second run 2^22 64.5 / 66.6,
#: 2^23 71.9 / 81.8, 2^24 70.9 / 81.1 (dense 51.4 / 56.3).
_BLOCK_ELEMS = 1 << 22

#: Dynamo's recompile limit while the dequantization runs: one graph per (K, block count).
_RECOMPILE_LIMIT = 64

_compiled = None
_compile_failed: str | None = None


def dequant_transposed(
    packed_blocks: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    interleaved: bool,
    tg: int,
) -> torch.Tensor:
    """Full tinygemm row blocks -> the transposed float32 weight ``[K_pad, nb * B]``.

    Written so that inductor vectorises it: the low and the high nibbles are two separate
    contiguous streams (no per-element shift select), and the scales arrive as two
    contiguous float32 planes rather than bfloat16 pairs. Measured on the 8192 x 2048 g128
    weight (2-core AVX512 Xeon), compiled: see ``docs/cpu_kernels.md``.

    Args:
        packed_blocks: ``uint8 [nb, K_pad, B/2]`` (``nb`` blocks of ``B`` rows; byte ``(k, j)``
            holds rows ``j`` and ``j + B/2`` when ``interleaved``, else rows ``2j`` and
            ``2j + 1``; low nibble first).
        scale: the blocks' scales, float32 ``[K_pad / tg, nb * B]`` (tinygemm's
            ``scales_and_zeros[..., 0]``).
        offset: the blocks' offsets, same shape (``scales_and_zeros[..., 1]``).
        interleaved: the variant's row order.
        tg: tinygemm group size.
    """
    nb, kp, hb = packed_blocks.shape
    g = kp // tg
    p = packed_blocks.permute(1, 0, 2).reshape(g, tg, nb, hb)
    # row r of block b: interleaved r = h * hb + j, else r = 2 * j + h (h: 0 low, 1 high nibble)
    split = (g, 1, nb, 2, hb) if interleaved else (g, 1, nb, hb, 2)
    s = scale.reshape(split)
    o = offset.reshape(split)
    s_lo, s_hi = (s[:, :, :, 0], s[:, :, :, 1]) if interleaved else (s[..., 0], s[..., 1])
    o_lo, o_hi = (o[:, :, :, 0], o[:, :, :, 1]) if interleaved else (o[..., 0], o[..., 1])
    lo = ((p & 15).to(torch.float32) - 8.0) * s_lo + o_lo
    hi = ((p >> 4).to(torch.float32) - 8.0) * s_hi + o_hi
    w = torch.stack([lo, hi], dim=3 if interleaved else 4)  # [g, tg, nb, B]
    return w.reshape(kp, nb * 2 * hb)


def dequant_rows(codes: torch.Tensor, sz_rows: torch.Tensor, tg: int) -> torch.Tensor:
    """Row-major codes ``uint8 [R, K_pad]`` and their ``scales_and_zeros`` ``[G_tg, R, 2]`` ->
    float32 ``[R, K_pad]``."""
    r, kp = codes.shape
    g = kp // tg
    s = sz_rows[..., 0].to(torch.float32).t().unsqueeze(2)
    o = sz_rows[..., 1].to(torch.float32).t().unsqueeze(2)
    return ((codes.view(r, g, tg).to(torch.float32) - 8.0) * s + o).view(r, kp)


def _dequant_fn(elems: int):
    """The compiled :func:`dequant_transposed` for big weights (eager if inductor fails)."""
    global _compiled, _compile_failed
    if elems < COMPILE_MIN_ELEMS or _compile_failed is not None:
        return dequant_transposed, "eager"
    if _compiled is None:
        _compiled = torch.compile(dequant_transposed, dynamic=False, fullgraph=True)
    return _compiled, "compiled"


def _run_block(fn, how, *args):
    global _compile_failed
    if how == "compiled":
        try:
            return fn(*args), how
        except Exception as e:  # no C++ compiler, unsupported platform, ...
            _compile_failed = f"{type(e).__name__}: {e}"
            log.warning(
                "awq_ao: inductor could not compile the CPU dequantization (%s); using the "
                "eager one (slower prefill).",
                _compile_failed.splitlines()[0][:200],
            )
    return dequant_transposed(*args), "eager"


_buffers = threading.local()


def _buffer(elems: int) -> torch.Tensor:
    """This thread's float32 dequantization buffer (kept between calls: no page faults per call)."""
    buf = getattr(_buffers, "buf", None)
    if buf is None or buf.numel() < elems:
        buf = _buffers.buf = torch.empty(elems, dtype=torch.float32)
    return buf


def _ext_dequant_matmul(x32, y, packed, scales_and_zeros, in_features, tg, k_pad, block) -> None:
    """``y[:, :n_full] = x32 @ W[:n_full].T`` by C++ dequantization of ~16 MiB column blocks."""
    nb = packed.shape[0] // block
    per = min(nb, max(1, _BLOCK_ELEMS // (k_pad * block)))
    if x32.requires_grad and torch.is_grad_enabled():  # autograd keeps each block: no reuse
        buf = torch.empty(k_pad * per * block * ((nb + per - 1) // per))
        fresh = True
    else:
        buf, fresh = _buffer(k_pad * per * block), False
    for b0 in range(0, nb, per):
        b1 = min(nb, b0 + per)
        off = k_pad * b0 * block if fresh else 0
        wt = buf[off : off + k_pad * (b1 - b0) * block].view(k_pad, (b1 - b0) * block)
        torch.ops.awq_ao_cpu.int4_dequant_t(packed, scales_and_zeros, tg, block, b0, b1, wt)
        y[:, b0 * block : b1 * block] = x32 @ wt[:in_features]


def dequant_matmul(
    x2d: torch.Tensor,
    packed: torch.Tensor,
    scales_and_zeros: torch.Tensor,
    in_features: int,
    group_size: int,
    variant: str,
    ext_supports: Callable[[str, torch.Tensor], bool],
) -> tuple[torch.Tensor, str]:
    """``x2d @ W.T`` in float32 by block-wise dequantization and float32 matmuls, and how the
    full row blocks were dequantized (``"C++"``, ``"compiled"`` or ``"eager"``).

    ``ext_supports(variant, scales_and_zeros)`` says whether the C++ kernels can run the
    weight (:func:`awq_ao.lowering.cpu_kernels.ext_supports`); it is asked only when the weight
    has a full row block.
    """
    tg, k_pad = tinygemm_geometry(in_features, group_size)  # type: ignore[misc]
    block, interleaved = parse_variant(variant)
    n = packed.shape[0]
    x32 = x2d.to(torch.float32)
    y = x32.new_empty(x32.shape[0], n)
    n_full = n // block * block
    how = "eager"
    if n_full and ext_supports(variant, scales_and_zeros):
        how = "C++"
        _ext_dequant_matmul(x32, y, packed, scales_and_zeros, in_features, tg, k_pad, block)
    elif n_full:
        nb = n_full // block
        per = max(1, _BLOCK_ELEMS // (k_pad * block))
        fn, how = _dequant_fn(n * k_pad)
        blocks = packed[:n_full].view(nb, k_pad, block // 2)
        scale = scales_and_zeros[:, :n_full, 0].to(torch.float32)
        offset = scales_and_zeros[:, :n_full, 1].to(torch.float32)
        per = min(per, nb)
        limit = max(_RECOMPILE_LIMIT, torch._dynamo.config.recompile_limit)
        with torch._dynamo.config.patch(recompile_limit=limit):  # one graph per (K, block count)
            for b0 in range(0, nb, per):
                # every block of one shape (one compiled graph): the last one overlaps its neighbour
                b0 = min(b0, nb - per)
                b1 = b0 + per
                cols = slice(b0 * block, b1 * block)
                wt, how = _run_block(fn, how, blocks[b0:b1], scale[:, cols], offset[:, cols], interleaved, tg)
                y[:, b0 * block : b1 * block] = x32 @ wt[:in_features]
    if n_full < n:  # tail block (fewer rows than a block): unpack it row-major
        t = n - n_full
        codes = unpack(packed[n_full:], 4, LAYOUT_CPU_TINYGEMM, t, k_pad, variant)
        w = dequant_rows(codes, scales_and_zeros[:, n_full:], tg)
        y[:, n_full:] = x32 @ w[:, :in_features].t()
    return y, how
