"""Shared by the tests of awq_ao's C++ CPU kernels: whether they should be there, a skip marker
for the tests that need them, and :func:`require_built` (a failed build fails, never skips)."""

from __future__ import annotations

import pytest
import torch

from awq_ao.lowering import cpu_ext

#: The CPU has AVX2 (the kernels' instruction set).
HAS_AVX2 = bool(getattr(torch.cpu, "_is_avx2_supported", lambda: False)())
#: The kernels are expected here: AVX2 and not turned off by AWQ_AO_CPU_KERNELS=0.
EXT_EXPECTED = HAS_AVX2 and cpu_ext._setting() != "0"

needs_ext = pytest.mark.skipif(not EXT_EXPECTED, reason="awq_ao's CPU kernels need AVX2 (and not AWQ_AO_CPU_KERNELS=0)")


def require_built() -> None:
    """Where the kernels are expected, they must build."""
    if EXT_EXPECTED:
        assert cpu_ext.load(), cpu_ext.unavailable_reason()
