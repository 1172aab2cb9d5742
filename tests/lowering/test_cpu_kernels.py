"""awq_ao.lowering.cpu_kernels (and cpu_dequant): the CPU decode/prefill paths against float64 references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import awq_ao.lowering.cpu_dequant as cd
import awq_ao.lowering.cpu_kernels as ck
from awq_ao.lowering import Int4WeightTensor, cpu_tinygemm_variant, pack
from awq_ao.lowering.packing import (
    tinygemm_geometry,
    tinygemm_qparams,
    tinygemm_scales_and_zeros,
)
from awq_ao.lowering.quant_math import num_groups, quantize

HAS_TINYGEMM = cpu_tinygemm_variant() is not None
needs_tinygemm = pytest.mark.skipif(not HAS_TINYGEMM, reason="no CPU tinygemm in this build")
VARIANTS = ["b64i", "b32i", "b32p", "b16p", "b64p"]


def _reference_weight(codes: torch.Tensor, sz: torch.Tensor, k: int, tg: int) -> torch.Tensor:
    """float64 ``(q - 8) * scale + offset`` from row-major codes [N, K_pad]."""
    n, kp = codes.shape
    s = sz[..., 0].double().t().repeat_interleave(tg, dim=1)  # [N, K_pad]
    o = sz[..., 1].double().t().repeat_interleave(tg, dim=1)
    return ((codes.double() - 8) * s + o)[:, :k]


def _random_tinygemm_weight(n, k, gs, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    codes, scale, zero = quantize(w, 4, gs)
    tg, kp = tinygemm_geometry(k, gs)
    scale = scale.bfloat16().float()
    sz = tinygemm_scales_and_zeros(scale, zero, k, gs).bfloat16()
    padded = torch.cat([codes, zero[:, -1:].to(torch.uint8).expand(n, kp - k)], dim=1)
    return padded, scale, zero, sz, tg, kp


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    blocks=st.integers(1, 3),
    tail=st.sampled_from([0, 16, 32, 48]),
    k=st.integers(1, 300),
    gs=st.sampled_from([32, 64, 128, -1]),
    variant=st.sampled_from(VARIANTS),
    m=st.integers(0, 70),
    seed=st.integers(0, 2**16),
)
def test_dequant_linear_matches_float64(blocks, tail, k, gs, variant, m, seed):
    block = int(variant[1:-1])
    n = blocks * block + (tail % block)
    if n % 16 or tinygemm_geometry(k, gs) is None:
        return
    codes, _, _, sz, tg, kp = _random_tinygemm_weight(n, k, gs, seed)
    packed = pack(codes, 4, "cpu_tinygemm", variant)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1))
    y = ck.dequant_linear(x, packed, sz, k, gs, variant)
    ref = F.linear(x.double(), _reference_weight(codes, sz, k, tg))
    assert y.shape == (m, n) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_dequant_transposed_is_the_transposed_weight(variant):
    block = int(variant[1:-1])
    n, k, gs = 2 * block, 256, 64
    codes, _, _, sz, tg, kp = _random_tinygemm_weight(n, k, gs, 3)
    packed = pack(codes, 4, "cpu_tinygemm", variant)
    scale, offset = sz[..., 0].float(), sz[..., 1].float()
    wt = cd.dequant_transposed(packed.view(2, kp, block // 2), scale, offset, variant.endswith("i"), tg)
    assert wt.shape == (kp, n)
    torch.testing.assert_close(wt.double().t()[:, :k], _reference_weight(codes, sz, k, tg), rtol=0, atol=1e-6)
    compiled = torch.compile(cd.dequant_transposed, dynamic=False, fullgraph=True)
    for cols in (slice(0, n), slice(block, 2 * block)):  # whole and a strided column slice
        torch._dynamo.reset()  # each variant compiles anew (dynamo's recompile limit)
        blocks = packed.view(2, kp, block // 2)[cols.start // block : cols.stop // block]
        assert torch.equal(
            compiled(blocks, scale[:, cols], offset[:, cols], variant.endswith("i"), tg),
            cd.dequant_transposed(blocks, scale[:, cols], offset[:, cols], variant.endswith("i"), tg),
        )


def test_qparams_round_trip_exactly():
    """scale and the integer zero point come back exactly from the bf16 scale/offset pairs."""
    for seed, (n, k, gs) in enumerate([(64, 576, 128), (32, 200, 64), (48, 512, -1), (16, 1024, 512)]):
        _, scale, zero, sz, _, _ = _random_tinygemm_weight(n, k, gs, seed)
        s, z = tinygemm_qparams(sz, k, gs)
        assert s.shape == z.shape == (n, num_groups(k, gs))
        assert torch.equal(s, scale) and torch.equal(z, zero.to(torch.uint8))


@needs_tinygemm
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_decode_path_within_bf16_of_reference(dtype):
    t = Int4WeightTensor.from_float(torch.randn(96, 200), 4, 64)
    x = torch.randn(3, 200).to(dtype)
    y = F.linear(x, t)
    ref = F.linear(x.double(), t.dequantize(torch.float64))
    assert y.dtype == dtype
    assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 1.6e-2


@needs_tinygemm
def test_non_contiguous_and_empty_inputs():
    t = Int4WeightTensor.from_float(torch.randn(64, 128), 4, 32)
    big = torch.randn(ck.MAX_DECODE_M + 8, 256)
    x = big[:, ::2]  # non-contiguous rows
    assert not x.is_contiguous()
    ref = F.linear(x.double(), t.dequantize(torch.float64))
    for rows in (slice(0, 5), slice(0, ck.MAX_DECODE_M + 8)):  # decode and prefill
        y = F.linear(x[rows], t)
        rel = ((y.double() - ref[rows]).abs().max() / ref[rows].abs().max()).item()
        assert rel < (1.6e-2 if y.shape[0] <= ck.MAX_DECODE_M else 1e-5)
    assert F.linear(torch.randn(0, 128), t).shape == (0, 64)
    assert F.linear(torch.randn(2, 0, 128), t).shape == (2, 0, 64)


@needs_tinygemm
def test_compiled_dequant_equals_eager(monkeypatch):
    """The inductor-compiled dequantization (used for big weights) is bit-identical."""
    t = Int4WeightTensor.from_float(torch.randn(128, 512), 4, 128)
    x = torch.randn(ck.MAX_DECODE_M + 8, 512)
    monkeypatch.setattr(ck, "ext_supports", lambda *a: False)  # the Python dequantization
    monkeypatch.setattr(cd, "COMPILE_MIN_ELEMS", 0)
    monkeypatch.setattr(ck, "_seen", {})  # the path log records each shape once: start afresh
    y_c = F.linear(x, t)
    assert ck.chosen_paths()[(128, 512, "float32", "prefill")] == "dequant (compiled) + fp32 matmul"
    monkeypatch.setattr(cd, "COMPILE_MIN_ELEMS", 1 << 60)
    monkeypatch.setattr(ck, "_seen", {})
    y_e = F.linear(x, t)
    assert ck.chosen_paths()[(128, 512, "float32", "prefill")] == "dequant (eager) + fp32 matmul"
    torch.testing.assert_close(y_c, y_e, rtol=1e-6, atol=1e-5)


@needs_tinygemm
def test_compile_failure_falls_back_to_eager_and_says_so(monkeypatch, caplog):
    t = Int4WeightTensor.from_float(torch.randn(64, 256), 4, 64)
    x = torch.randn(ck.MAX_DECODE_M + 8, 256)
    ref = F.linear(x, t)

    def broken(*a, **k):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(ck, "ext_supports", lambda *a: False)  # the Python dequantization
    monkeypatch.setattr(cd, "COMPILE_MIN_ELEMS", 0)
    monkeypatch.setattr(cd, "_compiled", broken)
    monkeypatch.setattr(cd, "_compile_failed", None)
    with caplog.at_level("WARNING"):
        y = F.linear(x, t)
    assert "could not compile" in caplog.text
    torch.testing.assert_close(y, ref)


@needs_tinygemm
def test_footprint_at_most_4_plus_32_over_g():
    from awq_ao.lowering.swap import footprint

    for gs in (32, 64, 128):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            t = Int4WeightTensor.from_float(torch.randn(256, 2048).to(dtype), 4, gs)
            assert t.bits_per_weight() <= 4 + 32 / gs + 1e-9, (gs, dtype, t.bits_per_weight())
            nib = Int4WeightTensor.from_float(torch.randn(256, 2048).to(dtype), 4, gs, layout="nibble")
            assert nib.bits_per_weight() <= 4 + 32 / gs + 1e-9
    lin = torch.nn.Linear(2048, 256)
    from awq_ao.lowering import quantize_linear_module

    quantize_linear_module(lin, 4, 128)
    fp = footprint(torch.nn.Sequential(lin))
    assert fp["quantized_weights"] == 256 * 2048 and fp["bits_per_weight"] <= 4.25
    assert fp["full_precision_bytes"] == 256 * 4  # the bias
