"""Triton kernels behind :func:`awq_ao.kernels.w4a16.w4a16_linear` (private module).

Importing this module imports Triton and decorates the kernels, and Triton decides *at
decoration time* whether they run compiled (CUDA) or in its CPU interpreter
(``TRITON_INTERPRET=1``). :mod:`awq_ao.kernels.w4a16` therefore imports it lazily, on the
first kernel call, so the environment variable may be set any time before that.

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

import torch
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


# --------------------------------------------------------------------------------------
# Launch configurations
# --------------------------------------------------------------------------------------
# The config space is small on purpose: every config below is there for a reason, and the
# split-K factor is derived from the shape (heuristic) rather than searched.
#
# GEMV (decode, M <= 4 unless forced): memory bound. Each step of a program streams
# BLOCK_N * BLOCK_K / 2 bytes of weights; 4 KiB-8 KiB per step gives every thread two to
# four 16-byte loads in flight. Long K-tiles (256-512 values) keep a row's bytes contiguous
# per thread; BLOCK_N trades tiles-per-N (parallelism) against per-step reduction overhead.
#   (BLOCK_N, BLOCK_K, num_warps, num_stages)
_GEMV_SPACE = [
    (16, 512, 4, 3),  # 4 KiB/step: narrow N tile, most programs before splitting K
    (32, 256, 4, 3),  # 4 KiB/step: the balanced default
    (32, 512, 4, 3),  # 8 KiB/step: more bytes in flight per thread
    (64, 256, 8, 3),  # 8 KiB/step over 8 warps: fewer, fatter programs for huge N
]
# GEMM (prefill): tiles by M bucket. Small M is still memory bound (BLOCK_M = 16 is the
# smallest MMA tile, wide BLOCK_K, split-K to fill the SMs); from M > 64 the classic
# compute-bound tiles, where the dequantization of a weight tile is amortised over
# BLOCK_M rows. (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
_GEMM_SPACE = {
    16: [(16, 64, 256, 4, 3), (16, 128, 128, 4, 4)],
    32: [(32, 64, 256, 4, 3), (32, 128, 128, 4, 4)],
    64: [(64, 64, 128, 4, 4), (64, 128, 128, 4, 3)],
    128: [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 128, 8, 3), (64, 256, 64, 4, 4)],
}
#: Largest M that may use split-K (bounds the fp32 workspace to SPLITK_MAX_M * N).
SPLITK_MAX_M = 128
#: Programs per SM that the GEMV split-K heuristic aims for (hides DRAM latency and the
#: tail of the last wave); the GEMM aims for 2 output tiles per SM before it splits K.
_GEMV_WAVES = 4
_GEMM_WAVES = 2
#: Fixed configs under the interpreter (no autotuning; large blocks keep tests fast).
INTERPRET_GEMV = {"BLOCK_N": 32, "BLOCK_K": 128}
INTERPRET_GEMM = {"BLOCK_N": 32, "BLOCK_K": 128}
_INTERPRET_SMS = 2

#: Smallest (BLOCK_M, BLOCK_N) any default config uses: sizes the split-K tile counters.
MIN_GEMV_BLOCK_N = min(c[0] for c in _GEMV_SPACE + [(INTERPRET_GEMV["BLOCK_N"],)])
MIN_GEMM_BLOCK = (
    16,
    min(c[1] for cs in _GEMM_SPACE.values() for c in cs + [(0, INTERPRET_GEMM["BLOCK_N"])]),
)


def m_bucket(m: int) -> int:
    """Autotuning bucket of the GEMM for ``m`` rows: 16, 32, 64, then powers of two <= 4096."""
    return min(max(16, triton.next_power_of_2(m)), 4096)


def gemm_block_m(m: int) -> int:
    """``BLOCK_M`` of the fixed (interpreter) GEMM config for ``m`` rows."""
    return min(64, max(16, triton.next_power_of_2(m)))


def chunk_for(gs_pow2: int, block_k: int) -> int:
    """Values per chunk: the group size's power-of-two part, capped at ``block_k``."""
    return min(gs_pow2, block_k)


def split_k_for(tiles: int, k_tiles: int, num_sms: int, waves: int) -> int:
    """Split-K factor giving ``~waves * num_sms`` programs; never leaves a split empty."""
    target = waves * num_sms
    if tiles >= target or k_tiles <= 1:
        return 1
    split = min(triton.cdiv(target, tiles), k_tiles)
    per = triton.cdiv(k_tiles, split)
    return triton.cdiv(k_tiles, per)


_SM_COUNT: dict[int, int] = {}


def num_sms(device) -> int:
    """Streaming multiprocessors of ``device`` (a small constant under the interpreter)."""
    if INTERPRET or device.type != "cuda":
        return _INTERPRET_SMS
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _gemv_split(args: dict) -> int:
    tiles = triton.cdiv(args["N"], args["BLOCK_N"])
    return split_k_for(
        tiles, triton.cdiv(args["K"], args["BLOCK_K"]), num_sms(args["x_ptr"].device), _GEMV_WAVES
    )


def _gemm_split(args: dict) -> int:
    if args["M"] > SPLITK_MAX_M:
        return 1
    tiles = triton.cdiv(args["M"], args["BLOCK_M"]) * triton.cdiv(args["N"], args["BLOCK_N"])
    return split_k_for(
        tiles, triton.cdiv(args["K"], args["BLOCK_K"]), num_sms(args["x_ptr"].device), _GEMM_WAVES
    )


