"""CPU matmuls for the ``cpu_tinygemm`` layout (the layout every 4-bit CPU weight gets).

The weight holds only the packed codes and tinygemm's ``scales_and_zeros`` (bfloat16
``[G_tg, N, 2]``: scale and offset, ``w = (q - 8) * scale + offset``), so the footprint is
``4 + 32 / group_size`` bits per weight. Paths, chosen by the number of activation rows ``M``
(measured in ``benchmarks/cpu_kernels.py``; table in ``docs/cpu_kernels.md``):

decode (``0 < M <= decode_max_m()``)
    awq_ao's own C++ kernel (:mod:`awq_ao.lowering.cpu_ext`, AVX2 + FMA) where it can be
    built: activations quantized per (row, tinygemm group) to int16, an exact integer dot
    product with the 4-bit codes, scales applied per group in float32. Without it, ATen's
    ``_weight_int4pack_mm_for_cpu`` in bfloat16 (activations cast to bfloat16 and back;
    ATen's float32 / float16 variants of that kernel are 10-60x slower than its bfloat16 one).

prefill (larger ``M``)
    The weight is dequantized in column blocks of about 16 MiB straight from the packed
    layout to a transposed float32 ``[K, R]`` block (the C++ kernel where available, else an
    inductor-compiled or eager dequantization), each block multiplied by the float32
    activations. The matmul runs in float32 for every activation dtype: on these CPUs it is
    as fast as or faster than a bfloat16 matmul, and more exact.

Every path is logged once per (shape, dtype, path) and listed by :func:`chosen_paths`.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading

import torch
import torch.nn.functional as F

import awq_ao.lowering.cpu_ext as cpu_ext
from awq_ao.lowering.packing import (
    LAYOUT_CPU_TINYGEMM,
    cpu_tinygemm_variant,
    parse_variant,
    tinygemm_geometry,
    unpack,
)

__all__ = [
    "DECODE_MAX_M",
    "EXT_DECODE_MAX_M",
    "MAX_DECODE_M",
    "decode_max_m",
    "describe",
    "ext_supports",
    "ext_linear",
    "forced_path",
    "linear",
    "COMPILE_MIN_ELEMS",
    "tinygemm_linear",
    "dequant_transposed",
    "dequant_rows",
    "chosen_paths",
]

log = logging.getLogger(__name__)

#: Largest M sent to awq_ao's C++ decode kernel (:mod:`cpu_ext`). Measured
#: (benchmarks/results/cpu_kernels_avx2_epyc.json, 2-core AMD EPYC, AVX2, float32, ms of the
#: C++ kernel vs C++ dequantization + fp32 matmul): M=128 8.3 / 10.0 (2048x2048), 39.6 / 49.1
#: (8192x2048), 26.6 / 39.8 (2048x8192); M=256 15.4 / 17.6, 53.6 / 74.0, 65.0 / 64.3; M=512
#: 41.7 / 33.6, 103.7 / 113.0, 126.6 / 112.2: the crossover lies between 256 and 512.
EXT_DECODE_MAX_M = 256

#: Largest M sent to tinygemm (when the C++ kernel is unavailable). Measured (benchmarks/results/cpu_kernels.json: 2-core Xeon,
#: AVX512-BF16, no AMX; 8192x2048 g128, bf16): tinygemm 0.45 ms at M=1 (dense fp32 1.10),
#: 14.4 at M=64 and 26.5 at M=128 vs 23.6 and 29.3 for dequantization + fp32 matmul, which
#: wins at M=512 (64.6 vs 108.7); the crossover is near M = 160.
DECODE_MAX_M = 128

#: No path treats more rows than this as decode: larger M always takes the prefill path.
MAX_DECODE_M = max(EXT_DECODE_MAX_M, DECODE_MAX_M)

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

_lock = threading.Lock()
_seen: dict[tuple, str] = {}
_compiled = None
_compile_failed: str | None = None


def chosen_paths() -> dict[tuple, str]:
    """``{(N, K, activation dtype, "decode"|"prefill"): path}`` of every call so far."""
    with _lock:
        return dict(_seen)


def _note(n: int, k: int, dtype: torch.dtype, kind: str, path: str) -> None:
    key = (n, k, str(dtype).removeprefix("torch."), kind)
    if key in _seen:
        return
    with _lock:
        if key not in _seen:
            _seen[key] = path
            log.info("awq_ao CPU %s [%d x %d] %s: %s", kind, n, k, key[2], path)


# --------------------------------------------------------------------------------------------
# path choice
# --------------------------------------------------------------------------------------------

#: The path forced by :func:`forced_path` in this thread / task (a context variable: one
#: thread's forcing never leaks into another's, and nested blocks restore in order).
_FORCED: contextvars.ContextVar[str | None] = contextvars.ContextVar("awq_ao_cpu_path", default=None)
_PATHS = ("ext", "tinygemm", "dequant")


@contextlib.contextmanager
def forced_path(path: str | None):
    """Run every cpu_tinygemm matmul through one path (``"ext"``, ``"tinygemm"`` or
    ``"dequant"``) inside the block, whatever M is; for tests and benchmarks. A path that
    cannot run a weight (no C++ kernel, another CPU's tinygemm permutation) raises."""
    if path is not None and path not in _PATHS:
        raise ValueError(f"forced_path: path must be one of {_PATHS} or None, got {path!r}.")
    token = _FORCED.set(path)
    try:
        yield
    finally:
        _FORCED.reset(token)


def describe() -> str:
    """One line for the convert report: which kernels cpu_tinygemm layers run on this machine
    (builds the C++ kernels if they are not built yet)."""
    if cpu_ext.load():
        return (
            f"cpu_tinygemm layers decode (<= {EXT_DECODE_MAX_M} rows) with awq_ao's C++ kernel "
            "(AVX2, int16 activations), prefill by C++ block dequantization + fp32 matmul"
        )
    return (
        f"cpu_tinygemm layers decode (<= {DECODE_MAX_M} rows) with ATen's tinygemm in bf16, prefill "
        f"by block dequantization + fp32 matmul (awq_ao's C++ kernels unavailable: "
        f"{cpu_ext.unavailable_reason()})"
    )


def ext_supports(variant: str, scales_and_zeros: torch.Tensor) -> bool:
    """Whether the C++ kernels can run a weight of this variant (building them on first use)."""
    block, interleaved = parse_variant(variant)
    return (
        interleaved
        and block in (32, 64)
        and scales_and_zeros.dtype == torch.bfloat16
        and cpu_ext.load()
    )


def decode_max_m(variant: str, scales_and_zeros: torch.Tensor) -> int:
    """Largest M that takes the decode path for this weight."""
    return EXT_DECODE_MAX_M if ext_supports(variant, scales_and_zeros) else DECODE_MAX_M


def linear(
    x2d: torch.Tensor,
    packed: torch.Tensor,
    scales_and_zeros: torch.Tensor,
    in_features: int,
    group_size: int,
    variant: str,
) -> torch.Tensor:
    """``x2d @ W.T`` (``x2d.dtype`` out, ``M > 0`` rows) by the path for ``M`` (module doc)."""
    m = x2d.shape[0]
    ext = ext_supports(variant, scales_and_zeros)
    path = forced = _FORCED.get()
    if path is None:
        if m > (EXT_DECODE_MAX_M if ext else DECODE_MAX_M):
            path = "dequant"
        elif ext:
            path = "ext"
        elif variant == cpu_tinygemm_variant() and scales_and_zeros.dtype == torch.bfloat16:
            path = "tinygemm"
        else:  # packed for another CPU's tinygemm permutation (or unusual metadata)
            path = "dequant"
    if path == "ext":
        if not ext:
            raise RuntimeError(
                f"awq_ao's CPU kernel cannot run this weight ({_ext_missing(variant, scales_and_zeros)})."
            )
        return ext_linear(x2d, packed, scales_and_zeros, in_features, group_size, variant)
    if path == "tinygemm":
        if variant != cpu_tinygemm_variant():
            raise RuntimeError(f"weight packed as {variant}, this CPU's tinygemm reads {cpu_tinygemm_variant()}.")
        why = "forced" if forced else _ext_missing(variant, scales_and_zeros)
        return tinygemm_linear(x2d, packed, scales_and_zeros, in_features, group_size, why)
    return dequant_linear(x2d, packed, scales_and_zeros, in_features, group_size, variant)


def _ext_missing(variant: str, scales_and_zeros: torch.Tensor) -> str:
    reason = cpu_ext.unavailable_reason()
    if reason is not None:
        return reason
    if scales_and_zeros.dtype != torch.bfloat16:
        return f"{scales_and_zeros.dtype} scales; the C++ kernel reads bfloat16"
    return f"variant {variant}; the C++ kernel reads b32i and b64i"


# --------------------------------------------------------------------------------------------
# decode: awq_ao's C++ kernel, or tinygemm
# --------------------------------------------------------------------------------------------


def _padded_float32(x2d: torch.Tensor, in_features: int, k_pad: int) -> torch.Tensor:
    x = x2d.to(torch.float32)
    if k_pad != in_features:
        x = F.pad(x, (0, k_pad - in_features))
    return x.contiguous()


def ext_linear(
    x2d: torch.Tensor,
    packed: torch.Tensor,
    scales_and_zeros: torch.Tensor,
    in_features: int,
    group_size: int,
    variant: str,
) -> torch.Tensor:
    """``x2d @ W.T`` through awq_ao's C++ kernel (int16 activations, float32 accumulation of
    the exact integer group sums; ``x2d.dtype`` out)."""
    tg, k_pad = tinygemm_geometry(in_features, group_size)  # type: ignore[misc]
    block, _ = parse_variant(variant)
    x = _padded_float32(x2d, in_features, k_pad)
    y = torch.ops.awq_ao_cpu.int4_gemm(x, packed, scales_and_zeros, tg, block)
    _note(packed.shape[0], in_features, x2d.dtype, "decode", "awq_ao C++ kernel (AVX2, int16 activations)")
    return y if x2d.dtype == torch.float32 else y.to(x2d.dtype)



def tinygemm_linear(
    x2d: torch.Tensor,
    packed: torch.Tensor,
    scales_and_zeros: torch.Tensor,
    in_features: int,
    group_size: int,
    why: str = "",
) -> torch.Tensor:
    """``x2d @ W.T`` through ``aten._weight_int4pack_mm_for_cpu`` in bfloat16 (``x2d.dtype`` out);
    ``why`` (the C++ kernel is not used) goes into the path log."""
    tg, k_pad = tinygemm_geometry(in_features, group_size)  # type: ignore[misc]
    xb = x2d.to(torch.bfloat16)
    if k_pad != in_features:
        xb = F.pad(xb, (0, k_pad - in_features))
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb.contiguous(), packed, tg, scales_and_zeros)
    _note(packed.shape[0], in_features, x2d.dtype, "decode", "tinygemm bf16" + (f" ({why})" if why else ""))
    return y if x2d.dtype == torch.bfloat16 else y.to(x2d.dtype)


# --------------------------------------------------------------------------------------------
# dequantization straight from the tinygemm layout
# --------------------------------------------------------------------------------------------


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


def dequant_linear(
    x2d: torch.Tensor,
    packed: torch.Tensor,
    scales_and_zeros: torch.Tensor,
    in_features: int,
    group_size: int,
    variant: str,
) -> torch.Tensor:
    """``x2d @ W.T`` by block-wise dequantization and float32 matmuls (``x2d.dtype`` out)."""
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
    _note(n, in_features, x2d.dtype, "prefill", f"dequant ({how}) + fp32 matmul")
    return y if x2d.dtype == torch.float32 else y.to(x2d.dtype)
