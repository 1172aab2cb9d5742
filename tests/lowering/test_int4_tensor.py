"""Int4WeightTensor, the awq_ao::w4a16_linear op, module swapping and model size."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import awq_ao.lowering.cpu_dequant as cpu_dequant
import awq_ao.lowering.cpu_kernels as cpu_kernels
import awq_ao.lowering.ops as ops
from awq_ao.lowering import (
    Int4WeightTensor,
    cpu_tinygemm_variant,
    model_size_bytes,
    pack,
    quantize_linear_module,
)
from awq_ao.lowering.int4_tensor import scale_storage_dtype
from awq_ao.lowering.quant_math import dequantize_codes, quantize

HAS_TINYGEMM = cpu_tinygemm_variant() is not None
needs_tinygemm = pytest.mark.skipif(not HAS_TINYGEMM, reason="no CPU tinygemm in this build")

# relative (to max |y|) tolerance of the linear output per activation dtype
RTOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def _tol(t: Int4WeightTensor, x: torch.Tensor) -> float:
    """Decode-sized inputs on the cpu_tinygemm layout run tinygemm in bfloat16."""
    rows = x.reshape(-1, x.shape[-1]).shape[0]
    if t.pack_layout == "cpu_tinygemm" and 0 < rows <= cpu_kernels.MAX_DECODE_M:
        return max(RTOL[torch.bfloat16], RTOL[x.dtype])
    return RTOL[x.dtype]


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).abs().max() / ref.abs().max().clamp(min=1e-12)).item()


def _ref_linear(x, t: Int4WeightTensor, bias=None):
    w = t.dequantize(torch.float64)
    return F.linear(x.double(), w, None if bias is None else bias.double())


def _weight(n, k, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g).to(dtype)


# ------------------------------------------------------------------------------------------
# numerics of the linear op
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 17, 80])
@pytest.mark.parametrize(
    "n, k, bits, gs",
    [
        (96, 200, 4, 64),  # ragged K, tinygemm with K padding and a 32-row tail block
        (64, 128, 4, -1),  # per channel
        (48, 200, 3, 64),
        (40, 96, 4, 32),  # N % 16 != 0 -> nibble layout
        (64, 72, 8, 32),  # byte layout, ragged
    ],
)
def test_linear_matches_float64_reference(x_dtype, m, n, k, bits, gs):
    torch.manual_seed(m)
    t = Int4WeightTensor.from_float(_weight(n, k, x_dtype), bits, gs)
    x = torch.randn(m, k).to(x_dtype)
    bias = torch.randn(n).to(x_dtype)
    y = F.linear(x, t, bias)
    assert y.dtype == x_dtype and y.shape == (m, n)
    assert _rel_err(y, _ref_linear(x, t, bias)) < _tol(t, x)


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_activation_dtype_may_differ_from_weight(w_dtype):
    t = Int4WeightTensor.from_float(_weight(64, 128, w_dtype), 4, 32)
    assert t.dtype == w_dtype and t.zero.dtype == torch.uint8
    assert t.scale.dtype == scale_storage_dtype(w_dtype, t.pack_layout)
    for x_dtype in (torch.float32, torch.bfloat16):
        for m in (5, cpu_kernels.MAX_DECODE_M + 8):  # decode and prefill paths
            x = torch.randn(m, 128).to(x_dtype)
            y = F.linear(x, t)
            assert y.dtype == x_dtype
            assert _rel_err(y, _ref_linear(x, t)) < _tol(t, x)


def test_batched_1d_and_empty_inputs():
    t = Int4WeightTensor.from_float(_weight(64, 128), 4, 64)
    x = torch.randn(2, 3, 128)
    assert _rel_err(F.linear(x, t), _ref_linear(x, t)) < _tol(t, x)
    assert F.linear(x[0, 0], t).shape == (64,)
    for dt in (torch.float32, torch.bfloat16):
        assert F.linear(torch.randn(0, 128, dtype=dt), t).shape == (0, 64)


def _decode_paths() -> list[str]:
    paths = ["tinygemm"] if HAS_TINYGEMM else []
    if getattr(torch.cpu, "_is_avx2_supported", lambda: False)():
        paths.append("ext")
    return paths


@needs_tinygemm
@pytest.mark.parametrize("path", _decode_paths())
@pytest.mark.parametrize("m", [1, 3, 17, 64])
@pytest.mark.parametrize(
    "n, k, gs", [(96, 200, 64), (64, 128, -1), (128, 256, 128), (80, 512, 512)]
)
def test_decode_paths_agree_with_dequant_path(path, m, n, k, gs):
    t = Int4WeightTensor.from_float(_weight(n, k, torch.bfloat16), 4, gs)
    assert t.pack_layout == "cpu_tinygemm" and t.scales_and_zeros is not None
    x = torch.randn(m, k, dtype=torch.bfloat16)
    bias = torch.randn(n, dtype=torch.bfloat16)
    with cpu_kernels.forced_path(path):
        y_dec = F.linear(x, t, bias)
    with cpu_kernels.forced_path("dequant"):
        y_dq = F.linear(x, t, bias)
    ref = _ref_linear(x, t, bias)
    assert _rel_err(y_dec, ref) < RTOL[torch.bfloat16]
    assert _rel_err(y_dq, ref) < RTOL[torch.bfloat16]
    assert _rel_err(y_dec, y_dq.double()) < RTOL[torch.bfloat16]


def _wrap(fn, calls):
    def inner(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)

    return inner


@needs_tinygemm
def test_decode_path_for_every_activation_dtype_up_to_max_m(monkeypatch):
    t = Int4WeightTensor.from_float(_weight(64, 128, torch.float32), 4, 64)
    max_m = cpu_kernels.decode_max_m(t.layout_variant, t.scales_and_zeros)
    ext = cpu_kernels.ext_supports(t.layout_variant, t.scales_and_zeros)
    dec, dq = [], []
    name = "ext_linear" if ext else "tinygemm_linear"
    monkeypatch.setattr(cpu_kernels, name, _wrap(getattr(cpu_kernels, name), dec))
    monkeypatch.setattr(cpu_kernels, "dequant_linear", _wrap(cpu_kernels.dequant_linear, dq))
    monkeypatch.setattr(cpu_kernels, "_seen", {})
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        y = F.linear(torch.randn(max_m, 128, dtype=dt), t)
        assert y.dtype == dt
    assert len(dec) == 3 and not dq
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        F.linear(torch.randn(max_m + 1, 128, dtype=dt), t)
    assert len(dec) == 3 and len(dq) == 3
    paths = cpu_kernels.chosen_paths()
    decode = "awq_ao C++ kernel (AVX2, int16 activations)" if ext else "tinygemm bf16"
    assert paths[(64, 128, "float16", "decode")].startswith(decode)
    assert paths[(64, 128, "float16", "prefill")].startswith("dequant (C++)" if ext else "dequant (eager)")


@pytest.mark.parametrize("layout", ["nibble", "byte", "cpu_tinygemm"])
def test_chunked_cpu_dequant(monkeypatch, layout):
    if layout == "cpu_tinygemm" and not HAS_TINYGEMM:
        pytest.skip("no tinygemm")
    n, k = 400, 200  # 400 = 6 * 64 + 16: tinygemm tail block in the last chunk
    t = Int4WeightTensor.from_float(_weight(n, k), 4, 64, layout=layout)
    x = torch.randn(cpu_kernels.MAX_DECODE_M + 8, k)  # the dequantizing (prefill) path
    bias = torch.randn(n)
    full = F.linear(x, t, bias)
    monkeypatch.setattr(ops, "_CPU_CHUNK_ELEMS", 128 * k)  # chunks of 128 rows
    monkeypatch.setattr(cpu_dequant, "_BLOCK_ELEMS", 64 * 256)  # one 64-row block at a time
    chunked = F.linear(x, t, bias)
    assert torch.allclose(full, chunked, atol=1e-5, rtol=1e-5)
    assert _rel_err(chunked, _ref_linear(x, t, bias)) < 1e-5


# ------------------------------------------------------------------------------------------
# construction, accessors, layouts
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits, gs", [(4, 64), (3, 64), (8, 32), (2, -1), (4, -1)])
def test_from_codes_round_trip(bits, gs):
    w = _weight(48, 200)
    codes, scale, zero = quantize(w, bits, gs)
    for dtype in (torch.float32, torch.bfloat16):
        t = Int4WeightTensor.from_codes(codes, scale, zero, bits, gs, dtype)
        assert t.shape == (48, 200) and t.dtype == dtype
        assert torch.equal(t.codes(), codes)
        assert torch.equal(t.zero, zero.to(torch.uint8))
        stored = scale.to(scale_storage_dtype(dtype, t.pack_layout))
        assert torch.equal(t.scale, stored)
        ref = dequantize_codes(codes, stored.float(), zero, gs, torch.float64)
        got = t.dequantize(torch.float32)
        if t.pack_layout == "cpu_tinygemm":  # offset (8 - zero) * scale rounded to bfloat16
            bound = stored.float().repeat_interleave(abs(gs) if gs > 0 else 200, 1)[:, :200] / 32
            assert torch.all((got.double() - ref).abs() <= bound.double() + 1e-7)
        else:
            assert torch.equal(got, ref.float())
        assert t.dequantize().dtype == dtype


def test_all_layouts_dequantize_identically():
    w = _weight(64, 200, torch.bfloat16)
    layouts = ["nibble", "byte"] + (["cpu_tinygemm"] if HAS_TINYGEMM else [])
    ts = [Int4WeightTensor.from_float(w, 4, 64, layout=lay) for lay in layouts]
    x = torch.randn(3, 200)
    for t in ts[1:]:  # same codes and parameters; tinygemm's offset is rounded to bf16
        assert torch.equal(t.codes(), ts[0].codes())
        assert torch.equal(t.scale, ts[0].scale) and torch.equal(t.zero, ts[0].zero)
        tol = 0 if t.pack_layout != "cpu_tinygemm" else 2e-2
        torch.testing.assert_close(t.dequantize(), ts[0].dequantize(), rtol=0, atol=tol)
        assert _rel_err(F.linear(x, t), F.linear(x, ts[0]).double()) < _tol(t, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_from_float_error_bound(dtype):
    w = _weight(32, 256, dtype)
    t = Int4WeightTensor.from_float(w, 4, 64)
    s = t.scale.float().repeat_interleave(64, dim=1)
    err = (w.float() - t.dequantize(torch.float32)).abs()
    # codes are rounded against the stored (16-bit) scale: half a step, plus the dtype's
    # rounding of the dequantized value, plus tinygemm's bf16 offset (at most s / 32)
    slack = s / 32 if t.pack_layout == "cpu_tinygemm" else 0
    eps = torch.finfo(dtype).eps
    assert torch.all(err <= s * 0.5 * (1 + 1e-3) + slack + w.float().abs() * eps)


def test_nbytes_and_repr():
    t = Int4WeightTensor.from_float(_weight(64, 256, torch.bfloat16), 4, 128, layout="nibble")
    assert t.nbytes_packed() == 64 * 128 + 64 * 2 * 2 + 64 * 2  # codes, bf16 scale, u8 zero
    assert t.bits_per_weight() <= 4 + 32 / 128
    r = repr(t)
    for part in ("Int4WeightTensor", "[64, 256]", "bfloat16", "bits=4", "group_size=128", "nibble"):
        assert part in r


def test_variant_mismatch_falls_back_and_converts():
    """A cpu_tinygemm tensor packed for another CPU build still computes correctly."""
    w = _weight(96, 128, torch.bfloat16)
    ref_t = Int4WeightTensor.from_float(w, 4, 64, layout="nibble")
    codes = ref_t.codes()
    foreign = "b32p" if cpu_tinygemm_variant() != "b32p" else "b64i"
    packed = pack(codes, 4, "cpu_tinygemm", foreign)
    from awq_ao.lowering.packing import tinygemm_scales_and_zeros

    sz = tinygemm_scales_and_zeros(ref_t.scale.float(), ref_t.zero, 128, 64).bfloat16()
    t = Int4WeightTensor(
        packed, 4, 64, "cpu_tinygemm", foreign, ref_t.shape, torch.bfloat16, scales_and_zeros=sz
    )
    assert torch.equal(t.codes(), codes)
    for m in (2, 40):
        x = torch.randn(m, 128, dtype=torch.bfloat16)
        assert _rel_err(F.linear(x, t), F.linear(x, ref_t).double()) < RTOL[torch.bfloat16]
    if HAS_TINYGEMM:  # copy_ (load_state_dict) repacks for this machine
        dst = Int4WeightTensor.from_float(torch.zeros_like(w), 4, 64)
        dst.copy_(t)
        assert dst.layout_variant == cpu_tinygemm_variant()
        assert torch.equal(dst.codes(), codes)


def test_to_dtype_and_device():
    lin = nn.Linear(128, 64)
    quantize_linear_module(lin, 4, 64)
    x = torch.randn(3, 128)
    y32 = lin(x)
    lin.to(torch.bfloat16)
    assert isinstance(lin.weight, Int4WeightTensor) and isinstance(lin.weight, nn.Parameter)
    assert lin.weight.dtype == torch.bfloat16 and lin.weight.scale.dtype == torch.bfloat16
    assert lin.weight.zero.dtype == torch.uint8
    assert lin.bias.dtype == torch.bfloat16
    y16 = lin(x.bfloat16())
    assert _rel_err(y16, y32.double()) < RTOL[torch.bfloat16]
    lin.half()
    assert lin.weight.dtype == torch.float16
    lin.float()
    assert lin.weight.dtype == torch.float32
    m = lin.weight.to("meta")  # another device: repacked to that device's layout
    assert m.device.type == "meta" and m.pack_layout == "nibble" and m.shape == (64, 128)
    with pytest.raises(TypeError, match="floating dtype"):
        lin.weight.to(torch.int8)


def test_state_dict_save_load():
    src = nn.Sequential(nn.Linear(128, 64), nn.Linear(64, 32))
    for m in src:
        quantize_linear_module(m, 4, 32)
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf)  # weights_only=True: the class is allow-listed
    dst = nn.Sequential(nn.Linear(128, 64), nn.Linear(64, 32))
    for m in dst:
        quantize_linear_module(m, 4, 32)
    dst.load_state_dict(sd)
    x = torch.randn(2, 128)
    assert torch.equal(dst(x), src(x))


# ------------------------------------------------------------------------------------------
# 3-D (MoE experts) weights: the same class with a leading expert dim
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("layout", ["nibble", "byte", "cpu_tinygemm"])
def test_experts_weight_is_stacked_2d_slabs(transposed, layout):
    if layout == "cpu_tinygemm" and not HAS_TINYGEMM:
        pytest.skip("no CPU tinygemm in this build")
    e, n, k, gs = 3, 32, 96, 32  # ragged last group on the 2-D layouts (96 = 3 groups) is whole
    w = torch.randn(e, n, k, generator=torch.Generator().manual_seed(0))
    logical = w.transpose(1, 2).contiguous() if transposed else w
    q = Int4WeightTensor.from_float(logical, 4, gs, True, layout=layout, transposed=transposed)
    assert (q.dim(), q.num_experts, q.out_features, q.in_features, q.transposed) == (3, e, n, k, transposed)
    assert tuple(q.shape) == tuple(logical.shape) and q.pack_layout == layout
    assert q.scale.shape == q.zero.shape == (e, n, k // gs) and q.codes().shape == (e, n, k)
    for i in range(e):  # every slab is exactly the 2-D weight of that expert
        ref = Int4WeightTensor.from_float(w[i], 4, gs, True, layout=layout)
        s = q.slab(i)
        assert s.dim() == 2 and torch.equal(s.codes(), ref.codes()) and torch.equal(s.scale, ref.scale)
        assert torch.equal(q.codes()[i], ref.codes()) and torch.equal(q.zero[i], ref.zero)
    assert q.bits_per_weight() <= (8 if layout == "byte" else 4) + 32 / gs + 1e-9  # byte: a code per byte
    assert q.num_experts == 3 and Int4WeightTensor.from_float(w[0], 4, gs).num_experts == 0
    assert "experts=3" in repr(q)


def test_experts_weight_convert_save_load_and_copy():
    w = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(1))
    q = Int4WeightTensor.from_float(w.transpose(1, 2).contiguous(), 4, 32, transposed=True)
    h = q.to(torch.bfloat16)
    assert isinstance(h, Int4WeightTensor) and h.dtype == torch.bfloat16 and h.transposed and h.shape == q.shape
    torch.testing.assert_close(h.dequantize(torch.float32), q.dequantize(), rtol=1e-2, atol=1e-2)
    buf = io.BytesIO()  # flatten/unflatten keeps the optional ``transposed`` attribute
    torch.save({"w": nn.Parameter(q, requires_grad=False)}, buf)
    buf.seek(0)
    back = torch.load(buf)["w"]  # weights_only=True: the class is allow-listed
    assert isinstance(back, Int4WeightTensor) and back.transposed and torch.equal(back.dequantize(), q.dequantize())
    dst = Int4WeightTensor.from_float(torch.zeros(2, 64, 16), 4, 32, transposed=True)
    dst.copy_(q)
    assert torch.equal(dst.dequantize(), q.dequantize())
    with pytest.raises(ValueError, match="does not match"):
        Int4WeightTensor.from_float(torch.zeros(2, 16, 64), 4, 32).copy_(q)  # same numel, not transposed


def test_pickles_from_before_the_transposed_attribute_load():
    """A tensor pickled without ``transposed`` (awq_ao before 3-D weights joined the class)
    unpickles as a 2-D weight and loads into a module with load_state_dict (copy_)."""
    q = Int4WeightTensor.from_float(torch.randn(16, 64), 4, 32)
    del q.__dict__["transposed"]  # what an old pickle's state holds
    buf = io.BytesIO()
    torch.save({"w": q}, buf)
    buf.seek(0)
    old = torch.load(buf)["w"]
    assert old.transposed is False
    dst = Int4WeightTensor.from_float(torch.zeros(16, 64), 4, 32)
    dst.copy_(old)
    assert torch.equal(dst.dequantize(), old.dequantize())


def test_former_experts_class_name_unpickles():
    from awq_ao.lowering import int4_experts

    q = Int4WeightTensor.from_float(torch.randn(2, 16, 64), 4, 32)
    assert int4_experts.Int4ExpertsTensor is Int4WeightTensor
    buf = io.BytesIO()
    torch.save(q, buf, _use_new_zipfile_serialization=False)  # one plain pickle stream: GLOBAL by name
    data = buf.getvalue().replace(b"awq_ao.lowering.int4_tensor\nInt4WeightTensor", b"awq_ao.lowering.int4_experts\nInt4ExpertsTensor")
    if data == buf.getvalue():  # the pickle's layout differs from what this test expects
        pytest.skip("class reference not found in the pickle")
    back = torch.load(io.BytesIO(data))  # weights_only: the old name is allow-listed
    assert isinstance(back, Int4WeightTensor) and torch.equal(back.dequantize(), q.dequantize())


def test_experts_weight_clear_errors():
    q = Int4WeightTensor.from_float(torch.randn(2, 16, 64), 4, 32)
    with pytest.raises(TypeError, match="grouped_linear"):
        F.linear(torch.randn(3, 64), q)
    assert q[1].dim() == 2 and torch.equal(q[1].codes(), q.slab(1).codes())  # W[e]
    with pytest.raises(NotImplementedError, match="only for"):
        Int4WeightTensor.from_float(torch.randn(2, 64, 16), 4, 32, transposed=True)[0]
    w2 = Int4WeightTensor.from_float(torch.randn(16, 64), 4, 32)
    with pytest.raises(ValueError, match="3-D"):
        w2.slab(0)
    with pytest.raises(ValueError, match="3-D"):
        w2.grouped_linear(torch.randn(1, 64), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="3-D"):
        Int4WeightTensor.from_float(torch.randn(16, 64), 4, 32, transposed=True)
    with pytest.raises(ValueError, match="2-D"):
        Int4WeightTensor.from_float(torch.randn(2, 2, 16, 64), 4, 32)
    with pytest.raises(ValueError, match="agree"):
        Int4WeightTensor.from_slabs([w2, Int4WeightTensor.from_float(torch.randn(16, 64), 4, 16)])


# ------------------------------------------------------------------------------------------
# eager == torch.compile == torch.export, autograd
# ------------------------------------------------------------------------------------------


def _tiny_model(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(200, 96), nn.SiLU(), nn.Linear(96, 48), nn.ReLU(), nn.Linear(48, 40)
    )
    for m in model:
        if isinstance(m, nn.Linear):
            quantize_linear_module(m, 4, 64)
    return model.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_compile_export_agree(tmp_path, dtype):
    model = _tiny_model(dtype)
    assert model[0].bias.requires_grad  # grad mode with trainable biases, like HF models
    x = torch.randn(2, 3, 200, dtype=dtype)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager)  # inductor may fuse SiLU differently
    ep = torch.export.export(model, (x,))
    targets = {str(n.target) for n in ep.graph.nodes}
    assert "awq_ao.w4a16_linear.default" in targets
    torch.testing.assert_close(ep.module()(x), eager, rtol=0, atol=0)
    path = tmp_path / "model.pt2"
    torch.export.save(ep, path)
    loaded = torch.export.load(path)
    torch.testing.assert_close(loaded.module()(x), eager, rtol=0, atol=0)


def test_grad_flows_to_input_only():
    model = _tiny_model(torch.float32)
    x = torch.randn(4, 200, requires_grad=True)
    model(x).square().sum().backward()
    g_eager = x.grad.clone()
    # float64 reference built from the dequantized weights
    xr = x.detach().double().requires_grad_()
    h = xr
    for m in model:
        if isinstance(m, nn.Linear):
            h = F.linear(h, m.weight.dequantize(torch.float64), m.bias.double())
        else:
            h = m(h)
    h.square().sum().backward()
    # the forward at M=4 runs tinygemm in bfloat16
    assert _rel_err(g_eager, xr.grad) < 3 * RTOL[torch.bfloat16]
    for m in model:
        if isinstance(m, nn.Linear):
            assert m.weight.grad is None and not m.weight.requires_grad
            assert m.bias.grad is not None
    # compiled backward gives the same input gradient
    x.grad = None
    torch.compile(model, fullgraph=True)(x).square().sum().backward()
    torch.testing.assert_close(x.grad, g_eager, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------
# swapping, model size, errors
# ------------------------------------------------------------------------------------------


def test_conv1d_becomes_linear():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(96, 64)  # nf=out, nx=in; weight [in, out]
    nn.init.normal_(conv.weight, std=0.05)
    nn.init.normal_(conv.bias)
    lin = quantize_linear_module(conv, 4, 32)
    assert isinstance(lin, nn.Linear) and lin is not conv
    assert lin.in_features == 64 and lin.out_features == 96
    assert isinstance(lin.weight, Int4WeightTensor) and torch.equal(lin.bias, conv.bias)
    x = torch.randn(2, 5, 64)
    ref = Int4WeightTensor.from_float(conv.weight.detach().t().contiguous(), 4, 32)
    assert torch.equal(lin.weight.dequantize(), ref.dequantize())
    assert _rel_err(lin(x), conv(x).double()) < 0.1  # within 4-bit quantization error
    assert _rel_err(lin(x), _ref_linear(x, lin.weight, lin.bias)) < _tol(lin.weight, x)


def test_model_size_bytes_dedups_and_counts_packed():
    emb = nn.Embedding(100, 64)
    head = nn.Linear(64, 100, bias=False)
    head.weight = emb.weight  # tied
    model = nn.Sequential(emb, nn.Linear(64, 128), head)
    model.register_buffer("buf", torch.zeros(10))
    dense = 100 * 64 * 4 + (128 * 64 + 128) * 4 + 10 * 4
    assert model_size_bytes(model) == dense
    quantize_linear_module(model[1], 4, 64)
    expected = dense - 128 * 64 * 4 + model[1].weight.nbytes_packed()
    assert model_size_bytes(model) == expected
    assert model[1].weight.nbytes_packed() < 128 * 64 * 4 / 4


def test_clear_errors():
    lin = quantize_linear_module(nn.Linear(128, 64), 4, 64)
    with pytest.raises(ValueError, match="128"):
        lin(torch.randn(2, 100))
    with pytest.raises(TypeError, match="float input"):
        lin(torch.ones(2, 128, dtype=torch.long))
    with pytest.raises(TypeError, match="Conv2d"):
        quantize_linear_module(nn.Conv2d(3, 3, 1), 4, 64)
    with pytest.raises(ValueError, match="already"):
        quantize_linear_module(lin, 4, 64)
    with pytest.raises(ValueError, match="bits"):
        Int4WeightTensor.from_float(torch.randn(16, 32), 9, 32)
    with pytest.raises(ValueError, match="scale and zero"):
        Int4WeightTensor.from_codes(
            torch.zeros(16, 64, dtype=torch.uint8), torch.ones(16, 3), torch.zeros(16, 3), 4, 32
        )
    with pytest.raises(ValueError, match="cpu_tinygemm"):
        Int4WeightTensor.from_float(torch.randn(24, 64), 4, 32, layout="cpu_tinygemm")
    with pytest.raises(TypeError, match="plain tensor"):
        lin.weight.copy_(torch.randn(64, 128))
    with pytest.raises(NotImplementedError):
        lin.weight + 1


def test_cuda_kernel_hook(monkeypatch):
    """The CUDA implementation calls awq_ao.kernels.w4a16_linear when it is importable."""
    t = Int4WeightTensor.from_float(_weight(64, 128, torch.float16), 4, 64, layout="nibble")
    x = torch.randn(3, 128, dtype=torch.float16)
    calls = []

    def fake_kernel(x2d, packed, scale, zero, group_size, bias):
        calls.append((x2d.shape, group_size))
        return F.linear(x2d, t.dequantize(), bias)

    monkeypatch.setattr(ops, "_cuda_kernel", lambda: fake_kernel)
    y = ops._w4a16_linear_cuda(x, t.packed, t.scale, t.zero, None, 4, 64, 128, "nibble", "", None)
    assert calls == [((3, 128), 64)] and torch.equal(y, F.linear(x, t.dequantize()))

    def declining_kernel(*args):
        raise NotImplementedError("shape")

    monkeypatch.setattr(ops, "_cuda_kernel", lambda: declining_kernel)
    y2 = ops._w4a16_linear_cuda(x, t.packed, t.scale, t.zero, None, 4, 64, 128, "nibble", "", None)
    assert _rel_err(y2, _ref_linear(x, t)) < RTOL[torch.float16]


@pytest.mark.gpu
def test_cuda_matches_cpu():
    t = Int4WeightTensor.from_float(_weight(256, 512, torch.bfloat16), 4, 128)
    tc = t.to("cuda")
    assert tc.pack_layout == "nibble" and tc.device.type == "cuda"
    assert torch.equal(tc.codes().cpu(), t.codes())
    for m in (1, 17, 300):
        x = torch.randn(m, 512, dtype=torch.bfloat16)
        y = F.linear(x.cuda(), tc).cpu()
        assert _rel_err(y, _ref_linear(x, t)) < RTOL[torch.bfloat16]
    back = tc.to("cpu")
    assert back.pack_layout == t.pack_layout and torch.equal(back.codes(), t.codes())


def _quantize_all_linears(model: nn.Module, bits: int, group_size: int) -> int:
    from awq_ao.lowering import is_quantizable_linear

    count = 0
    for name, child in list(model.named_children()):
        if is_quantizable_linear(child) and name != "lm_head":
            new = quantize_linear_module(child, bits, group_size)
            if new is not child:
                setattr(model, name, new)
            count += 1
        else:
            count += _quantize_all_linears(child, bits, group_size)
    return count


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_hf_model_eager_export(arch):
    from tiny_models import tiny_model, token_batches

    model = tiny_model(arch)
    ids = token_batches(1)[0]
    with torch.no_grad():
        before = model(ids, use_cache=False).logits
    size_before = model_size_bytes(model)
    n = _quantize_all_linears(model, 4, 32)
    assert n >= 8
    assert model_size_bytes(model) < size_before
    with torch.no_grad():
        eager = model(ids, use_cache=False).logits
    assert _rel_err(eager, before.double()) < 0.2  # 4-bit, random weights
    ep = torch.export.export(model, (ids,), {"use_cache": False}, strict=False)
    with torch.no_grad():
        out = ep.module()(ids, use_cache=False)
    torch.testing.assert_close(out.logits, eager, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_hf_model_compile(arch):
    from tiny_models import tiny_model, token_batches

    model = tiny_model(arch, dtype=torch.bfloat16)
    _quantize_all_linears(model, 4, 32)
    ids = token_batches(1)[0]
    eager = model(ids, use_cache=False).logits  # grad mode: HF biases / norms require grad
    compiled = torch.compile(model, fullgraph=True)(ids, use_cache=False).logits
    torch.testing.assert_close(compiled, eager, rtol=2e-2, atol=2e-2)


_INTERPRETER_SCRIPT = """
import torch, torch.nn.functional as F
import awq_ao.lowering.ops as ops
from awq_ao.lowering import Int4WeightTensor
assert ops._cuda_kernel() is not None, "awq_ao.kernels not picked up"
torch.manual_seed(0)
for bits, gs in ((4, 32), (3, -1)):
    t = Int4WeightTensor.from_float(torch.randn(64, 96, dtype=torch.float16), bits, gs,
                                    layout="nibble")
    x = torch.randn(3, 96, dtype=torch.float16)
    b = torch.randn(64, dtype=torch.float16)
    y = ops._w4a16_linear_cuda(x, t.packed, t.scale, t.zero, b, bits, gs, 96, "nibble", "", None)
    ref = F.linear(x.double(), t.dequantize(torch.float64), b.double())
    err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
    assert err < 2e-3, err
"""


def test_cuda_hook_calls_triton_kernels_in_interpreter():
    """The CUDA implementation and awq_ao.kernels agree on the call signature (run on CPU)."""
    import importlib.util
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("awq_ao.kernels.w4a16") is None:
        pytest.skip("awq_ao.kernels not present")
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton not installed")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-c", _INTERPRETER_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
