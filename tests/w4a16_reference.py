"""Inputs, float64 reference and error bound for the W4A16 kernel tests (CPU and CUDA).

Error bound (element-wise), used by every kernel test::

    |y - y_ref| <= (2 * u + u**2 + K * 2**-23) * (|x| @ |w_hat|.T + |bias|)

``u`` is the unit roundoff of the activation dtype: 2**-11 for float16, 2**-9 for bfloat16
(round to nearest) and 2**-8 for bfloat16 under the Triton interpreter, whose fp32 -> bf16
cast truncates. One ``u`` covers the rounding of the dequantized weight to the activation
dtype (GEMM path; the GEMV path keeps it in fp32), one the rounding of the output, ``u**2``
their interaction, and ``K * 2**-23`` (twice the classic ``K * 2**-24``) covers fp32 accumulation and the split-K
partial sums. ``x``, ``scale``, ``zero`` and ``bias`` enter the reference exactly as stored.
"""

from __future__ import annotations

import math

import torch

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "u8": torch.uint8}


def unit_roundoff(dtype: torch.dtype, interpreter: bool) -> float:
    """``u`` of the bound above for activations of ``dtype``."""
    if dtype == torch.float16:
        return 2.0**-11
    return 2.0**-8 if interpreter else 2.0**-9


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """``uint8 [N, K]`` codes -> ``uint8 [N, ceil(K/2)]``, low nibble = even k."""
    n, k = codes.shape
    if k % 2:
        codes = torch.cat([codes, codes.new_zeros(n, 1)], dim=1)
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()


def make_inputs(
    m: int,
    n: int,
    k: int,
    group_size: int,
    dtype: torch.dtype,
    bias: bool,
    *,
    param_dtype: torch.dtype = torch.float16,
    zero_dtype: torch.dtype | None = None,
    frac_zero: bool = False,
    bias_dtype: torch.dtype | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> dict:
    """Random codes/scales/zeros/activations and the float64 reference ``y_ref`` and ``S``.

    Random numbers come from a seeded CPU generator (same values on every device); the
    reference is computed on ``device``. Returns a dict with ``x, packed, scale, zero, bias``,
    ``w_hat``, ``ref`` and ``abs_ref`` (``|x| @ |w_hat|.T + |bias|``), all on ``device``.
    """
    gen = torch.Generator().manual_seed(seed)
    gs = k if group_size == -1 else group_size
    g = math.ceil(k / gs)
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    packed = pack_codes(codes)
    # Scales ~ 1/64 keep |w_hat| ~ 0.1 like real weights; zeros are integers in 0..15.
    scale = torch.rand(n, g, generator=gen) * 0.03 + 0.002
    zero = torch.randint(0, 16, (n, g), generator=gen).double()
    if frac_zero:
        zero = zero + torch.rand(n, g, generator=gen, dtype=torch.float64)
    scale = scale.to(param_dtype)
    zero = zero.to(zero_dtype or param_dtype)
    x = torch.randn(m, k, generator=gen).to(dtype)
    b = (torch.randn(n, generator=gen) * 0.5).to(bias_dtype or dtype) if bias else None

    codes, packed, scale, zero, x = (t.to(device) for t in (codes, packed, scale, zero, x))
    b = b.to(device) if b is not None else None
    idx = torch.arange(k, device=device) // gs
    w_hat = (codes.double() - zero.double()[:, idx]) * scale.double()[:, idx]
    ref = x.double() @ w_hat.T
    abs_ref = x.double().abs() @ w_hat.abs().T
    if b is not None:
        ref = ref + b.double()
        abs_ref = abs_ref + b.double().abs()
    return {
        "x": x,
        "packed": packed,
        "scale": scale,
        "zero": zero,
        "bias": b,
        "ref": ref,
        "abs_ref": abs_ref,
        "w_hat": w_hat,
    }


def error_ratio(
    y: torch.Tensor, ref: torch.Tensor, abs_ref: torch.Tensor, k: int, u: float
) -> float:
    """``max |y - ref| / bound`` (<= 1 passes; NaN in ``y`` gives ``inf``)."""
    if y.numel() == 0:
        return 0.0
    yd = y.double()
    if not torch.isfinite(yd).all():
        return math.inf
    bound = (2 * u + u * u + k * 2.0**-23) * abs_ref + 1e-300
    return float(((yd - ref).abs() / bound).max())
