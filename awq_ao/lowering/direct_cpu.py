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
    """``x @ W.T + bias`` for a ``cpu_tinygemm`` weight through the op's own decode kernel call
    (:func:`~awq_ao.lowering.cpu_kernels.ext_linear`), or ``None`` where the custom op must run
    (module doc)."""
    if not _usable(x, bias) or packed.device.type != "cpu" or not cpu_kernels.ext_supports(variant, scales_and_zeros):
        return None
    m = x.numel() // in_features
    if not 0 < m <= cpu_kernels.EXT_DECODE_MAX_M:
        return None
    y = cpu_kernels.ext_linear(x.reshape(m, in_features), packed, scales_and_zeros, in_features, group_size, variant)
    return _finish(y, x, bias, packed.shape[0])


def int8_linear(
    x: torch.Tensor, codes: torch.Tensor, row_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor | None:
    """``x @ (codes * row_scale).T + bias`` through the ``awq_ao::w8_linear`` op's own kernel call
    (:func:`~awq_ao.lowering.int8_ops.ext_linear`), or ``None`` where the op must run (module doc)."""
    n, k = codes.shape
    m = x.numel() // k
    if not _usable(x, bias) or codes.device.type != "cpu" or int8_ops.activation_group(k) == 0:
        return None
    if not 0 < m <= int8_ops.EXT_MAX_M:
        return None
    cpu_kernels._note(n, k, x.dtype, "int8 decode", "C++ int8 kernel (int16 activations)")
    return _finish(int8_ops.ext_linear(x.reshape(m, k), codes, row_scale), x, bias, n)
