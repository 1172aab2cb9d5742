"""awq_ao.lowering.direct_cpu: eager decode matmuls that skip the custom op give the op's exact
results, and step aside where the op is needed (tracing, gradients, forced paths, prefill)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ext_checks import needs_ext, require_built
from torch._inductor.utils import run_and_get_code

import awq_ao.lowering.cpu_kernels as ck
from awq_ao.lowering import Int4WeightTensor, Int8RowWeightTensor, direct_cpu

pytestmark = needs_ext


@pytest.fixture(autouse=True)
def _built():
    require_built()


def _op4(x, w, bias):
    return torch.ops.awq_ao.w4a16_linear(
        x, w.packed, None, None, bias, 4, w.group_size, w.shape[1], w.pack_layout, w.layout_variant, w.scales_and_zeros
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (5,)])
def test_int4_direct_equals_the_op_bit_for_bit(dtype, shape):
    w = Int4WeightTensor.from_float(torch.randn(96, 200), 4, 64)  # ragged K: padded to 256
    bias = torch.randn(96).to(dtype)
    x = torch.randn(*shape, 200).to(dtype)
    y = direct_cpu.int4_linear(x, w.packed, w.scales_and_zeros, bias, 200, 64, w.layout_variant)
    assert y is not None and y.dtype == dtype and y.shape == (*shape, 96)
    assert torch.equal(y, _op4(x, w, bias))


def test_int8_direct_equals_the_op_bit_for_bit():
    q = Int8RowWeightTensor.from_float(torch.randn(50, 128))
    x = torch.randn(2, 3, 128).to(torch.bfloat16)
    bias = torch.randn(50).to(torch.bfloat16)
    y = direct_cpu.int8_linear(x, q.codes, q.row_scale, bias)
    assert y is not None and torch.equal(y, torch.ops.awq_ao.w8_linear(x, q.codes, q.row_scale, bias))


def test_steps_aside_where_the_op_is_needed():
    w = Int4WeightTensor.from_float(torch.randn(64, 128), 4, 64)
    args = (w.packed, w.scales_and_zeros, None, 128, 64, w.layout_variant)
    x = torch.randn(1, 128, requires_grad=True)
    assert direct_cpu.int4_linear(x, *args) is None  # gradients: the op has the backward
    with torch.no_grad():
        assert direct_cpu.int4_linear(x, *args) is not None
        assert direct_cpu.int4_linear(torch.randn(ck.EXT_DECODE_MAX_M + 1, 128), *args) is None  # prefill
        assert direct_cpu.int4_linear(torch.randn(0, 128), *args) is None  # no rows
        assert direct_cpu.int4_linear(torch.randn(1, 128, dtype=torch.float64), *args) is None
        with ck.forced_path("dequant"):
            assert direct_cpu.int4_linear(torch.randn(1, 128), *args) is None


def test_gradients_flow_through_the_op_path():
    w = Int4WeightTensor.from_float(torch.randn(64, 128), 4, 64)
    x = torch.randn(2, 128, requires_grad=True)
    F.linear(x, w).sum().backward()
    torch.testing.assert_close(x.grad, w.dequantize().sum(0).expand(2, -1), rtol=1e-5, atol=1e-5)


def test_export_keeps_awq_ao_ops():
    lin = torch.nn.Linear(128, 64, bias=False)
    lin.weight = torch.nn.Parameter(Int4WeightTensor.from_float(torch.randn(64, 128), 4, 64), requires_grad=False)
    x = torch.randn(1, 128)
    with torch.no_grad():
        ep = torch.export.export(lin, (x,), strict=False)
        targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
        assert any("awq_ao.w4a16_linear" in t for t in targets), targets
        assert not any("awq_ao_cpu" in t for t in targets), targets
        assert torch.equal(ep.module()(x), lin(x))


def test_compiled_graph_matches_eager():
    lin = torch.nn.Linear(128, 64, bias=True)
    lin.weight = torch.nn.Parameter(Int4WeightTensor.from_float(torch.randn(64, 128), 4, 64), requires_grad=False)
    x = torch.randn(1, 128)
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):  # this graph, not a cached one
        eager = lin(x)
        compiled, code = run_and_get_code(torch.compile(lin, fullgraph=True), x)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    calls = [line for c in code for line in c.splitlines() if "torch.ops.awq_ao" in line and "(" in line]
    # graphs keep awq_ao's op: inductor's on-disk caches cannot know whether a later process
    # has built the extension's ops
    assert any("awq_ao.w4a16_linear.default(" in line for line in calls), calls
    assert not any("awq_ao_cpu" in line for line in calls), calls
