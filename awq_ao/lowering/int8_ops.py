"""``awq_ao::w8_linear``: ``x @ (codes * scale).T + bias`` for an 8-bit row-wise weight.

The op behind :class:`~awq_ao.lowering.int8_tensor.Int8RowWeightTensor` (the quantized output
head). ``codes`` is ``[N, K]`` int8 (symmetric, -127..127) and ``scale`` ``[N]`` float32, so
``W[n, k] = codes[n, k] * scale[n]``.

CPU: up to :data:`EXT_MAX_M` rows go through the C++ kernel ``awq_ao_cpu::int8_gemm``
(int16 activations, exact integer dot products, one read of the weight per four rows); more
rows, a ``K`` that is not a multiple of 32, or no C++ kernels dequantize blocks of
:data:`DEQUANT_ROWS` weight rows into ``x``'s dtype and use a dense matmul (the path and the
reason are logged once per shape, see :func:`awq_ao.lowering.cpu_kernels.chosen_paths`).
:func:`awq_ao.lowering.cpu_kernels.forced_path` (``"ext"`` or ``"dequant"``) forces a path here
too (``"tinygemm"`` has no 8-bit kernel and leaves the choice as it is). Other devices: the
dequantizing path.
"""

from __future__ import annotations

import torch

__all__ = ["EXT_MAX_M", "DEQUANT_ROWS", "w8_linear", "dequantize_rows", "activation_group", "ext_linear"]

#: Most activation rows the C++ kernel takes; above it dequantize + matmul is faster (measured
#: on a 2-core AVX2 EPYC, 128256 x 2048 head, float32: at M = 128 the kernel takes 0.49 s and
#: dequantize + matmul 0.74 s; see docs/cpu_kernels.md).
EXT_MAX_M = 128

#: Weight rows dequantized at a time by the dense path: a block stays in cache (256 rows: 0.74 s
#: at M = 128 for the head above, 8192 rows: 1.64 s; dense float32 0.65 s).
DEQUANT_ROWS = 256


def activation_group(k: int) -> int:
    """Columns per int16 activation scale in the C++ kernel: the largest of 128, 64, 32 that
    divides ``k``; 0 when none does (the kernel cannot take this ``k``)."""
    for g in (128, 64, 32):
        if k % g == 0:
            return g
    return 0


def dequantize_rows(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``codes * scale[:, None]`` computed in float32, returned in ``dtype``."""
    return (codes.to(torch.float32) * scale.to(torch.float32).unsqueeze(-1)).to(dtype)


def _dequant_matmul(x2d: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    n = codes.shape[0]
    if n <= DEQUANT_ROWS:
        return x2d @ dequantize_rows(codes, scale, x2d.dtype).T
    y = x2d.new_empty(x2d.shape[0], n)
    for n0 in range(0, n, DEQUANT_ROWS):
        n1 = min(n, n0 + DEQUANT_ROWS)
        torch.matmul(x2d, dequantize_rows(codes[n0:n1], scale[n0:n1], x2d.dtype).T, out=y[:, n0:n1])
    return y


def ext_linear(x2d: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x2d @ W.T`` through ``awq_ao_cpu::int8_gemm`` (the kernels must be loaded and ``K`` a
    multiple of 32), in ``x2d.dtype``."""
    k = codes.shape[1]
    y = torch.ops.awq_ao_cpu.int8_gemm(
        x2d.to(torch.float32).contiguous(), codes.contiguous(), scale.to(torch.float32).contiguous(), activation_group(k)
    )
    return y.to(x2d.dtype)


def _cpu_path(m: int, k: int) -> tuple[str, str]:
    from awq_ao.lowering import cpu_ext
    from awq_ao.lowering.cpu_kernels import _FORCED

    forced = _FORCED.get()  # cpu_kernels.forced_path: "ext" / "dequant" apply here too
    if forced == "dequant":
        return "dequant", "dequantize + matmul (forced)"
    if forced == "ext":
        if activation_group(k) == 0 or not cpu_ext.load():
            raise RuntimeError(
                f"forced_path('ext'): the C++ int8 kernel cannot run this weight (K = {k}, "
                f"kernels: {cpu_ext.unavailable_reason() or 'available'})."
            )
        return "ext", "C++ int8 kernel (int16 activations, forced)"
    if m > EXT_MAX_M:
        return "dequant", f"dequantize + matmul (M > {EXT_MAX_M})"
    if activation_group(k) == 0:
        return "dequant", f"dequantize + matmul (C++ kernel needs K % 32 == 0, K = {k})"
    if not cpu_ext.load():
        return "dequant", f"dequantize + matmul (C++ kernels unavailable: {cpu_ext.unavailable_reason()})"
    return "ext", "C++ int8 kernel (int16 activations)"


def _check(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> None:
    if codes.dtype != torch.int8 or codes.dim() != 2:
        raise TypeError(f"w8_linear: codes must be a 2-D int8 tensor, got {codes.dtype} {list(codes.shape)}.")
    if scale.shape != codes.shape[:1]:
        raise ValueError(f"w8_linear: scale must be [N] = [{codes.shape[0]}], got {list(scale.shape)}.")
    if x.shape[-1] != codes.shape[1]:
        raise ValueError(
            f"w8_linear: input has {x.shape[-1]} features (shape {tuple(x.shape)}), the weight {codes.shape[1]}."
        )


@torch.library.custom_op("awq_ao::w8_linear", mutates_args=())
def w8_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ (codes * scale[:, None]).T + bias`` in ``x.dtype`` (any float dtype, any leading dims)."""
    _check(x, codes, scale)
    x2d = x.reshape(-1, codes.shape[1])
    y = _dequant_matmul(x2d, codes, scale)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], codes.shape[0])


@w8_linear.register_kernel("cpu")
def _w8_linear_cpu(x, codes, scale, bias):
    from awq_ao.lowering.cpu_kernels import _note

    _check(x, codes, scale)
    n, k = codes.shape
    x2d = x.reshape(-1, k)
    m = x2d.shape[0]
    path, what = _cpu_path(m, k)
    _note(n, k, x.dtype, "int8 decode" if m <= EXT_MAX_M else "int8 prefill", what)
    if path == "ext":
        y = ext_linear(x2d, codes, scale)
    else:
        y = _dequant_matmul(x2d, codes, scale)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], n)


@w8_linear.register_fake
def _w8_linear_fake(x, codes, scale, bias):
    torch._check(
        x.shape[-1] == codes.shape[1],
        lambda: f"w8_linear: input has {x.shape[-1]} features, the weight {codes.shape[1]}.",
    )
    return x.new_empty((*x.shape[:-1], codes.shape[0]))


def _setup_context(ctx, inputs, output):
    x, codes, scale, bias = inputs
    ctx.save_for_backward(codes, scale)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad):
    codes, scale = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.matmul(grad, dequantize_rows(codes, scale, grad.dtype))
    if ctx.needs_input_grad[3]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
    return grad_x, None, None, grad_bias


w8_linear.register_autograd(_backward, setup_context=_setup_context)
