"""Eager CPU decode matmuls that skip the Python custom-op round trip.

Calling a ``torch.library.custom_op`` whose kernels are Python functions costs about 50 us per
call on the 2-core machines (autograd wrapper, kernel wrapper, argument checks), more than the
4-bit kernel itself takes for most decode layers; a 16-layer model pays it 112 times per token.
In eager mode, where nothing needs the op's extras, :func:`int4_linear` and :func:`int8_linear`
call the C++ kernels (``awq_ao_cpu::int4_gemm`` / ``int8_gemm``) directly, with exactly the
arithmetic the op's CPU kernel runs. They return ``None`` (the caller then uses the custom op)
when:

* anything traces: ``torch.compile``, ``torch.export``, ``make_fx``, FakeTensors (graphs keep
  awq_ao's own op: a graph holding the extension's ops would depend on this process having
  built them, which inductor's on-disk caches cannot see);
* gradients are needed (an input requires grad in grad mode: the op has the backward);
* the C++ kernels are not built yet (the op builds them on first use) or cannot run the weight;
* the rows exceed the decode range, the input is float64 or empty, or
  :func:`~awq_ao.lowering.cpu_kernels.forced_path` is set.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from awq_ao.lowering import cpu_ext, cpu_kernels, int8_ops
from awq_ao.lowering.packing import parse_variant, tinygemm_geometry

__all__ = ["int4_linear", "int8_linear"]


def _usable(x: torch.Tensor, bias: torch.Tensor | None) -> bool:
    # eager only: a traced graph (torch.compile, export, make_fx) keeps the custom op. A
    # compiled graph holding awq_ao_cpu ops would depend on this process having built them,
    # which inductor's on-disk caches do not know about (a cache hit in a fresh process then
    # calls an op that does not exist yet); FakeTensors / FunctionalTensors are subclasses
    if type(x) is not torch.Tensor or torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return False
    if x.device.type != "cpu" or x.dtype == torch.float64:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return False
    if cpu_ext._state.get("ok") is not True:  # not built yet, or unavailable
        return False
    return cpu_kernels._FORCED.get() is None


def _finish(y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, n: int) -> torch.Tensor:
    if x.dtype != torch.float32:
        y = y.to(x.dtype)
    if bias is not None:
        y = y.add_(bias.to(y.dtype))
    return y.reshape(*x.shape[:-1], n)


def int4_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales_and_zeros: torch.Tensor,
    bias: torch.Tensor | None,
    in_features: int,
    group_size: int,
    variant: str,
) -> torch.Tensor | None:
    """``x @ W.T + bias`` for a ``cpu_tinygemm`` weight through ``awq_ao_cpu::int4_gemm``, or
    ``None`` where the custom op must run (module doc)."""
    if not _usable(x, bias) or packed.device.type != "cpu" or scales_and_zeros.dtype != torch.bfloat16:
        return None
    block, interleaved = parse_variant(variant)
    geometry = tinygemm_geometry(in_features, group_size)
    m = x.numel() // in_features
    if not interleaved or block not in (32, 64) or geometry is None or not 0 < m <= cpu_kernels.EXT_DECODE_MAX_M:
        return None
    tg, k_pad = geometry
    x2d = x.reshape(m, in_features)
    n = packed.shape[0]
    y = torch.ops.awq_ao_cpu.int4_gemm(cpu_kernels._padded_float32(x2d, in_features, k_pad), packed, scales_and_zeros, tg, block)
    cpu_kernels._note(n, in_features, x.dtype, "decode", "awq_ao C++ kernel (AVX2, int16 activations)")
    return _finish(y, x, bias, n)


def int8_linear(
    x: torch.Tensor, codes: torch.Tensor, row_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor | None:
    """``x @ (codes * row_scale).T + bias`` through ``awq_ao_cpu::int8_gemm``, or ``None`` where
    the ``awq_ao::w8_linear`` op must run (module doc)."""
    n, k = codes.shape
    if not _usable(x, bias) or codes.device.type != "cpu":
        return None
    ag = int8_ops.activation_group(k)
    m = x.numel() // k
    if ag == 0 or not 0 < m <= int8_ops.EXT_MAX_M:
        return None
    x2d = x.reshape(m, k).to(torch.float32).contiguous()
    y = torch.ops.awq_ao_cpu.int8_gemm(x2d, codes.contiguous(), row_scale.to(torch.float32).contiguous(), ag)
    cpu_kernels._note(n, k, x.dtype, "int8 decode", "C++ int8 kernel (int16 activations)")
    return _finish(y, x, bias, n)
