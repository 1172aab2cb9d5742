"""The 8-bit output head: ``awq_ao_cpu::int8_gemm``, ``awq_ao::w8_linear``,
``Int8RowWeightTensor`` and ``head="int8"``, against float64 references.

``int8_gemm`` quantizes activations per (row, group of ``ag`` columns) to int16, so its error
against the exact product of the stored weight is bounded by
``sum_g amax_g / 65534 * sum_{k in g} |W[n, k]|`` plus float32 rounding.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ext_checks import EXT_EXPECTED, needs_ext, require_built
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import VOCAB, assert_eager_compile_export_agree, tiny_model, token_batches

import awq_ao
from awq_ao.lowering import Int8RowWeightTensor, int8_ops
from awq_ao.lowering.cpu_kernels import chosen_paths
from awq_ao.lowering.head import find_head, quantize_head


@pytest.fixture(autouse=True)
def _built():
    require_built()


def _codes(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, generator=g) * 0.02 + 1e-4
    return codes, scale


def _bound(x: torch.Tensor, w: torch.Tensor, ag: int) -> torch.Tensor:
    m, k = x.shape
    amax = x.double().abs().view(m, k // ag, ag).amax(-1)
    wabs = w.double().abs().view(w.shape[0], k // ag, ag).sum(-1)
    return (amax / 65534) @ wabs.t() * 1.01 + 1e-5 * (x.double().abs() @ w.double().abs().t()) + 1e-30


@needs_ext
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    m=st.integers(0, 9),
    n=st.integers(1, 80),
    groups=st.integers(1, 5),
    ag=st.sampled_from([32, 64, 128]),
    spread=st.sampled_from([1e-3, 1.0, 1e3]),
    seed=st.integers(0, 2**16),
)
def test_int8_gemm_within_int16_bound(m, n, groups, ag, spread, seed):
    k = groups * ag
    codes, scale = _codes(n, k, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(m, k, generator=g) * spread
    x[:, :: max(1, k // 5)] *= 30  # a few outliers per row, as in real activations
    y = torch.ops.awq_ao_cpu.int8_gemm(x, codes, scale, ag)
    w = codes.double() * scale.double()[:, None]
    ref = x.double() @ w.t()
    assert y.shape == (m, n) and y.dtype == torch.float32
    assert ((y.double() - ref).abs() <= _bound(x, w, ag)).all()


@needs_ext
def test_int8_gemm_exact_on_the_int16_grid():
    """Activations already on each group's int16 grid (max = 32767 steps) quantize exactly, so
    the integer dot products are exact and only float32 rounding remains. The other steps are
    small (|s| <= 200), so a slip of one step on one element (e.g. 32767 -> 32768 or an
    off-by-one scale) moves the output by |code| * step * scale, far above this tolerance
    (about 18 * step * scale) for most codes."""
    n, k, ag = 40, 64, 32
    codes, scale = _codes(n, k, 3)
    g = torch.Generator().manual_seed(4)
    steps = torch.randint(-200, 201, (5, k), generator=g)
    steps[:, ::ag] = 32767  # each group's max |x| is exactly 32767 steps
    step = torch.tensor([1e-3, 0.5, 2.0, 7.0, 1e-6])[:, None]
    x = (steps.double() * step.double()).float()
    y = torch.ops.awq_ao_cpu.int8_gemm(x, codes, scale, ag)
    ref = x.double() @ (codes.double() * scale.double()[:, None]).t()
    rounding = 2e-6 * (x.double().abs() @ (codes.double().abs() * scale.double()[:, None]).t())
    assert ((y.double() - ref).abs() <= rounding + 1e-30).all()
    slipped = x.clone()
    slipped[:, 1] += step[:, 0].float()  # one element one step off: must be caught
    y_bad = slipped.double() @ (codes.double() * scale.double()[:, None]).t()
    assert ((y_bad - ref).abs() > rounding).float().mean() > 0.8


@needs_ext
def test_int8_gemm_nan_inf_and_zero_groups():
    codes, scale = _codes(16, 128, 5)
    x = torch.randn(3, 128)
    x[0, 5] = float("nan")
    x[1, 70] = float("inf")
    x[2] = 0.0
    y = torch.ops.awq_ao_cpu.int8_gemm(x, codes, scale, 64)
    assert y[0].isnan().all() and y[1].isnan().all()  # inf * 0-step scale is NaN, as in the int4 kernel
    assert (y[2] == 0).all()


@needs_ext
def test_int8_gemm_refuses_bad_arguments():
    codes, scale = _codes(8, 96, 0)
    with pytest.raises(RuntimeError, match="activation group"):
        torch.ops.awq_ao_cpu.int8_gemm(torch.randn(1, 96), codes, scale, 64)  # 64 does not divide 96
    with pytest.raises(RuntimeError, match="codes must be"):
        torch.ops.awq_ao_cpu.int8_gemm(torch.randn(1, 96), codes.to(torch.uint8), scale, 32)
    with pytest.raises(RuntimeError, match="x must be"):
        torch.ops.awq_ao_cpu.int8_gemm(torch.randn(1, 64), codes, scale, 32)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 50), k=st.integers(1, 200), seed=st.integers(0, 2**16))
def test_from_float_rounds_to_nearest_per_row(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * 3
    w[0] = 0.0  # an all-zero row
    q = Int8RowWeightTensor.from_float(w)
    assert q.codes.dtype == torch.int8 and q.codes.abs().max() <= 127
    err = (q.dequantize(torch.float64) - w.double()).abs()
    # half a step, plus float32 rounding of w / scale and of codes * scale (<= 127 * 2^-24 steps)
    assert (err <= q.row_scale.double()[:, None] * (0.5 + 1e-5)).all()
    assert (q.dequantize()[0] == 0).all()
    assert q.bits_per_weight == 8 + 32 / k


def test_from_float_refuses_bad_weights():
    with pytest.raises(ValueError, match="NaN or inf"):
        Int8RowWeightTensor.from_float(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(TypeError, match="2-D float"):
        Int8RowWeightTensor.from_float(torch.ones(3, dtype=torch.int64))


@pytest.mark.parametrize("k", [64, 48])  # 48: not a multiple of 32, the dequantizing path
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [0, 1, 5, int8_ops.EXT_MAX_M + 3])
def test_linear_and_embedding_match_the_dequantized_weight(k, dtype, m):
    w = torch.randn(70, k).to(dtype)
    q = Int8RowWeightTensor.from_float(w)
    wd = q.dequantize(torch.float64)
    bias = torch.randn(70).to(dtype)
    x = torch.randn(1, m, 2 * k).to(dtype)[:, :, ::2]  # non-contiguous
    y = F.linear(x, q, bias)
    ref = x.double() @ wd.t() + bias.double()
    assert y.shape == (1, m, 70) and y.dtype == dtype
    tol = 1e-3 if dtype == torch.float32 else 3e-2
    scale = float(ref.abs().amax()) if m else 1.0
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol * max(scale, 1.0))
    ids = torch.tensor([[0, 69, 3], [5, 5, 1]])
    emb = F.embedding(ids, q)
    assert emb.dtype == dtype
    torch.testing.assert_close(emb, wd[ids].to(dtype))


def test_path_log_names_why_the_kernel_is_not_used():
    q = Int8RowWeightTensor.from_float(torch.randn(24, 40))
    F.linear(torch.randn(2, 40), q)
    path = chosen_paths()[(24, 40, "float32", "int8 decode")]
    assert "K % 32 == 0" in path or "unavailable" in path


def test_to_dtype_device_and_copy():
    q = Int8RowWeightTensor.from_float(torch.randn(16, 32))
    b = q.to(torch.bfloat16)
    assert isinstance(b, Int8RowWeightTensor) and b.dtype == torch.bfloat16
    assert torch.equal(b.codes, q.codes) and b.row_scale.dtype == torch.float32
    with pytest.raises(TypeError, match="floating dtype"):
        q.to(torch.int32)
    lin = torch.nn.Linear(32, 16, bias=False)
    lin.weight = torch.nn.Parameter(q, requires_grad=False)
    lin.to(torch.bfloat16)
    assert lin.weight.dtype == torch.bfloat16 and isinstance(lin.weight, Int8RowWeightTensor)


def _untied_llama():
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=VOCAB, num_hidden_layers=1,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("arch", ["gpt2", "gemma", "opt"])
def test_head_int8_tied_models_share_one_8bit_weight(arch):
    model = tiny_model(arch, hidden=64, heads=4, kv_heads=2, inter=128, layers=1)
    x = token_batches(1, 2, 12, seed=3)[0]
    with torch.no_grad():
        ref = model(x).logits
    report = awq_ao.quantize(model, token_batches(2, 2, 12), group_size=32, head="int8", verbose=False, progress=False)
    plan_head = report.head["head"]
    w = model.get_submodule(plan_head).weight
    assert isinstance(w, Int8RowWeightTensor)
    emb = model.get_input_embeddings()
    assert emb.weight is w and report.head["sharing"]
    assert report.footprint["int8_bytes"] == w.nbytes_packed()
    assert "8-bit row-wise" in report.summary()
    with torch.no_grad():
        y = model(x).logits
    assert (y - ref).abs().mean() < 0.2 * ref.abs().mean()  # INT4 body + 8-bit head: close


def test_head_int8_untied_leaves_the_embedding_in_float():
    model = _untied_llama()
    report = awq_ao.quantize(model, None, group_size=32, scale_search=False, clip=False, head="int8",
                             verbose=False, progress=False)
    assert isinstance(model.lm_head.weight, Int8RowWeightTensor)
    assert type(model.model.embed_tokens.weight) is torch.nn.Parameter
    assert report.head["sharing"] == []


def test_head_int8_eager_compile_export_agree():
    model = tiny_model("gpt2", hidden=64, heads=4, kv_heads=2, inter=128, layers=1)
    awq_ao.quantize(model, token_batches(2, 2, 16), group_size=32, head="int8", verbose=False, progress=False)
    x = token_batches(1, 1, 16, seed=5)[0]
    assert_eager_compile_export_agree(model, x)


def test_head_int8_generate_runs():
    model = tiny_model("llama", hidden=64, heads=4, kv_heads=2, inter=128, layers=1)
    quantize_head(model)
    out = model.generate(token_batches(1, 1, 6)[0], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 10)


def test_head_int8_refused_before_any_edit():
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="no output head"):
        awq_ao.quantize(model, None, group_size=32, scale_search=False, clip=False, head="int8",
                        verbose=False, progress=False)
    after = model.state_dict()
    assert all(type(after[k]) is torch.Tensor and torch.equal(after[k], v) for k, v in before.items())


def test_find_head_refuses_a_quantized_head():
    model = tiny_model("llama", hidden=64, heads=4, kv_heads=2, inter=128, layers=1)
    quantize_head(model)
    with pytest.raises(ValueError, match="already quantized"):
        find_head(model)


def test_head_int8_logs_the_kernel_path():
    model = tiny_model("llama", hidden=64, heads=4, kv_heads=2, inter=128, layers=1)
    quantize_head(model)
    model(token_batches(1, 1, 4, seed=9)[0])
    path = chosen_paths()[(VOCAB, 64, "float32", "int8 decode")]
    if EXT_EXPECTED:
        assert path == "C++ int8 kernel (int16 activations)"
    else:
        assert "unavailable" in path


@pytest.mark.parametrize("arch", ["gpt2", "untied_llama"])
def test_8bit_head_round_trips_through_save_quantized(tmp_path, arch):
    from awq_ao import load_quantized, save_quantized

    model = _untied_llama() if arch == "untied_llama" else tiny_model(arch, hidden=64, heads=4, kv_heads=2, inter=128, layers=1)
    awq_ao.quantize(model, None, group_size=32, scale_search=False, clip=False, head="int8", verbose=False, progress=False)
    x = token_batches(1, 2, 12, seed=4)[0]
    with torch.no_grad():
        ref = model(x).logits
    d = save_quantized(model, tmp_path / "ckpt")
    loaded = load_quantized(d)
    head = loaded.get_output_embeddings().weight
    assert isinstance(head, Int8RowWeightTensor)
    assert (loaded.get_input_embeddings().weight is head) == (arch == "gpt2")
    assert torch.equal(head.codes, model.get_output_embeddings().weight.codes)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, ref)


def test_a_corrupt_8bit_head_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from awq_ao import load_quantized, save_quantized
    from awq_ao.checkpoint.formats import CheckpointError

    model = tiny_model("gpt2", hidden=64, heads=4, kv_heads=2, inter=128, layers=1)
    awq_ao.quantize(model, None, group_size=32, scale_search=False, clip=False, head="int8", verbose=False, progress=False)
    d = save_quantized(model, tmp_path / "ckpt")
    shard = next(d.glob("*.safetensors"))
    tensors = load_file(shard)
    key = next(k for k in tensors if k.endswith("weight_scale") and tensors[k].dim() == 2 and tensors[k].shape[1] == 1)
    tensors[key][3] = -1.0
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="finite and > 0|manifest|header|size"):
        load_quantized(d)


def test_saving_an_8bit_head_elsewhere_is_refused_before_writing(tmp_path):
    from awq_ao import save_quantized
    from awq_ao.checkpoint.formats import CheckpointError

    model = tiny_model("gpt2", hidden=64, heads=4, kv_heads=2, inter=128, layers=1)
    awq_ao.quantize(model, None, group_size=32, scale_search=False, clip=False, head="int8",
                    verbose=False, progress=False)
    with pytest.raises(CheckpointError, match="quantize_head"):
        save_quantized(model, tmp_path / "ckpt", format="compressed-tensors")
    with pytest.raises(CheckpointError, match="quantize_head"):
        model.save_pretrained(tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []
