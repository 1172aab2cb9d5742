"""W4A16 linear: ``y = x @ dequant(Wq).T (+ bias)`` with Triton kernels.

Weight format (the package's, see :mod:`awq_ao.lowering.quant_math`): ``packed`` is
``uint8 [N, ceil(K / 2)]`` row-major, low nibble = code of the even k, high nibble = code of
the odd k (codes 0..15; 2/3-bit codes are stored the same way); ``scale`` and ``zero`` are
``[N, G]`` with ``G = ceil(K / group_size)`` (``group_size == -1``: one group of K), and
``w_hat[n, k] = (code[n, k] - zero[n, k // group_size]) * scale[n, k // group_size]``.
The kernels read this format as is: no repacking, no transposed copies per call.

Two kernels, chosen by M (rows of ``x``):

* ``M <= DECODE_MAX_M`` (4) -- a GEMV-style decode kernel on CUDA cores: split-K over
  enough programs to fill every SM several times, 16-byte weight loads, the per-group scale
  applied once per group instead of once per weight, no tensor-core padding of M to 16.
* larger M -- a tiled GEMM on tensor cores (``tl.dot``), weights dequantized per tile into
  the activation dtype; split-K for small M when the output tiles cannot fill the GPU.

Both accumulate in fp32, fuse the bias and write the output in the activation dtype. On CUDA
they are autotuned per shape bucket; under ``TRITON_INTERPRET=1`` (CPU) fixed configs are
used. The Triton module is imported lazily, on the first call: set ``TRITON_INTERPRET``
before that.
"""

from __future__ import annotations

import os
import sys
from types import ModuleType
from typing import Literal

import torch

__all__ = ["DECODE_MAX_M", "GEMV_MAX_M", "is_available", "w4a16_linear"]

#: Largest M the GEMV kernel accepts when forced with ``kernel="gemv"`` (benchmarks).
GEMV_MAX_M = 16
#: Largest M that ``kernel="auto"`` sends to the GEMV (CUDA-core) kernel; larger M uses the
#: tensor-core GEMM.
#: Per weight the GEMV spends ~3 instructions on dequantization plus one FMA per row of x,
#: so beyond a few rows it becomes issue bound while the GEMM's dequantization cost is
#: shared by all rows of the tile. Not yet tuned by measurement (see benchmarks/kernels.py).
DECODE_MAX_M = 4

_ACT_DTYPES = (torch.float16, torch.bfloat16)
_PARAM_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: The ``@triton.jit`` kernels (their decoration fixes interpreter vs compiled mode) and the
#: module that configures and launches them (imports the former; loaded lazily).
_KERNEL_MODULE = "awq_ao.kernels._w4a16_triton"
_LAUNCH_MODULE = "awq_ao.kernels._w4a16_launch"
_kernels: ModuleType | None = None
# Split-K workspace per (device, stream): fp32 partial sums and int32 tile counters, kept at
# zero between launches by the kernels themselves (the last split of a tile resets it).
_WORKSPACE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpret_mode() -> bool:
    """Whether the kernels run (or, once imported, will run) in Triton's interpreter."""
    mod = sys.modules.get(_KERNEL_MODULE)
    if mod is not None:
        return bool(mod.INTERPRET)
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def is_available() -> bool:
    """True if :func:`w4a16_linear` can run here: Triton importable and a CUDA device
    present, or the Triton CPU interpreter enabled (``TRITON_INTERPRET=1``)."""
    if not _triton_importable():
        return False
    return _interpret_mode() or torch.cuda.is_available()


def _load_kernels() -> ModuleType:
    global _kernels
    if _kernels is None:
        import importlib

        _kernels = importlib.import_module(_LAUNCH_MODULE)
    return _kernels


def _gs_pow2(group_size: int, k: int, g: int) -> int:
    """Largest power of two dividing the group size (huge for a single group)."""
    if g == 1:
        return 1 << 30
    return group_size & -group_size


