"""``torch.library`` custom ops behind :class:`~awq_ao.lowering.int4_tensor.Int4WeightTensor`.

``awq_ao::w4a16_linear``
    ``y = x @ dequant(W).T + bias`` in ``x``'s dtype. Opaque to ``torch.compile`` and
    preserved by ``torch.export``; fake (meta) and autograd (grad w.r.t. ``x`` and ``bias``,
    never the weight) formulas are registered.

    * CPU, ``cpu_tinygemm`` layout: :mod:`awq_ao.lowering.cpu_kernels` (awq_ao's C++ decode
      kernel, or ATen's tinygemm in bfloat16 where it cannot be built, for small M;
      block-wise dequantization + float32 matmul above), for float32, bfloat16 and float16
      activations.
    * CPU, other layouts: a vectorised dequantization in row chunks followed by ``F.linear``
      (chunking keeps the dequantized block cache-sized).
    * CUDA: ``awq_ao.kernels.w4a16_linear`` when that module is importable, the layout is
      ``nibble`` and ``x`` is fp16/bf16; else dequantize + ``F.linear``.

``awq_ao::dequantize``
    The dequantized ``[N, K]`` weight in a requested dtype.
"""

from __future__ import annotations

import functools
import logging
import os

import torch
import torch.nn.functional as F

from awq_ao.lowering import cpu_dequant, cpu_kernels, packing
from awq_ao.lowering.packing import (
    LAYOUT_BYTE,
    LAYOUT_CPU_TINYGEMM,
    LAYOUT_NIBBLE,
    tinygemm_geometry,
)
from awq_ao.lowering.quant_math import effective_group_size, num_groups

__all__ = ["w4a16_linear", "dequantize_weight", "dequantize_packed", "TINYGEMM_MAX_M"]

log = logging.getLogger(__name__)

#: Largest number of activation rows sent to CPU tinygemm when awq_ao's C++ kernel is not
#: available (see :mod:`cpu_kernels`).
TINYGEMM_MAX_M = cpu_kernels.DECODE_MAX_M

#: Elements of the dequantized weight block materialised at a time on CPU.
_CPU_CHUNK_ELEMS = 1 << 20

#: Set ``AWQ_AO_DISABLE_KERNELS=1`` to skip ``awq_ao.kernels`` (compare against the fallback).
_KERNELS_DISABLED = os.environ.get("AWQ_AO_DISABLE_KERNELS", "0") == "1"


# --------------------------------------------------------------------------------------------
# dequantization (plain tensors, eager)
# --------------------------------------------------------------------------------------------


def _raw_codes(packed: torch.Tensor, bits: int, layout: str, n: int, k: int, variant: str):
    """Codes ``uint8 [n, k]``, possibly a view of ``packed`` (byte layout): do not mutate."""
    if layout == LAYOUT_BYTE:
        return packed[:, :k]
    return packing.unpack(packed, bits, layout, n, k, variant or None)


