"""Triton kernels behind :func:`awq_ao.kernels.w4a16.w4a16_linear` (private module).

This module holds the ``@triton.jit`` code only; configs, autotuning and launches live in
:mod:`awq_ao.kernels._w4a16_launch`, which imports this one.

Importing this module imports Triton and decorates the kernels, and Triton decides *at
decoration time* whether they run compiled (CUDA) or in its CPU interpreter
(``TRITON_INTERPRET=1``). :mod:`awq_ao.kernels.w4a16` therefore imports the launch module
(and with it this one) lazily, on the first kernel call, so the environment variable may
be set any time before that.

Both kernels compute ``y[m, n] = sum_k x[m, k] * w_hat[n, k] (+ bias[n])`` with
``w_hat[n, k] = (code[n, k] - zero[n, k // GROUP]) * scale[n, k // GROUP]`` and fp32
accumulation. Weights are ``uint8 [N, KP]`` (``KP = ceil(K / 2)``), low nibble = even k.

Tiling of K. A K tile of ``BLOCK_K`` values (``BLOCK_K // 2`` bytes per weight row) is viewed
as ``[GPT, GSP]`` bytes: ``GPT`` *chunks* of ``CHUNK`` values each (``GSP = CHUNK // 2``
bytes). ``CHUNK`` is the largest power of two dividing the group size, capped at
``BLOCK_K``, so a chunk never straddles a group boundary (groups start at multiples of the
group size, chunks at multiples of ``CHUNK``) and one scale / zero per (row, chunk) is
enough. A ragged last group needs nothing special: ``k // GROUP`` is still its index. With a
single group (``group_size == -1`` or ``group_size >= K``) the wrapper passes
``GROUP = K`` and a huge ``GS_POW2``; padded positions ``k >= K`` are clamped to group
``G - 1`` and meet a zero activation.

Split-K. Program ``(tile, s)`` handles K tiles ``[s * per, (s + 1) * per)``. With
``SPLIT_K > 1`` every split adds its fp32 partial into an fp32 workspace with atomics
and increments a per-output-tile counter; the split that arrives last reads the sum back
(atomically, i.e. from L2), resets workspace and counter to zero, adds the bias and writes
the output in the activation dtype. One launch, no memset, no separate cast kernel; the
workspace is zero again after every launch (see ``_workspace`` in ``w4a16.py``).
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

# Bits of the float32 2**23. OR-ing a small integer q into its mantissa gives the float
# 2**23 + q exactly: a 4-bit code becomes a float with one LOP3 instead of an int->float
# conversion (I2F runs at 1/8 of the FMA rate on Hopper).
_MAGIC_I = tl.constexpr(0x4B000000)
_MAGIC_F = tl.constexpr(8388608.0)


@triton.jit
def _group_params(
    s_ptr, z_ptr, offs_n64, n_mask, k0, G, GROUP, GPT: tl.constexpr, CHUNK: tl.constexpr
):
    """fp32 ``scale`` and ``zero`` ``[BLOCK_N, GPT]`` for the chunks of the K tile at ``k0``."""
    g = (k0 + tl.arange(0, GPT) * CHUNK) // GROUP
    g = tl.minimum(g, G - 1)  # padded tail chunks (k >= K) of the last tile
    idx = offs_n64[:, None] * G + g[None, :]
    s = tl.load(s_ptr + idx, mask=n_mask[:, None], other=0.0).to(tl.float32)
    z = tl.load(z_ptr + idx, mask=n_mask[:, None], other=0.0).to(tl.float32)
    return s, z


@triton.jit
def _write_out(acc, offs, mask, offs_n, N, bias_ptr, out_ptr, HAS_BIAS: tl.constexpr):
    """``out[offs] = (acc + bias).to(out dtype)`` under ``mask``."""
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        acc = acc + b[None, :]
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _epilogue(
    acc,
    offs_m,
    offs_n,
    M,
    N,
    tile_id,
    bias_ptr,
    out_ptr,
    ws_ptr,
    cnt_ptr,
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """Store one ``[BLOCK_M, BLOCK_N]`` fp32 tile, reducing over the K splits if needed."""
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    offs = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    if SPLIT_K == 1:
        _write_out(acc, offs, mask, offs_n, N, bias_ptr, out_ptr, HAS_BIAS)
    else:
        # Partial sums go to L2 with acq_rel atomics; the barrier orders every thread's
        # adds before thread 0's counter increment (a release at GPU scope, cumulative).
        tl.atomic_add(ws_ptr + offs, acc, mask=mask)
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + tile_id, 1)
        if arrived == SPLIT_K - 1:
            # Last split for this tile: every other split has added. Read the sum with an
            # atomic (served by L2, never a stale L1 line), then restore the zero state.
            zero = tl.zeros_like(acc)
            total = tl.atomic_add(ws_ptr + offs, zero, mask=mask)
            total = tl.where(mask, total, 0.0)  # masked atomics return undefined values
            tl.store(ws_ptr + offs, zero, mask=mask)
            tl.atomic_xchg(cnt_ptr + tile_id, 0)
            _write_out(total, offs, mask, offs_n, N, bias_ptr, out_ptr, HAS_BIAS)


@triton.jit
def w4a16_gemv_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    bias_ptr,
    out_ptr,
    ws_ptr,
    cnt_ptr,
    M,
    N,
    K,
    KP,
    G,
    GROUP,
    GS_POW2: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    CHUNK: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """Decode kernel (``M <= BLOCK_M``, 4 by default, 16 at most): CUDA-core FMAs, weights
    read exactly once.

    Grid ``(cdiv(N, BLOCK_N), SPLIT_K)``. Each step loads a ``[BLOCK_N, BLOCK_K // 2]`` byte
    tile (16 contiguous bytes per thread when the row stride allows), turns nibbles into
    ``q - round(zero)`` with the 2**23 trick (exact), multiplies by the activations and
    reduces each chunk; the scale is applied once per (row, chunk) instead of per weight:
    ``sum_k x (q - z) s = s * (sum_k x (q - zi) - (z - zi) * sum_k x)``.
    """
    GPT: tl.constexpr = BLOCK_K // CHUNK
    GSP: tl.constexpr = CHUNK // 2
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_n64 = offs_n.to(tl.int64)
    tile_kp = tl.arange(0, GPT)[:, None] * GSP + tl.arange(0, GSP)[None, :]  # [GPT, GSP]
    w_rows = w_ptr + offs_n64[:, None, None] * KP

    k_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    t_begin = pid_k * per_split
    t_end = tl.minimum(t_begin + per_split, k_tiles)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for t in range(t_begin, t_end):
        k0 = t * BLOCK_K
        kp = k0 // 2 + tile_kp  # byte column, [GPT, GSP]
        ke = 2 * kp  # k of the low nibble
        b = tl.load(
            w_rows + kp[None, :, :], mask=n_mask[:, None, None] & (kp < KP)[None, :, :], other=0
        ).to(tl.int32)
        s, z = _group_params(s_ptr, z_ptr, offs_n64, n_mask, k0, G, GROUP, GPT, CHUNK)
        c = z + _MAGIC_F  # 2**23 + round(z)
        r = z - (c - _MAGIC_F)  # z - round(z): 0 for the package's integer zeros
        lo = ((b & 15) | _MAGIC_I).to(tl.float32, bitcast=True) - c[:, :, None]
        hi = ((b >> 4) | _MAGIC_I).to(tl.float32, bitcast=True) - c[:, :, None]
        for mi in tl.static_range(BLOCK_M):
            x_row = x_ptr + mi * K
            k_lim = tl.where(mi < M, K, 0)  # rows past M (BLOCK_M > M) read nothing
            xe = tl.load(x_row + ke, mask=ke < k_lim, other=0.0).to(tl.float32)
            xo = tl.load(x_row + ke + 1, mask=ke + 1 < k_lim, other=0.0).to(tl.float32)
            part = tl.sum(lo * xe[None, :, :] + hi * xo[None, :, :], axis=2)  # [BN, GPT]
            xsum = tl.sum(xe + xo, axis=1)  # [GPT]
            contrib = tl.sum(s * (part - r * xsum[None, :]), axis=1)  # [BN]
            acc += tl.where(offs_m[:, None] == mi, contrib[None, :], 0.0)

    _epilogue(
        acc, offs_m, offs_n, M, N, pid_n, bias_ptr, out_ptr, ws_ptr, cnt_ptr, HAS_BIAS, SPLIT_K
    )


@triton.jit
def w4a16_gemm_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    bias_ptr,
    out_ptr,
    ws_ptr,
    cnt_ptr,
    M,
    N,
    K,
    KP,
    G,
    GROUP,
    M_BUCKET,
    GS_POW2: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    CHUNK: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """Prefill kernel: ``[BLOCK_M, BLOCK_N]`` output tiles on tensor cores (``tl.dot``).

    Grid ``(cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), SPLIT_K)``, M tiles fastest so that programs
    running together share a weight tile in L2. Each step dequantizes a
    ``[BLOCK_N, BLOCK_K]`` weight tile to the activation dtype (nibbles interleaved back
    into k order with ``join`` + ``reshape``) and feeds ``tl.dot`` with an fp32 accumulator.
    ``M_BUCKET`` is only an autotuning key. ``UPCAST_DOT`` (interpreter + bf16 only) runs the
    dot on fp32 copies because the interpreter cannot multiply bf16 matrices.
    """
    GPT: tl.constexpr = BLOCK_K // CHUNK
    GSP: tl.constexpr = CHUNK // 2
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    grid_m = tl.cdiv(M, BLOCK_M)
    pid_m = pid % grid_m
    pid_n = pid // grid_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    offs_n64 = offs_n.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    tile_kp = tl.arange(0, GPT)[:, None] * GSP + tl.arange(0, GSP)[None, :]  # [GPT, GSP]
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * K
    w_rows = w_ptr + offs_n64[:, None, None] * KP

    k_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    t_begin = pid_k * per_split
    t_end = tl.minimum(t_begin + per_split, k_tiles)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for t in range(t_begin, t_end):
        k0 = t * BLOCK_K
        kk = k0 + offs_k
        xt = tl.load(x_rows + kk[None, :], mask=m_mask[:, None] & (kk < K)[None, :], other=0.0)
        kp = k0 // 2 + tile_kp
        b = tl.load(
            w_rows + kp[None, :, :], mask=n_mask[:, None, None] & (kp < KP)[None, :, :], other=0
        ).to(tl.int32)
        s, z = _group_params(s_ptr, z_ptr, offs_n64, n_mask, k0, G, GROUP, GPT, CHUNK)
        zs = (z * s)[:, :, None]
        s3 = s[:, :, None]
        lo = (((b & 15) | _MAGIC_I).to(tl.float32, bitcast=True) - _MAGIC_F) * s3 - zs
        hi = (((b >> 4) | _MAGIC_I).to(tl.float32, bitcast=True) - _MAGIC_F) * s3 - zs
        w = tl.reshape(tl.join(lo, hi), [BLOCK_N, BLOCK_K]).to(xt.dtype)  # k order restored
        if UPCAST_DOT:
            acc = tl.dot(xt.to(tl.float32), tl.trans(w.to(tl.float32)), acc)
        else:
            acc = tl.dot(xt, tl.trans(w), acc)

    tile_id = pid_n * grid_m + pid_m
    _epilogue(
        acc, offs_m, offs_n, M, N, tile_id, bias_ptr, out_ptr, ws_ptr, cnt_ptr, HAS_BIAS, SPLIT_K
    )


#: True when Triton decorated the kernels for its CPU interpreter (``TRITON_INTERPRET=1``).
INTERPRET: bool = isinstance(w4a16_gemv_kernel, InterpretedFunction)