def _check(
    x2d: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None,
) -> tuple[int, int, int, int]:
    """Validate the arguments; return ``(M, N, K, G)``."""
    for name, t in (("x2d", x2d), ("packed", packed), ("scale", scale), ("zero", zero)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
    if x2d.dtype == torch.float32:
        raise TypeError(
            "w4a16_linear needs float16 or bfloat16 activations; got float32. Use the "
            "dequantize + F.linear path for float32 (awq_ao.lowering), or cast x."
        )
    if x2d.dtype not in _ACT_DTYPES:
        raise TypeError(f"x2d must be float16 or bfloat16, got {x2d.dtype}.")
    if x2d.dim() != 2:
        raise ValueError(f"x2d must be 2-D [M, K], got shape {tuple(x2d.shape)}.")
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be uint8 (two 4-bit codes per byte), got {packed.dtype}.")
    if packed.dim() != 2:
        raise ValueError(f"packed must be 2-D [N, ceil(K/2)], got shape {tuple(packed.shape)}.")
    m, k = x2d.shape
    n, kp = packed.shape
    if k == 0:
        raise ValueError("x2d has K == 0 columns; a linear layer needs K >= 1.")
    if kp != (k + 1) // 2:
        raise ValueError(
            f"packed has {kp} bytes per row but x2d has K={k} columns; expected "
            f"ceil(K/2) = {(k + 1) // 2}."
        )
    if not isinstance(group_size, int) or isinstance(group_size, bool):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__}.")
    if group_size != -1 and group_size <= 0:
        raise ValueError(f"group_size={group_size} must be a positive integer or -1.")
    gs = k if group_size == -1 else group_size
    g = -(-k // gs)
    for name, t in (("scale", scale), ("zero", zero)):
        if t.dim() != 2 or tuple(t.shape) != (n, g):
            raise ValueError(
                f"{name} must have shape [N, G] = [{n}, {g}] (K={k}, group_size={group_size}), "
                f"got {tuple(t.shape)}."
            )
    if scale.dtype not in _PARAM_DTYPES:
        raise TypeError(f"scale must be float16, bfloat16 or float32, got {scale.dtype}.")
    if zero.dtype not in _PARAM_DTYPES and zero.dtype not in (torch.uint8, torch.int32):
        raise TypeError(f"zero must be a float (or uint8/int32) tensor, got {zero.dtype}.")
    if g > 1 and gs % 2:
        raise ValueError(
            f"group_size={group_size} is odd: the two codes of a byte would fall in different "
            "groups, which the kernels do not support. Use the dequantize + F.linear path."
        )
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}.")
        if tuple(bias.shape) != (n,):
            raise ValueError(f"bias must have shape [N] = [{n}], got {tuple(bias.shape)}.")
        if bias.dtype not in _PARAM_DTYPES:
            raise TypeError(f"bias must be float16, bfloat16 or float32, got {bias.dtype}.")
    tensors = [packed, scale, zero] + ([bias] if bias is not None else [])
    for t in tensors:
        if t.device != x2d.device:
            raise ValueError(
                f"all tensors must be on one device; x2d is on {x2d.device}, got {t.device}."
            )
    return m, n, k, g


