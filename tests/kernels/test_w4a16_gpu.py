"""W4A16 Triton kernels compiled for a real CUDA GPU (``pytest -m gpu``; skipped without one).

Same float64 reference and element-wise bound as ``test_w4a16_interpreter.py`` (see
``w4a16_reference.py``), with ``u = 2**-9`` for bfloat16 (compiled casts round to nearest).
Covers the autotuned path on Llama-like and ragged shapes, every config of the autotuning
space forced in turn (so whichever one autotuning picks is known to be correct), split-K
workspace hygiene, NaN guards around inputs and output, CUDA-graph capture and a side
stream. These tests must not run in a process where ``TRITON_INTERPRET=1`` is set.
"""

from __future__ import annotations

import pytest
import torch
from w4a16_reference import error_ratio, make_inputs, unit_roundoff

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEV = "cuda"


def _kernels():
    from awq_ao.kernels import w4a16

    kmod = w4a16._load_kernels()
    if kmod.INTERPRET:
        pytest.skip("kernels were decorated in interpreter mode in this process")
    return w4a16, kmod


def _check(y: torch.Tensor, inp: dict, k: int, dtype: torch.dtype) -> None:
    assert y.dtype == dtype and y.shape == inp["ref"].shape
    ratio = error_ratio(y, inp["ref"], inp["abs_ref"], k, unit_roundoff(dtype, False))
    assert ratio <= 1.0, f"error is {ratio:.3g} x the bound"


def _ws_is_zero(w4a16) -> bool:
    torch.cuda.synchronize()
    return all(bool((t == 0).all()) for pair in w4a16._WORKSPACE.values() for t in pair)


# (M, N, K, group_size, dtype, bias)
SHAPES = [
    (1, 4096, 4096, 128, torch.float16, False),
    (1, 1024, 4096, 128, torch.bfloat16, True),
    (2, 14336, 4096, 64, torch.float16, False),
    (4, 4096, 14336, 128, torch.bfloat16, False),
    (3, 1000, 1000, 32, torch.bfloat16, True),  # ragged N, K, group
    (1, 576, 576, 128, torch.float16, True),  # SmolLM2: K % 128 != 0
    (5, 4096, 4096, 128, torch.float16, True),
    (16, 6144, 4096, 32, torch.bfloat16, False),
    (33, 1024, 4096, -1, torch.float16, False),
    (64, 4096, 1000, 64, torch.bfloat16, True),
    (128, 1024, 4096, 128, torch.bfloat16, False),
    (300, 4096, 4096, 128, torch.float16, True),
    (1000, 1537, 2049, 64, torch.bfloat16, True),  # everything ragged, odd K
    (2048, 4096, 4096, 128, torch.bfloat16, False),
]


@pytest.mark.parametrize(
    "m, n, k, gs, dtype, bias",
    SHAPES,
    ids=[f"m{s[0]}-n{s[1]}-k{s[2]}-g{s[3]}-{str(s[4])[6:]}" for s in SHAPES],
)
def test_autotuned_matches_reference(m, n, k, gs, dtype, bias) -> None:
    w4a16, _ = _kernels()
    inp = make_inputs(m, n, k, gs, dtype, bias, device=DEV, seed=m + n + k)
    y = w4a16.w4a16_linear(inp["x"], inp["packed"], inp["scale"], inp["zero"], gs, inp["bias"])
    _check(y, inp, k, dtype)
    y2 = w4a16.w4a16_linear(inp["x"], inp["packed"], inp["scale"], inp["zero"], gs, inp["bias"])
    _check(y2, inp, k, dtype)  # the cached (tuned) config, workspace reused
    assert _ws_is_zero(w4a16)