def _chunk(args: dict) -> int:
    return chunk_for(args["GS_POW2"], args["BLOCK_K"])


def _gemm_prune(configs, named_args, **kwargs):
    wanted = set(_GEMM_SPACE[min(named_args["M_BUCKET"], 128)])
    return [
        c
        for c in configs
        if (
            c.kwargs["BLOCK_M"],
            c.kwargs["BLOCK_N"],
            c.kwargs["BLOCK_K"],
            c.num_warps,
            c.num_stages,
        )
        in wanted
    ]


if INTERPRET:
    # The interpreter would "autotune" by running every config on the CPU: use fixed ones.
    _gemv_autotuned = None
    _gemm_autotuned = None
else:
    _gemv_autotuned = triton.autotune(
        configs=[
            triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bn, bk, w, s in _GEMV_SPACE
        ],
        key=["BLOCK_M", "N", "K", "GS_POW2"],
    )(triton.heuristics({"CHUNK": _chunk, "SPLIT_K": _gemv_split})(w4a16_gemv_kernel))
    _gemm_autotuned = triton.autotune(
        configs=[
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for space in _GEMM_SPACE.values()
            for bm, bn, bk, w, s in space
        ],
        key=["M_BUCKET", "N", "K", "GS_POW2"],
        prune_configs_by={"early_config_prune": _gemm_prune},
    )(triton.heuristics({"CHUNK": _chunk, "SPLIT_K": _gemm_split})(w4a16_gemm_kernel))


def workspace_size(path: str, m: int, n: int, config: dict | None) -> tuple[int, int]:
    """``(fp32 elements, int32 counters)`` of split-K workspace a launch may touch."""
    forced_split = config is not None and config.get("SPLIT_K", 1) > 1
    if path == "gemv":
        bn = config["BLOCK_N"] if config is not None else MIN_GEMV_BLOCK_N
        return m * n, triton.cdiv(n, bn)
    if m > SPLITK_MAX_M and not forced_split:
        return 0, 0
    bm, bn = (config["BLOCK_M"], config["BLOCK_N"]) if config is not None else MIN_GEMM_BLOCK
    return m * n, triton.cdiv(m, bm) * triton.cdiv(n, bn)


def launch(
    path: str, x, w, s, z, bias, out, ws, cnt, group: int, gs_pow2: int, config: dict | None = None
) -> None:
    """Launch the ``path`` ("gemv" or "gemm") kernel; all tensors already validated.

    ``config`` (``BLOCK_M`` (gemm), ``BLOCK_N``, ``BLOCK_K`` and optionally ``SPLIT_K``,
    ``num_warps``, ``num_stages``) bypasses autotuning; under the interpreter a fixed
    config is always used.
    """
    m, k = x.shape
    n, kp = w.shape
    g = s.shape[1]
    has_bias = bias is not None
    args = (x, w, s, z, bias if has_bias else out, out, ws, cnt, m, n, k, kp, g, group)
    sms = num_sms(x.device)
    if path == "gemv":
        block_m = triton.next_power_of_2(m)
        if config is None and not INTERPRET:
            _gemv_autotuned[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])](
                *args, GS_POW2=gs_pow2, HAS_BIAS=has_bias, BLOCK_M=block_m
            )
            return
        cfg = dict(INTERPRET_GEMV if config is None else config)
        bn, bk = cfg["BLOCK_N"], cfg["BLOCK_K"]
        split = cfg.get("SPLIT_K") or split_k_for(
            triton.cdiv(n, bn), triton.cdiv(k, bk), sms, _GEMV_WAVES
        )
        w4a16_gemv_kernel[(triton.cdiv(n, bn), split)](
            *args,
            GS_POW2=gs_pow2,
            HAS_BIAS=has_bias,
            BLOCK_M=block_m,
            BLOCK_N=bn,
            BLOCK_K=bk,
            CHUNK=chunk_for(gs_pow2, bk),
            SPLIT_K=split,
            **_launch_opts(cfg),
        )
        return
    bucket = m_bucket(m)
    upcast = INTERPRET and x.dtype == torch.bfloat16
    if config is None and not INTERPRET:
        _gemm_autotuned[
            lambda meta: (
                triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),
                meta["SPLIT_K"],
            )
        ](*args, bucket, GS_POW2=gs_pow2, HAS_BIAS=has_bias, UPCAST_DOT=upcast)
        return
    cfg = dict(INTERPRET_GEMM, BLOCK_M=gemm_block_m(m)) if config is None else dict(config)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    split = cfg.get("SPLIT_K") or (
        1 if m > SPLITK_MAX_M else split_k_for(tiles, triton.cdiv(k, bk), sms, _GEMM_WAVES)
    )
    w4a16_gemm_kernel[(tiles, split)](
        *args,
        bucket,
        GS_POW2=gs_pow2,
        HAS_BIAS=has_bias,
        UPCAST_DOT=upcast,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        CHUNK=chunk_for(gs_pow2, bk),
        SPLIT_K=split,
        **_launch_opts(cfg),
    )


def _launch_opts(cfg: dict) -> dict:
    if INTERPRET:
        return {}
    return {"num_warps": cfg.get("num_warps", 4), "num_stages": cfg.get("num_stages", 3)}
