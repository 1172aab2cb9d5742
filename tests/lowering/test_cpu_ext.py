"""awq_ao.lowering.cpu_ext: the C++ CPU kernels against float64 references.

``int4_gemm`` quantizes activations per (row, tinygemm group) to int16, so its error against
the exact product is bounded by ``sum_g amax_g / 65534 * sum_{k in g} |w_k|`` plus float32
rounding; ``int4_dequant_t`` must equal awq_ao's eager dequantization bit for bit.
"""

from __future__ import annotations

import logging
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from ext_checks import needs_ext, require_built
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import awq_ao.lowering.cpu_dequant as cd
import awq_ao.lowering.cpu_kernels as ck
from awq_ao.lowering import Int4WeightTensor, cpu_ext
from awq_ao.lowering.cpu_dequant import dequant_rows
from awq_ao.lowering.packing import pack


@pytest.fixture(autouse=True)
def _built():
    require_built()


def _weight(n: int, kp: int, tg: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, kp), generator=g, dtype=torch.uint8)
    scale = torch.rand(kp // tg, n, generator=g) * 0.02 + 1e-3
    offset = torch.randn(kp // tg, n, generator=g) * 0.05
    sz = torch.stack([scale, offset], dim=-1).bfloat16().contiguous()
    return codes, sz


def _error_bound(x: torch.Tensor, w: torch.Tensor, tg: int) -> torch.Tensor:
    """Per-output bound of int16 activation rounding plus float32 accumulation error."""
    m, kp = x.shape
    amax = x.double().abs().view(m, kp // tg, tg).amax(-1)  # [M, G]
    wabs = w.double().abs().view(w.shape[0], kp // tg, tg).sum(-1)  # [N, G]
    quant = (amax / 65534) @ wabs.t()
    rounding = 1e-5 * (x.double().abs() @ w.double().abs().t())
    return quant * 1.01 + rounding + 1e-30


@needs_ext
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    blocks=st.integers(0, 3),
    tail=st.sampled_from([0, 16, 32, 48]),
    groups=st.integers(1, 4),
    tg=st.sampled_from([32, 64, 128, 256]),
    variant=st.sampled_from(["b32i", "b64i"]),
    m=st.integers(0, 9),
    seed=st.integers(0, 2**16),
)
def test_int4_gemm_within_int16_bound_of_float64(blocks, tail, groups, tg, variant, m, seed):
    block = int(variant[1:-1])
    n = blocks * block + tail % block
    if n == 0:
        return
    kp = groups * tg
    codes, sz = _weight(n, kp, tg, seed)
    packed = pack(codes, 4, "cpu_tinygemm", variant)
    x = torch.randn(m, kp, generator=torch.Generator().manual_seed(seed + 1))
    x[:, : kp // 2] *= 30  # groups of different magnitudes
    y = torch.ops.awq_ao_cpu.int4_gemm(x, packed, sz, tg, block)
    w = dequant_rows(codes, sz, tg)
    ref = x.double() @ w.double().t()
    assert y.shape == (m, n) and y.dtype == torch.float32
    assert ((y.double() - ref).abs() <= _error_bound(x, w, tg)).all()


@needs_ext
@pytest.mark.parametrize("variant", ["b32i", "b64i"])
def test_int4_gemm_exact_on_an_int16_grid(variant):
    """Activations that int16 represents exactly (each group's largest |x| = 32767 * 2^e, the
    rest integers times 2^e): the kernel must match float64 to float32 rounding, far tighter
    than the quantization bound (catches a 32767-vs-32768 slip or a scale bias)."""
    block = int(variant[1:-1])
    n, kp, tg, m = 2 * block + 16, 256, 64, 3
    codes, sz = _weight(n, kp, tg, 7)
    packed = pack(codes, 4, "cpu_tinygemm", variant)
    g = torch.Generator().manual_seed(8)
    ints = torch.randint(-32767, 32768, (m, kp // tg, tg), generator=g).double()
    ints[..., 0] = 32767.0
    x = (ints * 2.0 ** torch.randint(-12, 4, (m, kp // tg, 1), generator=g)).reshape(m, kp)
    y = torch.ops.awq_ao_cpu.int4_gemm(x.float(), packed, sz, tg, block)
    w = dequant_rows(codes, sz, tg).double()
    ref = x @ w.t()
    scale = x.abs() @ w.abs().t()
    assert ((y.double() - ref).abs() <= 2e-6 * scale).all()


@needs_ext
def test_tiny_activations_count_as_zero_not_garbage():
    codes, sz = _weight(32, 64, 32, 1)
    packed = pack(codes, 4, "cpu_tinygemm", "b32i")
    x = torch.full((1, 64), 1e-36)
    x[0, 32:] = torch.randn(32)  # the second group is ordinary
    y = torch.ops.awq_ao_cpu.int4_gemm(x, packed, sz, 32, 32)
    ref = x.double() @ dequant_rows(codes, sz, 32).double().t()
    assert y.isfinite().all()
    assert ((y.double() - ref).abs() <= _error_bound(x, dequant_rows(codes, sz, 32), 32) + 1e-30).all()


@needs_ext
def test_prefill_blocks_and_gradients(monkeypatch):
    """Several dequantized column blocks (the reused buffer), and a direct call with an input
    that requires grad (each block kept for backward, not overwritten)."""
    monkeypatch.setattr(cd, "_BLOCK_ELEMS", 64 * 128)  # one 32/64-row block per chunk
    t = Int4WeightTensor.from_float(torch.randn(192, 128), 4, 64)
    x = torch.randn(5, 128, requires_grad=True)
    y = ck.dequant_linear(x, t.packed, t.scales_and_zeros, 128, 64, t.layout_variant)
    w = t.dequantize(torch.float64)
    torch.testing.assert_close(y.double(), x.double() @ w.t(), rtol=1e-5, atol=1e-4)
    y.sum().backward()
    torch.testing.assert_close(x.grad.double(), w.sum(0).expand(5, 128), rtol=1e-5, atol=1e-4)


def test_forced_path_is_per_thread():
    import threading

    seen = []
    with ck.forced_path("dequant"):
        th = threading.Thread(target=lambda: seen.append(ck._FORCED.get()))
        th.start()
        th.join()
        assert ck._FORCED.get() == "dequant"
    assert seen == [None] and ck._FORCED.get() is None


@needs_ext
@pytest.mark.parametrize("variant", ["b32i", "b64i"])
def test_int4_dequant_t_is_the_eager_dequantization(variant):
    block = int(variant[1:-1])
    for n, kp, tg in [(3 * block, 256, 64), (2 * block + 16, 512, 256), (block, 64, 32)]:
        codes, sz = _weight(n, kp, tg, n + kp)
        packed = pack(codes, 4, "cpu_tinygemm", variant)
        nb = n // block
        ref = dequant_rows(codes, sz, tg)
        for b0, b1 in [(0, nb), (nb - 1, nb), (0, 0)]:
            out = torch.empty(kp, (b1 - b0) * block)
            torch.ops.awq_ao_cpu.int4_dequant_t(packed, sz, tg, block, b0, b1, out)
            assert torch.equal(out, ref[b0 * block : b1 * block].t())


@needs_ext
def test_special_activations():
    codes, sz = _weight(64, 128, 64, 0)
    packed = pack(codes, 4, "cpu_tinygemm", "b32i")
    x = torch.zeros(3, 128)
    x[1, 70] = float("nan")
    x[2, 5] = float("inf")
    y = torch.ops.awq_ao_cpu.int4_gemm(x, packed, sz, 64, 32)
    assert torch.equal(y[0], torch.zeros(64))  # all-zero rows give exact zeros
    assert y[1].isnan().all() and y[2].isnan().all()  # a non-finite input is never hidden
    with pytest.raises(RuntimeError, match="columns"):
        torch.ops.awq_ao_cpu.int4_gemm(torch.zeros(1, 64), packed, sz, 64, 32)
    with pytest.raises(RuntimeError, match="block must be 32 or 64"):
        torch.ops.awq_ao_cpu.int4_gemm(x, packed, sz, 64, 16)
    with pytest.raises(RuntimeError, match="bfloat16"):
        torch.ops.awq_ao_cpu.int4_gemm(x, packed, sz.float(), 64, 32)
    with pytest.raises(RuntimeError, match="group size must be"):
        torch.ops.awq_ao_cpu.int4_gemm(torch.zeros(1, 512), torch.zeros(64, 256, dtype=torch.uint8),
                                       torch.zeros(1, 64, 2, dtype=torch.bfloat16), 512, 32)
    with torch._subclasses.fake_tensor.FakeTensorMode():  # meta kernels registered
        fy = torch.ops.awq_ao_cpu.int4_gemm(torch.empty(3, 128), torch.empty(64, 64, dtype=torch.uint8),
                                            torch.empty(2, 64, 2, dtype=torch.bfloat16), 64, 32)
    assert fy.shape == (3, 64)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k, gs", [(200, 64), (576, 128), (256, -1), (96, 32)])
def test_decode_path_of_the_tensor(dtype, k, gs):
    """Int4WeightTensor on CPU decodes through the C++ kernel: ragged K, per-channel, any dtype,
    non-contiguous input, and M = 0."""
    t = Int4WeightTensor.from_float(torch.randn(96, k), 4, gs)
    big = torch.randn(4, 2 * k).to(dtype)
    x = big[:, ::2]
    assert not x.is_contiguous()
    ref = F.linear(x.double(), t.dequantize(torch.float64))
    with ck.forced_path("ext"):
        y = F.linear(x, t)
    assert y.dtype == dtype
    tol = {torch.float32: 2e-4, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[dtype]
    assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < tol
    assert F.linear(torch.randn(0, k, dtype=dtype), t).shape == (0, 96)
    y2 = F.linear(x, t)  # unforced: M = 4 is a decode size
    assert torch.equal(y, y2)
    assert ck.chosen_paths()[(96, k, str(dtype).removeprefix("torch."), "decode")].startswith("awq_ao C++")


@needs_ext
def test_prefill_uses_the_cpp_dequantization():
    t = Int4WeightTensor.from_float(torch.randn(128 + 16, 300), 4, 64)  # a 16-row tail block
    x = torch.randn(ck.EXT_DECODE_MAX_M + 5, 300)
    y = F.linear(x, t)
    ref = F.linear(x.double(), t.dequantize(torch.float64))
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-4)
    assert ck.chosen_paths()[(144, 300, "float32", "prefill")] == "dequant (C++) + fp32 matmul"


@needs_ext
def test_compiled_and_exported_match_eager():
    t = Int4WeightTensor.from_float(torch.randn(64, 128), 4, 64)
    lin = torch.nn.Linear(128, 64, bias=False)
    lin.weight = torch.nn.Parameter(t, requires_grad=False)
    x = torch.randn(2, 128)
    with torch.no_grad():
        eager = lin(x)
        compiled = torch.compile(lin, fullgraph=True)(x)
        exported = torch.export.export(lin, (x,)).module()(x)
    assert torch.equal(eager, compiled) and torch.equal(eager, exported)


def test_unavailable_kernels_fall_back_to_tinygemm_and_say_why(monkeypatch, caplog):
    from awq_ao.lowering.packing import cpu_tinygemm_variant

    if cpu_tinygemm_variant() is None:
        pytest.skip("no CPU tinygemm in this build")
    monkeypatch.setattr(cpu_ext, "_state", {"ok": False, "reason": "no C++ compiler (test)"})
    monkeypatch.setattr(ck, "_seen", {})
    t = Int4WeightTensor.from_float(torch.randn(48, 160), 4, 32)
    x = torch.randn(3, 160)
    with caplog.at_level(logging.INFO, logger="awq_ao.lowering.cpu_kernels"):
        y = F.linear(x, t)
    ref = F.linear(x.double(), t.dequantize(torch.float64))
    assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 1.6e-2
    path = ck.chosen_paths()[(48, 160, "float32", "decode")]
    assert path == "tinygemm bf16 (no C++ compiler (test))"
    assert "no C++ compiler (test)" in caplog.text
    with pytest.raises(RuntimeError, match="cannot run this weight"), ck.forced_path("ext"):
        F.linear(x, t)


def test_setting_is_validated(monkeypatch):
    monkeypatch.setenv("AWQ_AO_CPU_KERNELS", "yes")
    with pytest.raises(ValueError, match="AWQ_AO_CPU_KERNELS must be 0, 1 or auto"):
        cpu_ext._setting()
    monkeypatch.setenv("AWQ_AO_CPU_KERNELS", "0")
    assert cpu_ext._why_not() == "disabled by AWQ_AO_CPU_KERNELS=0"
    with pytest.raises(ValueError, match="path must be one of"):
        with ck.forced_path("fast"):
            pass


@needs_ext
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 80),
    k=st.integers(1, 200),
    items=st.integers(1, 4),
    gs=st.sampled_from([8, 32, -1]),
    bits=st.sampled_from([3, 4, 8]),
    block=st.sampled_from([1, 7, 128]),
    act_order=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_ef_round_block_gives_the_torch_loops_codes_bit_for_bit(n, k, items, gs, bits, block, act_order, seed):
    """The C++ column sweep of error-feedback rounding does the torch loop's float32 operations
    in the same order: the same codes, every bit (row tails, ragged blocks, several items)."""
    from awq_ao.lowering.quant_math import quant_params
    from awq_ao.passes import rounding

    gen = torch.Generator().manual_seed(seed)
    ws = [torch.randn(n, k, generator=gen) * 3 for _ in range(items)]
    hs = []
    for _ in range(items):
        x = torch.randn(2 * k + 3, k, generator=gen) @ torch.randn(k, k, generator=gen) * 0.3
        hs.append(x.t() @ x / x.shape[0])
    grids = [quant_params(w, bits, gs, True) for w in ws]
    args = (ws, [p[0] for p in grids], [p[1] for p in grids], hs, bits, gs)
    opts = {"damp": 0.05, "block": block, "act_order": act_order}
    assert rounding._sweep_kernel(torch.float32, torch.device("cpu"))
    got = rounding.error_feedback_codes_batched(*args, **opts)
    with mock.patch.object(rounding, "_sweep_kernel", lambda dtype, device: False):
        want = rounding.error_feedback_codes_batched(*args, **opts)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


@needs_ext
def test_ef_round_block_rejects_bad_arguments():
    wt = torch.zeros(1, 4, 8)
    u = torch.eye(4).unsqueeze(0)
    out = torch.zeros(1, 4, 8, dtype=torch.uint8)
    err = torch.zeros(1, 2, 8)
    torch.ops.awq_ao_cpu.ef_round_block(wt, u, wt + 1, wt.clone(), out, err, 0, 2, 15.0)
    with pytest.raises(RuntimeError, match="bad column block"):
        torch.ops.awq_ao_cpu.ef_round_block(wt, u, wt + 1, wt.clone(), out, err, 2, 6, 15.0)
    with pytest.raises(RuntimeError, match="err must be"):
        torch.ops.awq_ao_cpu.ef_round_block(wt, u, wt + 1, wt.clone(), out, err, 0, 3, 15.0)
    with pytest.raises(RuntimeError, match="wt must be contiguous float32"):
        torch.ops.awq_ao_cpu.ef_round_block(wt.double(), u, wt.clone(), wt.clone(), out, err, 0, 2, 15.0)