def _all_configs(kmod) -> list[tuple[str, int, dict]]:
    out = []
    for bn, bk, w, s in kmod._GEMV_SPACE:
        for m in (1, 4, 11):
            out.append(("gemv", m, {"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": w, "num_stages": s}))
    for bucket, space in kmod._GEMM_SPACE.items():
        for bm, bn, bk, w, s in space:
            out.append(
                (
                    "gemm",
                    min(bucket, 200) - 3,
                    {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": w, "num_stages": s},
                )
            )
    return out


@pytest.mark.parametrize("split", [None, 3])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_config_in_the_space(split, dtype) -> None:
    """Each autotuning candidate, forced, on a ragged shape with a ragged last group."""
    w4a16, kmod = _kernels()
    n, k, gs = 1000, 1000, 64
    for path, m, cfg in _all_configs(kmod):
        if split is not None:
            cfg = dict(cfg, SPLIT_K=split)
        inp = make_inputs(m, n, k, gs, dtype, True, device=DEV, seed=m)
        y = w4a16._w4a16_linear(
            inp["x"],
            inp["packed"],
            inp["scale"],
            inp["zero"],
            gs,
            inp["bias"],
            kernel=path,
            config=cfg,
        )
        ratio = error_ratio(y, inp["ref"], inp["abs_ref"], k, unit_roundoff(dtype, False))
        assert ratio <= 1.0, f"{path} {cfg} M={m}: error {ratio:.3g} x bound"
        assert _ws_is_zero(w4a16), f"{path} {cfg}: workspace left dirty"


@pytest.mark.parametrize("path, m", [("gemv", 3), ("gemm", 20), ("gemm", 150)])
def test_no_out_of_bounds_writes_or_reads(path, m) -> None:
    """Inputs and output live inside NaN-padded buffers: reads past an input would put NaN
    into the result, writes past the output would change the padding."""
    w4a16, _ = _kernels()
    n, k, gs, pad = 333, 777, 32, 4096
    inp = make_inputs(m, n, k, gs, torch.bfloat16, True, device=DEV)

    def guarded(t):
        fill = 255 if t.dtype == torch.uint8 else float("nan")
        buf = torch.full((t.numel() + 2 * pad,), fill, dtype=t.dtype, device=DEV)
        view = buf[pad : pad + t.numel()].view(t.shape)
        view.copy_(t)
        return view

    args = [guarded(inp[name]) for name in ("x", "packed", "scale", "zero")]
    bias = guarded(inp["bias"])
    out_buf = torch.full((m * n + 2 * pad,), float("nan"), dtype=torch.bfloat16, device=DEV)
    out = out_buf[pad : pad + m * n].view(m, n)
    for split in (1, 4):
        cfg = (
            {"BLOCK_N": 32, "BLOCK_K": 256, "SPLIT_K": split}
            if path == "gemv"
            else {"BLOCK_M": 16 if m < 100 else 64, "BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": split}
        )
        y = w4a16._w4a16_linear(*args, gs, bias, kernel=path, config=cfg, out=out)
        _check(y, inp, k, torch.bfloat16)
        edges = torch.cat([out_buf[:pad], out_buf[pad + m * n :]])
        assert edges.isnan().all(), "wrote outside the output"


def test_cuda_graph_capture_and_side_stream() -> None:
    w4a16, _ = _kernels()
    m, n, k, gs = 1, 4096, 4096, 128
    inp = make_inputs(m, n, k, gs, torch.float16, True, device=DEV)
    args = (inp["x"], inp["packed"], inp["scale"], inp["zero"], gs, inp["bias"])
    w4a16.w4a16_linear(*args)  # autotune outside the capture
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        w4a16.w4a16_linear(*args)  # warm the side stream's workspace too
        with torch.cuda.graph(graph):
            y = w4a16.w4a16_linear(*args)
    torch.cuda.current_stream().wait_stream(side)
    for _ in range(3):
        inp["x"].normal_()
        graph.replay()
        torch.cuda.synchronize()
        ref = inp["x"].double() @ inp["w_hat"].T + inp["bias"].double()
        abs_ref = inp["x"].double().abs() @ inp["w_hat"].abs().T + inp["bias"].double().abs()
        ratio = error_ratio(y, ref, abs_ref, k, unit_roundoff(torch.float16, False))
        assert ratio <= 1.0
    assert _ws_is_zero(w4a16)


def test_noncontiguous_and_mixed_param_dtypes() -> None:
    w4a16, _ = _kernels()
    m, n, k, gs = 7, 512, 1024, 64
    inp = make_inputs(
        m,
        n,
        k,
        gs,
        torch.bfloat16,
        True,
        device=DEV,
        param_dtype=torch.float32,
        bias_dtype=torch.float32,
    )
    x_nc = torch.empty(k, m, dtype=torch.bfloat16, device=DEV).t()
    x_nc.copy_(inp["x"])
    y = w4a16.w4a16_linear(x_nc, inp["packed"], inp["scale"], inp["zero"], gs, inp["bias"])
    _check(y, inp, k, torch.bfloat16)
