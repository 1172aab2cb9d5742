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
    activations (:mod:`awq_ao.lowering.cpu_dequant`). The matmul runs in float32 for every
    activation dtype: on these CPUs it is as fast as or faster than a bfloat16 matmul, and
    more exact.

Every path is logged once per (shape, dtype, path) and listed by :func:`chosen_paths`.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading

import torch
import torch.nn.functional as F

import awq_ao.lowering.cpu_dequant as cpu_dequant
import awq_ao.lowering.cpu_ext as cpu_ext
from awq_ao.lowering.packing import cpu_tinygemm_variant, parse_variant, tinygemm_geometry

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
    "tinygemm_linear",
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

_lock = threading.Lock()
_seen: dict[tuple, str] = {}


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
# prefill: block dequantization + float32 matmul (awq_ao.lowering.cpu_dequant)
# --------------------------------------------------------------------------------------------


def dequant_linear(
    x2d: torch.Tensor,
    packed: torch.Tensor,
    scales_and_zeros: torch.Tensor,
    in_features: int,
    group_size: int,
    variant: str,
) -> torch.Tensor:
    """``x2d @ W.T`` by block-wise dequantization and float32 matmuls (``x2d.dtype`` out):
    :func:`awq_ao.lowering.cpu_dequant.dequant_matmul`, with the C++ dequantization where
    :func:`ext_supports` says the C++ kernels can run the weight; logs the path."""
    y, how = cpu_dequant.dequant_matmul(
        x2d, packed, scales_and_zeros, in_features, group_size, variant, ext_supports
    )
    _note(packed.shape[0], in_features, x2d.dtype, "prefill", f"dequant ({how}) + fp32 matmul")
    return y if x2d.dtype == torch.float32 else y.to(x2d.dtype)
