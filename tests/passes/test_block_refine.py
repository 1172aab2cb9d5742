"""block_refine_steps: tuning a quantized block's codes and scales on its output."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import block_call, tiny_model, token_batches
from torch import nn

import awq_ao
from awq_ao.lowering.int4_tensor import Int4WeightTensor
from awq_ao.lowering.quant_math import group_geometry
from awq_ao.lowering.swap import quantize_linear_module
from awq_ao.passes.block_refine import _OpenLinear, refine_block
from awq_ao.state import get_state

OPTS = dict(group_size=32, verbose=False, progress=False)


def _quantized_block(rows: int, bits: int = 3):
    """A tiny Llama block, its call, its float output, and the block with RTN INT weights."""
    block, args, kwargs = block_call(rows)
    with torch.no_grad():
        target = block(*args, **kwargs)
        target = (target[0] if isinstance(target, tuple) else target).detach()
    for m in list(block.modules()):
        if isinstance(m, nn.Linear):
            quantize_linear_module(m, bits, 32)
    return block, (args, kwargs), target


def _mse(block: nn.Module, call, target: torch.Tensor) -> float:
    with torch.no_grad():
        out = block(*call[0], **call[1])
        out = out[0] if isinstance(out, tuple) else out
    return float(((out - target) ** 2).mean())


def _weights(block: nn.Module) -> list[nn.Parameter]:
    return [m._parameters["weight"] for m in block.modules() if isinstance(m, nn.Linear)]


def test_refinement_lowers_the_block_error_and_stores_what_it_measured() -> None:
    block, call, target = _quantized_block(8)
    res = refine_block(block, call, 8, target, steps=30, lr=0.06, batch=4)
    assert res is not None and res.kept and res.loss_after < res.loss_before
    assert 0 < res.changed_codes < res.codes
    # the packed weights give back the error the pass measured on its float reconstruction
    assert _mse(block, call, target) == pytest.approx(res.loss_after, rel=1e-4)
    for w in _weights(block):
        assert isinstance(w, Int4WeightTensor) and not w.requires_grad
        assert int(w.codes().max()) <= 7
    assert all(p.requires_grad for n, p in block.named_parameters() if "norm" in n)


def test_no_gain_leaves_the_block_exactly_as_it_was() -> None:
    block, call, target = _quantized_block(4)
    before = _weights(block)
    res = refine_block(block, call, 4, target, steps=0, lr=0.06, batch=4)
    assert res is not None and not res.kept and res.changed_codes == 0
    assert res.loss_after == res.loss_before
    assert all(a is b for a, b in zip(_weights(block), before, strict=True))
    assert all("weight" not in m.__dict__ for m in block.modules())


def test_a_failure_restores_the_block() -> None:
    block, call, target = _quantized_block(4)
    before = _weights(block)
    calls = {"n": 0}

    def boom(mod, inp):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")

    h = block.mlp.down_proj.register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        refine_block(block, call, 4, target, steps=5, lr=0.06, batch=2)
    h.remove()
    assert all(a is b for a, b in zip(_weights(block), before, strict=True))
    assert all(p.requires_grad for n, p in block.named_parameters() if "norm" in n)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 9), k=st.integers(1, 80), bits=st.sampled_from([2, 3, 4]),
       group=st.sampled_from([8, 16, 32, 64]), seed=st.integers(0, 2**16))
def test_open_weight_is_the_dequantized_weight(n: int, k: int, bits: int, group: int, seed: int) -> None:
    """Opened with no offsets, a linear's float weight is ``(code - zero) * scale`` of its
    group (float64 reference), for ragged groups too."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g))
    quantize_linear_module(lin, bits, group)
    w = lin.weight
    col = torch.arange(k) // group_geometry(k, group).size
    ref = (w.codes().double() - w.zero.double()[:, col]) * w.scale.double()[:, col]
    opened = _OpenLinear(lin)
    opened.set_weight()
    torch.testing.assert_close(lin.weight.double(), ref, rtol=1e-6, atol=1e-6)
    opened.restore()
    assert lin._parameters["weight"] is w


def test_layer_by_layer_convert_refines_every_block() -> None:
    model = tiny_model("llama", layers=2)
    calib = token_batches(4)
    rep = awq_ao.quantize(copy.deepcopy(model), calib, bits=3, block_refine_steps=6, **OPTS)
    assert len(rep.block_refine) == 2 and "block refine" in rep.times
    assert "block refinement:" in rep.summary()
    assert all(r.loss_after < r.loss_before for r in rep.block_refine if r.kept)


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="block_refine_steps"):
        awq_ao.awq_config(block_refine_steps=-1)
    with pytest.raises(ValueError, match="block_refine_lr"):
        awq_ao.awq_config(block_refine_lr=0.0)
    with pytest.raises(ValueError, match="block_refine_batch"):
        awq_ao.awq_config(block_refine_batch=0)
    with pytest.warns(UserWarning, match="block_refine_steps has no effect with sequential=False"):
        awq_ao.awq_config(block_refine_steps=4, sequential=False)


def test_whole_model_mode_says_it_did_not_refine() -> None:
    """A model whose linears are not all in one block stack runs whole-model under 'auto'."""
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))
    calib = [torch.randn(4, 32) for _ in range(2)]
    rep = awq_ao.quantize(model, calib, bits=4, block_refine_steps=4, **OPTS)
    assert not rep.block_refine
    assert any("block_refine_steps has no effect in whole-model mode" in w for w in rep.warnings)


@pytest.mark.parametrize(("bits", "given", "steps"), [(3, 0, 0), (3, 6, 6), (4, 5, 5)])
def test_refine_steps_is_what_was_asked_and_zero_without_a_sample(bits: int, given: int, steps: int) -> None:
    assert awq_ao.awq_config(bits=bits).refine_steps == 0  # off by default (Gemma 3 INT3: test worse)
    cfg = awq_ao.awq_config(bits=bits, block_refine_steps=given)
    assert cfg.block_refine_steps == given and cfg.refine_steps == steps
    # no calibration sample (plain round-to-nearest): nothing to tune on
    assert awq_ao.awq_config(bits=bits, block_refine_steps=given, scale_search=False, clip=False).refine_steps == 0


def test_refinement_runs_under_no_grad_and_inference_mode_is_refused_untouched() -> None:
    """The CLI converts under no_grad; autograd cannot run under inference_mode: a clear error
    before anything changes (without refinement, convert still runs there)."""
    model = tiny_model("llama", layers=2)
    calib = token_batches(4)
    with torch.no_grad():
        rep = awq_ao.quantize(copy.deepcopy(model), calib, bits=3, block_refine_steps=4, **OPTS)
    assert len(rep.block_refine) == 2 and torch.is_grad_enabled()
    m = copy.deepcopy(model)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.inference_mode(), pytest.raises(RuntimeError, match="torch.no_grad.*block_refine_steps=0"):
        awq_ao.quantize(m, calib, bits=3, block_refine_steps=4, **OPTS)
    after = m.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert get_state(m) is None and not any(x._forward_pre_hooks for x in m.modules())  # not even prepared
    with torch.inference_mode():
        rep3 = awq_ao.quantize(copy.deepcopy(model), calib, bits=3, **OPTS)
    assert rep3.quantized and not rep3.block_refine