def _workspace(device: torch.device, n_ws: int, n_cnt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed split-K workspace with at least ``n_ws`` fp32 and ``n_cnt`` int32 elements.

    Cached per (device, stream) and grown on demand; every launch leaves it zero again. While
    a CUDA graph is being captured a fresh one is allocated instead (its memset is captured),
    so no cached tensor ever lives in a graph's private memory pool.
    """
    n_ws, n_cnt = max(n_ws, 1), max(n_cnt, 1)
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return (
                torch.zeros(n_ws, dtype=torch.float32, device=device),
                torch.zeros(n_cnt, dtype=torch.int32, device=device),
            )
        key = (device.type, device.index, torch.cuda.current_stream(device).cuda_stream)
    else:
        key = (device.type, device.index, 0)
    ws, cnt = _WORKSPACE.get(key, (None, None))
    if ws is None or ws.numel() < n_ws:
        ws = torch.zeros(
            max(n_ws, 2 * ws.numel() if ws is not None else 0), dtype=torch.float32, device=device
        )
    if cnt is None or cnt.numel() < n_cnt:
        cnt = torch.zeros(
            max(n_cnt, 2 * cnt.numel() if cnt is not None else 0), dtype=torch.int32, device=device
        )
    _WORKSPACE[key] = (ws, cnt)
    return ws, cnt


def w4a16_linear(
    x2d: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    *,
    kernel: Literal["auto", "gemv", "gemm"] = "auto",
) -> torch.Tensor:
    """``x2d @ dequant(packed, scale, zero).T + bias`` in ``x2d``'s dtype (fp32 accumulation).

    Args:
        x2d: activations ``[M, K]``, float16 or bfloat16 (any strides; made contiguous).
        packed: ``uint8 [N, ceil(K/2)]``, low nibble = code of even k, high = odd k.
        scale: ``[N, G]`` per-group scales (fp16/bf16/fp32), ``G = ceil(K / group_size)``.
        zero: ``[N, G]`` per-group zero points, same dtypes (integer-valued in this package;
            other values are handled too, as long as ``|zero| < 2**22``).
        group_size: group length along K (ragged last group allowed; must be even unless
            there is a single group), or -1 for one group per row.
        bias: optional ``[N]`` bias, added in fp32 before the final rounding.
        kernel: ``"auto"`` picks the decode kernel for ``M <= DECODE_MAX_M`` and the GEMM
            otherwise; ``"gemv"`` (``M <= GEMV_MAX_M``) / ``"gemm"`` force one (benchmarks).

    Returns:
        ``[M, N]`` tensor in ``x2d.dtype``.

    On CUDA the first call for a new (shape, M bucket, dtypes) autotunes, i.e. runs the
    kernel with each candidate config: make that call before capturing a CUDA graph.
    Split-K launches share a zero-initialised workspace per (device, stream); concurrent
    calls from several host threads on the *same* stream are not supported.

    Raises:
        TypeError: float32 (use the dequantize path) or other unsupported dtypes.
        ValueError: inconsistent shapes, devices, ``group_size`` or ``kernel``.
        RuntimeError: no CUDA device / tensors on CPU outside interpreter mode, or Triton
            missing (see :func:`is_available`).
    """
    return _w4a16_linear(x2d, packed, scale, zero, group_size, bias, kernel=kernel)


def _w4a16_linear(
    x2d: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    *,
    kernel: str = "auto",
    config: dict | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`w4a16_linear` plus test hooks: a fixed launch ``config`` (see
    ``_w4a16_launch.launch``) and a caller-provided contiguous ``out`` buffer."""
    m, n, k, g = _check(x2d, packed, scale, zero, group_size, bias)
    if kernel not in ("auto", "gemv", "gemm"):
        raise ValueError(f"kernel must be 'auto', 'gemv' or 'gemm', got {kernel!r}.")
    path = kernel if kernel != "auto" else ("gemv" if m <= DECODE_MAX_M else "gemm")
    if path == "gemv" and m > GEMV_MAX_M:
        raise ValueError(f"the gemv kernel handles M <= {GEMV_MAX_M} rows, got M={m}.")
    if out is None:
        out = torch.empty((m, n), dtype=x2d.dtype, device=x2d.device)
    elif out.shape != (m, n) or out.dtype != x2d.dtype or not out.is_contiguous():
        raise ValueError("out must be a contiguous [M, N] tensor in x2d's dtype.")
    if m == 0 or n == 0:
        return out
    if not _triton_importable():
        raise RuntimeError("w4a16_linear needs Triton (pip install triton).")
    interpret = _interpret_mode()
    if not interpret and x2d.device.type != "cuda":
        raise RuntimeError(
            f"w4a16_linear runs on CUDA tensors (got {x2d.device}); set TRITON_INTERPRET=1 "
            "before the first call to run the kernels on CPU, or use the dequantize path."
        )
    kmod = _load_kernels()
    gs = k if group_size == -1 else group_size
    group = k if g == 1 else gs
    n_ws, n_cnt = kmod.workspace_size(path, m, n, config)
    ws, cnt = _workspace(x2d.device, n_ws, n_cnt)
    kmod.launch(
        path,
        x2d.contiguous(),
        packed.contiguous(),
        scale.contiguous(),
        zero.contiguous(),
        None if bias is None else bias.contiguous(),
        out,
        ws,
        cnt,
        group,
        _gs_pow2(gs, k, g),
        config,
    )
    return out
