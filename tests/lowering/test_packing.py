"""Packing layouts and the quantization math they carry."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from awq_ao.lowering import packing
from awq_ao.lowering.packing import (
    LAYOUT_BYTE,
    LAYOUT_CPU_TINYGEMM,
    LAYOUT_NIBBLE,
    choose_layout,
    cpu_tinygemm_variant,
    pack,
    tinygemm_geometry,
    unpack,
)
from awq_ao.lowering.quant_math import (
    dequantize_codes,
    num_groups,
    quant_params,
    quantize,
)

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HAS_TINYGEMM = cpu_tinygemm_variant() is not None
needs_tinygemm = pytest.mark.skipif(not HAS_TINYGEMM, reason="no CPU tinygemm in this build")
ALL_VARIANTS = [packing._format_variant(b, i) for b, i in packing._TINYGEMM_CANDIDATES]


def _codes(n: int, k: int, bits: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.uint8)


# ------------------------------------------------------------------------------------------
# round trips
# ------------------------------------------------------------------------------------------


@SETTINGS
@given(
    bits=st.integers(2, 8),
    n=st.integers(1, 70),
    k=st.integers(1, 70),
    seed=st.integers(0, 2**16),
)
def test_nibble_byte_round_trip(bits, n, k, seed):
    codes = _codes(n, k, bits, seed)
    layouts = [LAYOUT_BYTE] + ([LAYOUT_NIBBLE] if bits <= 4 else [])
    for layout in layouts:
        p = pack(codes, bits, layout)
        assert p.dtype == torch.uint8
        assert tuple(p.shape) == packing.packed_shape(n, k, layout)
        assert torch.equal(unpack(p, bits, layout, n, k), codes)


def test_nibble_convention():
    codes = torch.tensor([[1, 2, 3], [15, 0, 7]], dtype=torch.uint8)
    p = pack(codes, 4, LAYOUT_NIBBLE)
    # low nibble = even k, high nibble = odd k, odd K padded with a zero nibble
    assert p.tolist() == [[1 | 2 << 4, 3], [15, 7]]


@SETTINGS
@given(
    bits=st.integers(2, 4),
    n16=st.integers(1, 14),
    k2=st.integers(1, 40),
    variant=st.sampled_from(ALL_VARIANTS),
    seed=st.integers(0, 2**16),
)
def test_tinygemm_round_trip_all_variants(bits, n16, k2, variant, seed):
    n, k = 16 * n16, 2 * k2
    codes = _codes(n, k, bits, seed)
    p = pack(codes, bits, LAYOUT_CPU_TINYGEMM, variant)
    assert p.shape == (n, k // 2)
    assert torch.equal(unpack(p, bits, LAYOUT_CPU_TINYGEMM, n, k, variant), codes)


@needs_tinygemm
@SETTINGS
@given(n16=st.integers(1, 14), k2=st.integers(1, 70), seed=st.integers(0, 2**16))
def test_tinygemm_pack_matches_aten(n16, k2, seed):
    n, k = 16 * n16, 2 * k2
    codes = _codes(n, k, 4, seed)
    ref = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    assert torch.equal(pack(codes, 4, LAYOUT_CPU_TINYGEMM), ref)


@needs_tinygemm
def test_tinygemm_variant_detected():
    assert cpu_tinygemm_variant() in ALL_VARIANTS
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        assert cpu_tinygemm_variant() == "b64i"


# ------------------------------------------------------------------------------------------
# geometry and layout choice
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "k, gs, expected",
    [
        (4096, 128, (128, 4096)),
        (200, 64, (64, 256)),
        (576, 128, (128, 640)),
        (4096, 512, (256, 4096)),  # tinygemm group 256 repeats each scale twice
        (200, -1, (32, 224)),  # one group: the tinygemm group with the least padding
        (300, 512, (64, 320)),  # group_size >= K is one group as well (ties: larger group)
        (96, 48, None),  # no tinygemm group size divides 48
        (1024, 16, None),
    ],
)
def test_tinygemm_geometry(k, gs, expected):
    assert tinygemm_geometry(k, gs) == expected


def test_choose_layout():
    assert choose_layout("cpu", 8, 64, 128, 128) == LAYOUT_BYTE
    assert choose_layout("cpu", 5, 64, 128, 128) == LAYOUT_BYTE
    assert choose_layout("cuda", 4, 64, 128, 128) == LAYOUT_NIBBLE
    assert choose_layout("meta", 4, 64, 128, 128) == LAYOUT_NIBBLE
    assert choose_layout("cpu", 4, 24, 128, 128) == LAYOUT_NIBBLE  # N % 16 != 0
    assert choose_layout("cpu", 4, 64, 128, 16) == LAYOUT_NIBBLE  # group 16 unsupported
    if HAS_TINYGEMM:
        assert choose_layout("cpu", 4, 64, 128, 128) == LAYOUT_CPU_TINYGEMM
        assert choose_layout("cpu", 3, 48, 200, 64) == LAYOUT_CPU_TINYGEMM
        assert choose_layout("cpu", 4, 64, 200, -1) == LAYOUT_CPU_TINYGEMM


def test_pack_errors():
    codes = _codes(16, 8, 4, 0)
    with pytest.raises(ValueError, match="4-bit range"):
        pack(codes | 16, 4, LAYOUT_NIBBLE)
    with pytest.raises(TypeError, match="uint8"):
        pack(codes.to(torch.int32), 4, LAYOUT_NIBBLE)
    with pytest.raises(ValueError, match="at most 4-bit"):
        pack(codes, 5, LAYOUT_NIBBLE)
    with pytest.raises(ValueError, match="unknown layout"):
        pack(codes, 4, "tiles")
    with pytest.raises(ValueError, match="N % 16"):
        pack(codes[:8], 4, LAYOUT_CPU_TINYGEMM, "b64i")
    with pytest.raises(ValueError, match="variant"):
        pack(codes, 4, LAYOUT_CPU_TINYGEMM, "x64")


# ------------------------------------------------------------------------------------------
# quantization math
# ------------------------------------------------------------------------------------------


@SETTINGS
@given(
    bits=st.integers(2, 8),
    n=st.integers(1, 8),
    k=st.integers(1, 300),
    gs=st.sampled_from([-1, 16, 32, 64, 128]),
    zero_point=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_quantize_error_bound(bits, n, k, gs, zero_point, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * 3
    codes, scale, zero = quantize(w, bits, gs, zero_point)
    assert codes.dtype == torch.uint8 and codes.shape == (n, k)
    assert scale.shape == zero.shape == (n, num_groups(k, gs))
    assert int(codes.max()) <= 2**bits - 1
    w_hat = dequantize_codes(codes, scale, zero, gs)
    gsz = k if gs == -1 else gs
    s = scale.repeat_interleave(gsz, dim=1)[:, :k]
    z = zero.repeat_interleave(gsz, dim=1)[:, :k]
    # inside the representable range the error is at most half a step
    q = w / s + z
    inside = (q >= -0.5) & (q <= 2**bits - 1 + 0.5)
    err = (w - w_hat).abs()
    assert torch.all(err[inside] <= s[inside] * (0.5 + 1e-4) + 1e-6)
    # outside the range the code is clamped to the nearest end
    assert torch.all(codes[~inside & (q < 0)] == 0)
    assert torch.all(codes[~inside & (q > 0)] == 2**bits - 1)


def test_ragged_last_group_uses_real_columns_only():
    torch.manual_seed(0)
    k, gs = 200, 64  # groups [0,64), [64,128), [128,192), [192,200)
    w = torch.randn(4, k)
    w[:, 192:] = torch.linspace(-0.04, 0.06, 8)  # last group: narrow range
    scale, zero = quant_params(w, 4, gs)
    s_last, z_last = quant_params(w[:, 192:], 4, -1)
    assert torch.equal(scale[:, -1:], s_last) and torch.equal(zero[:, -1:], z_last)
    assert torch.allclose(scale[:, -1], torch.full((4,), 0.1 / 15), rtol=1e-5)
    codes, scale, zero = quantize(w, 4, gs)
    w_hat = dequantize_codes(codes, scale, zero, gs)
    assert (w_hat[:, 192:] - w[:, 192:]).abs().max() <= 0.1 / 15 / 2 + 1e-6
