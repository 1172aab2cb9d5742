"""End to end through torchao's quantize_ on tiny models of several architectures."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import (
    ARCHS,
    EXPECTED,
    assert_eager_compile_export_agree,
    compare_two_converts,
    tiny_model,
    token_batches,
)
from torchao.quantization import quantize_

import awq_ao
from awq_ao import awq_config, get_state, whole_model
from awq_ao.lowering import Int4WeightTensor
from awq_ao.lowering.scaled_input import ScaledInputLinear

LAYERS = 2


def run_flow(model, data, **opts):
    quantize_(model, awq_config(step="prepare", **opts), filter_fn=whole_model)
    with torch.no_grad():
        for b in data:
            model(b)
    quantize_(model, awq_config(progress=False, verbose=False, **opts), filter_fn=whole_model)
    return get_state(model).report


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("arch", ARCHS)
def test_quantize_flow_every_arch(arch):
    model = tiny_model(arch, hidden=64, heads=4, kv_heads=2, inter=128, layers=LAYERS)
    data = token_batches(4, 2, 24)
    with torch.no_grad():
        ref = model(data[0]).logits
    report = run_flow(model, data, group_size=32)
    # every target linear now holds INT4 weights
    assert report.quantized
    for name in report.quantized:
        mod = model.get_submodule(name)
        assert isinstance(mod.weight, Int4WeightTensor), name
    # groups found as expected; zero fallbacks where a fold is legal
    exp_kinds, exp_fb = EXPECTED[arch]
    counts = report.kind_counts()
    assert counts.get("fallback", 0) == exp_fb * LAYERS, counts
    for k, v in exp_kinds.items():
        assert counts.get(k, 0) == v * LAYERS, counts
    assert report.fallback_multiplies <= exp_fb * LAYERS
    # the search never does worse than RTN on its own objective
    for g in report.groups:
        if g.loss_rtn is not None:
            assert g.loss_best <= g.loss_rtn * (1 + 1e-6)
    with torch.no_grad():
        out = model(data[0]).logits
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 0.5
    assert report.size_after < report.size_before


def test_awq_beats_rtn_on_outliers():
    """With a few large activation channels, AWQ's output error is below RTN's."""
    torch.manual_seed(0)
    model = tiny_model("llama", hidden=128, heads=4, kv_heads=2, inter=256, layers=2)
    with torch.no_grad():
        for layer in model.model.layers:
            w = layer.input_layernorm.weight
            w[:4] *= 20.0  # outlier input channels, as in real LLMs
    data = token_batches(6, 4, 32)
    test = token_batches(2, 4, 32, seed=9)
    with torch.no_grad():
        ref = torch.cat([model(b).logits for b in test])
    rtn = copy.deepcopy(model)
    awq_ao.quantize(rtn, None, group_size=32, scale_search=False, clip=False, verbose=False, progress=False)
    awq = copy.deepcopy(model)
    awq_ao.quantize(awq, data, group_size=32, verbose=False, progress=False)
    with torch.no_grad():
        e_rtn = float((torch.cat([rtn(b).logits for b in test]) - ref).pow(2).mean())
        e_awq = float((torch.cat([awq(b).logits for b in test]) - ref).pow(2).mean())
    assert e_awq < e_rtn, (e_awq, e_rtn)


def test_gpt2_fallback_uses_explicit_multiply():
    model = tiny_model("gpt2", hidden=64, heads=4, inter=128, layers=1)
    report = run_flow(model, token_batches(3, 2, 16), group_size=32)
    mlp_proj = model.transformer.h[0].mlp.c_proj
    if report.fallback_multiplies:
        assert isinstance(mlp_proj, ScaledInputLinear)
    assert isinstance(mlp_proj.weight, Int4WeightTensor)
    # Conv1D layers became nn.Linear with INT4 weights
    assert isinstance(model.transformer.h[0].attn.c_attn, torch.nn.Linear)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_eager_compile_export_agree(arch):
    model = tiny_model(arch, hidden=64, heads=4, kv_heads=2, inter=128, layers=1)
    run_flow(model, token_batches(3, 2, 16), group_size=32)
    x = token_batches(1, 1, 16, seed=5)[0]
    assert_eager_compile_export_agree(model, x)


def test_ragged_group_every_layer_quantized():
    # hidden 80 and inter 144 are not multiples of 64: the last group is short
    model = tiny_model("llama", hidden=80, heads=5, kv_heads=5, inter=144, layers=1)
    data = token_batches(3, 2, 16)
    with torch.no_grad():
        ref = model(data[0]).logits
    report = run_flow(model, data, group_size=64)
    assert len(report.quantized) == 7
    for name in report.quantized:
        w = model.get_submodule(name).weight
        assert isinstance(w, Int4WeightTensor)
        assert w.dequantize().shape == w.shape
    with torch.no_grad():
        assert rel_err(model(data[0]).logits, ref) < 0.5


@pytest.mark.parametrize("bits,group_size,zero_point", [(3, 64, True), (4, -1, False), (8, 32, True)])
def test_other_settings(bits, group_size, zero_point):
    model = tiny_model("qwen2", hidden=64, heads=4, kv_heads=2, inter=96, layers=1)
    report = run_flow(model, token_batches(2, 2, 16), bits=bits, group_size=group_size, zero_point=zero_point)
    for name in report.quantized:
        w = model.get_submodule(name).weight
        assert w.bits == bits and w.group_size == group_size


def test_deterministic():
    outs = []
    for _ in range(2):
        model = tiny_model("llama", hidden=64, heads=4, kv_heads=2, inter=128, layers=1)
        run_flow(model, token_batches(3, 2, 16), group_size=32)
        outs.append(model.model.layers[0].mlp.down_proj.weight.dequantize())
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("search_rows, gram_rows", [(4, 4), (4, 10), (6, 2)])
def test_memory_bounded_by_config(search_rows, gram_rows):
    """The recorder keeps whole batches until max(max_search_samples, max_gram_samples) rows."""
    model = tiny_model("llama", hidden=64, heads=4, kv_heads=2, inter=128, layers=1)
    quantize_(model, awq_config(step="prepare", max_search_samples=search_rows, max_gram_samples=gram_rows), filter_fn=whole_model)
    with torch.no_grad():
        for b in token_batches(20, 2, 16):
            model(b)
    st = get_state(model)
    bound = max(search_rows, gram_rows)
    assert bound <= st.recorder.rows <= bound + 2 and st.recorder.total_calls == 20
    for obs in st.observers.values():
        assert obs.abs_sum.numel() == obs.in_features  # one vector, whatever the batch count


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2"])
def test_sequential_matches_in_memory_quality(arch):
    """Layer-by-layer convert finds the same groups and gives similar output error."""
    ra, rb, ea, eb = compare_two_converts(arch, 3, {}, {"sequential": True, "device": "cpu"})
    assert rb.kind_counts() == ra.kind_counts()
    assert sorted(rb.quantized) == sorted(ra.quantized)
    assert eb < 1.5 * ea + 1e-9, (ea, eb)


def test_duo_scaling_both_searches_the_union_of_candidates():
    """duo_scaling="both" tries both families: its search loss is never above either one's."""
    losses = {}
    for duo in (True, False, "both"):
        torch.manual_seed(0)
        model = tiny_model("llama", hidden=64, heads=4, kv_heads=2, inter=128, layers=1)
        rep = run_flow(model, token_batches(3, 2, 16), group_size=32, duo_scaling=duo, clip=False)
        losses[duo] = {tuple(g.consumers): g.loss_best for g in rep.groups}
    # in-memory mode searches every group on the unmodified model: same inputs in every run
    assert len(losses["both"]) >= 4
    for key, loss in losses["both"].items():
        assert loss <= min(losses[True][key], losses[False][key]) * (1 + 1e-6), key
    with pytest.raises(ValueError, match="duo_scaling"):
        awq_config(duo_scaling="sometimes")