def _dequant_codes_(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``(codes - zero) * scale`` as a new contiguous ``dtype [n, k]`` tensor.

    Computed in ``dtype`` with in-place group-broadcast ops. ``code - zero`` is an exact small
    integer, so the single rounding of the product matches computing in float32 and casting.
    """
    n, k = codes.shape
    gs = effective_group_size(k, group_size)
    w = codes.to(dtype, memory_format=torch.contiguous_format)
    s = scale.to(dtype)
    z = zero.to(dtype)
    g_full = k // gs
    if g_full:
        wv = w[:, : g_full * gs].view(n, g_full, gs)
        wv.sub_(z[:, :g_full, None]).mul_(s[:, :g_full, None])
    if g_full * gs < k:  # ragged last group
        w[:, g_full * gs :].sub_(z[:, g_full : g_full + 1]).mul_(s[:, g_full : g_full + 1])
    return w


def dequantize_packed(
    packed: torch.Tensor,
    scale: torch.Tensor | None,
    zero: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    layout: str,
    variant: str = "",
    dtype: torch.dtype = torch.float32,
    scales_and_zeros: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dequantize a packed weight to a plain ``dtype [N, in_features]`` tensor (eager helper).

    ``cpu_tinygemm`` weights pass ``scales_and_zeros`` (and ``None`` scale/zero): they
    dequantize as the kernel does, ``(q - 8) * scale + offset`` in float32.
    """
    n = packed.shape[0]
    if layout == LAYOUT_CPU_TINYGEMM:
        if scales_and_zeros is None:
            raise ValueError("a cpu_tinygemm weight needs its scales_and_zeros.")
        tg, k_pad = tinygemm_geometry(in_features, group_size)  # type: ignore[misc]
        codes = packing.unpack(packed, bits, layout, n, k_pad, variant or None)
        w = cpu_dequant.dequant_rows(codes, scales_and_zeros, tg)[:, :in_features]
        return w.to(dtype).contiguous()
    if scale is None or zero is None:
        raise ValueError(f"a {layout} weight needs its scale and zero.")
    codes = _raw_codes(packed, bits, layout, n, in_features, variant)
    return _dequant_codes_(codes, scale, zero, group_size, dtype)


def _check_args(x, packed, scale, zero, group_size, in_features, layout, scales_and_zeros=None):
    if x.shape[-1] != in_features:
        raise ValueError(
            f"w4a16_linear: input has {x.shape[-1]} features, weight expects {in_features}."
        )
    if layout not in packing.LAYOUTS:
        raise ValueError(f"w4a16_linear: unknown layout {layout!r}.")
    n = packed.shape[0]
    if layout == LAYOUT_CPU_TINYGEMM:
        if scales_and_zeros is None or scales_and_zeros.dim() != 3 or scales_and_zeros.shape[1] != n:
            raise ValueError(
                f"w4a16_linear: a cpu_tinygemm weight needs scales_and_zeros [G, {n}, 2], got "
                f"{None if scales_and_zeros is None else tuple(scales_and_zeros.shape)}."
            )
        return
    g = num_groups(in_features, group_size)
    if scale is None or zero is None or scale.shape != (n, g) or zero.shape != scale.shape:
        raise ValueError(
            f"w4a16_linear: scale/zero must be [{n}, {g}], got "
            f"{None if scale is None else tuple(scale.shape)} / "
            f"{None if zero is None else tuple(zero.shape)}."
        )


def _add_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if bias is not None:
        y.add_(bias.to(y.dtype))
    return y


def _linear_dequant(
    x2d,
    packed,
    scale,
    zero,
    bias,
    bits,
    group_size,
    in_features,
    layout,
    variant,
    chunk_elems: int | None,
) -> torch.Tensor:
    n = packed.shape[0]
    k = in_features
    dtype = x2d.dtype
    if chunk_elems is None or n * k <= 2 * chunk_elems:
        w = dequantize_packed(packed, scale, zero, bits, group_size, k, layout, variant, dtype)
        return F.linear(x2d, w, None if bias is None else bias.to(dtype))
    # Row chunks that are multiples of 128 keep tinygemm row blocks whole.
    rows = max(128, (chunk_elems // k) // 128 * 128)
    y = x2d.new_empty(x2d.shape[0], n)
    for n0 in range(0, n, rows):
        n1 = min(n, n0 + rows)
        codes = _raw_codes(packed[n0:n1], bits, layout, n1 - n0, k, variant)
        w = _dequant_codes_(codes, scale[n0:n1], zero[n0:n1], group_size, dtype)
        y[:, n0:n1] = F.linear(x2d, w)
    return _add_bias(y, bias)


def _linear_cpu_tinygemm(x2d, packed, bias, group_size, in_features, variant, scales_and_zeros):
    if x2d.dtype == torch.float64:  # reference precision: no bf16 / fp32 shortcuts
        w = dequantize_packed(
            packed, None, None, 4, group_size, in_features, LAYOUT_CPU_TINYGEMM, variant,
            torch.float64, scales_and_zeros,
        )
        cpu_kernels._note(packed.shape[0], in_features, x2d.dtype, "any", "dequant + fp64 matmul")
        return _add_bias(F.linear(x2d, w), bias)
    y = cpu_kernels.linear(x2d, packed, scales_and_zeros, in_features, group_size, variant)
    return _add_bias(y, bias)


@functools.cache
def _cuda_kernel():
    """``awq_ao.kernels.w4a16_linear`` if importable, else ``None``."""
    if _KERNELS_DISABLED:
        return None
    try:
        from awq_ao.kernels import is_available, w4a16_linear
    except ImportError as e:
        log.debug("awq_ao.kernels unavailable, CUDA uses dequantize + F.linear: %s", e)
        return None
    if not is_available():
        log.debug("awq_ao.kernels present but Triton/CUDA unavailable; using dequantize")
        return None
    return w4a16_linear


# --------------------------------------------------------------------------------------------
# awq_ao::w4a16_linear
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("awq_ao::w4a16_linear", mutates_args=())
def w4a16_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor | None,
    zero: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    layout: str,
    variant: str = "",
    scales_and_zeros: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ dequant(W).T + bias`` in ``x.dtype`` for a packed weight.

    Args:
        x: activations ``[..., in_features]`` (any float dtype).
        packed: packed codes (see :mod:`awq_ao.lowering.packing`); ``N = packed.shape[0]``.
        scale, zero: per-group ``[N, G]`` (``None`` for the cpu_tinygemm layout).
        bias: optional ``[N]``.
        bits, group_size, in_features: quantization parameters (``group_size=-1``: per channel).
        layout: ``"nibble"``, ``"byte"`` or ``"cpu_tinygemm"``.
        variant: cpu_tinygemm permutation the weight was packed with (``""`` otherwise).
        scales_and_zeros: tinygemm ``[G_tg, N, 2]`` (the cpu_tinygemm layout's metadata).
    """
    # Generic implementation (devices without a dedicated kernel).
    _check_args(x, packed, scale, zero, group_size, in_features, layout, scales_and_zeros)
    x2d = x.reshape(-1, in_features)
    y = _linear_dequant(
        x2d, packed, scale, zero, bias, bits, group_size, in_features, layout, variant, None
    )
    return y.reshape(*x.shape[:-1], packed.shape[0])


@w4a16_linear.register_kernel("cpu")
def _w4a16_linear_cpu(
    x,
    packed,
    scale,
    zero,
    bias,
    bits,
    group_size,
    in_features,
    layout,
    variant="",
    scales_and_zeros=None,
):
    _check_args(x, packed, scale, zero, group_size, in_features, layout, scales_and_zeros)
    n = packed.shape[0]
    x2d = x.reshape(-1, in_features)
    if x2d.shape[0] == 0:
        return x.new_zeros(*x.shape[:-1], n)
    if layout == LAYOUT_CPU_TINYGEMM:
        y = _linear_cpu_tinygemm(x2d, packed, bias, group_size, in_features, variant, scales_and_zeros)
    else:
        cpu_kernels._note(n, in_features, x.dtype, "any", f"dequant + {x.dtype} matmul ({layout} layout)")
        y = _linear_dequant(
            x2d,
            packed,
            scale,
            zero,
            bias,
            bits,
            group_size,
            in_features,
            layout,
            variant,
            _CPU_CHUNK_ELEMS,
        )
    return y.reshape(*x.shape[:-1], n)


@w4a16_linear.register_kernel("cuda")
def _w4a16_linear_cuda(
    x,
    packed,
    scale,
    zero,
    bias,
    bits,
    group_size,
    in_features,
    layout,
    variant="",
    scales_and_zeros=None,
):
    _check_args(x, packed, scale, zero, group_size, in_features, layout, scales_and_zeros)
    n = packed.shape[0]
    x2d = x.reshape(-1, in_features)
    if x2d.shape[0] == 0:
        return x.new_zeros(*x.shape[:-1], n)
    kernel = _cuda_kernel()
    if (
        kernel is not None
        and layout == LAYOUT_NIBBLE
        and x.dtype in (torch.float16, torch.bfloat16)
    ):
        try:
            y = kernel(x2d, packed, scale, zero, group_size, bias)
            return y.reshape(*x.shape[:-1], n)
        except NotImplementedError as e:  # kernel declines this shape / config
            log.debug("awq_ao.kernels.w4a16_linear declined: %s", e)
    y = _linear_dequant(
        x2d, packed, scale, zero, bias, bits, group_size, in_features, layout, variant, None
    )
    return y.reshape(*x.shape[:-1], n)


@w4a16_linear.register_fake
def _w4a16_linear_fake(
    x,
    packed,
    scale,
    zero,
    bias,
    bits,
    group_size,
    in_features,
    layout,
    variant="",
    scales_and_zeros=None,
):
    torch._check(
        x.shape[-1] == in_features,
        lambda: f"w4a16_linear: input has {x.shape[-1]} features, weight expects {in_features}.",
    )
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


def _setup_context(ctx, inputs, output):
    x, packed, scale, zero, bias, bits, group_size, in_features, layout, variant, sz = inputs
    ctx.save_for_backward(packed, scale, zero, sz)
    ctx.meta = (bits, group_size, in_features, layout, variant)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad):
    packed, scale, zero, sz = ctx.saved_tensors
    bits, group_size, in_features, layout, variant = ctx.meta
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        w = torch.ops.awq_ao.dequantize(
            packed, scale, zero, bits, group_size, in_features, layout, variant, grad.dtype, sz
        )
        grad_x = torch.matmul(grad, w)
    if ctx.needs_input_grad[4]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
    return grad_x, None, None, None, grad_bias, None, None, None, None, None, None


w4a16_linear.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# awq_ao::dequantize
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("awq_ao::dequantize", mutates_args=())
def dequantize_weight(
    packed: torch.Tensor,
    scale: torch.Tensor | None,
    zero: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    layout: str,
    variant: str,
    dtype: torch.dtype,
    scales_and_zeros: torch.Tensor | None = None,
) -> torch.Tensor:
    """The dequantized weight as ``dtype [N, in_features]`` (see :func:`dequantize_packed`)."""
    return dequantize_packed(
        packed, scale, zero, bits, group_size, in_features, layout, variant, dtype, scales_and_zeros
    )


@dequantize_weight.register_fake
def _dequantize_weight_fake(
    packed, scale, zero, bits, group_size, in_features, layout, variant, dtype, scales_and_zeros=None
):
    return packed.new_empty((packed.shape[0], in_features), dtype=dtype)
