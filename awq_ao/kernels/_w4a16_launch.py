"""Launch side of the W4A16 Triton kernels: configs, split-K, autotuning (private module).

The ``@triton.jit`` kernels live in :mod:`awq_ao.kernels._w4a16_triton`; this module picks
their launch parameters and launches them for :func:`awq_ao.kernels.w4a16.w4a16_linear`:

* the autotuning spaces (``_GEMV_SPACE``, ``_GEMM_SPACE``) and the fixed configs used under
  the interpreter (``INTERPRET_GEMV``, ``INTERPRET_GEMM``);
* the split-K heuristic (:func:`split_k_for`, :func:`num_sms`) and the size of the split-K
  workspace a launch may touch (:func:`workspace_size`);
* the ``triton.heuristics`` + ``triton.autotune`` wrappers of the kernels (compiled mode
  only) and :func:`launch`.

Importing it imports the kernel module, i.e. Triton decides then whether the kernels run
compiled or in its CPU interpreter (``TRITON_INTERPRET=1``; see ``INTERPRET``).
:mod:`awq_ao.kernels.w4a16` imports this module lazily, on the first kernel call.
"""

from __future__ import annotations

import torch
import triton

# INTERPRET is part of this module's interface too: awq_ao.kernels.w4a16 and the tests read it.
from awq_ao.kernels._w4a16_triton import INTERPRET, w4a16_gemm_kernel, w4a16_gemv_kernel

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
