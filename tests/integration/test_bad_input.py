"""Bad input gets a clear error, and a failed convert leaves the model exactly as it was."""

from __future__ import annotations

import pytest
import torch
from tiny_models import assert_unchanged, snapshot, tiny_model, token_batches
from torchao.quantization import quantize_

import awq_ao
from awq_ao import CalibrationError, awq_config, get_state, whole_model


def test_convert_without_prepare():
    model = tiny_model("llama", layers=1)
    with pytest.raises(CalibrationError, match="step='prepare'"):
        quantize_(model, awq_config(), filter_fn=whole_model)


def test_convert_without_calibration_batches():
    model = tiny_model("llama", layers=1)
    quantize_(model, awq_config(step="prepare"), filter_fn=whole_model)
    snap = snapshot(model)
    with pytest.raises(CalibrationError, match="no calibration data"):
        quantize_(model, awq_config(), filter_fn=whole_model)
    assert_unchanged(model, snap)
    # still prepared: calibrate now and convert works
    with torch.no_grad():
        model(token_batches(1)[0])
    quantize_(model, awq_config(group_size=32, verbose=False, progress=False), filter_fn=whole_model)
    assert get_state(model).phase == "converted"


def test_empty_calibration_iterable():
    with pytest.raises(CalibrationError, match="empty"):
        awq_ao.quantize(tiny_model("llama", layers=1), [], verbose=False)


def test_nan_activations_name_the_layer():
    model = tiny_model("llama", layers=1)
    with torch.no_grad():
        model.model.embed_tokens.weight[7] = float("nan")
    quantize_(model, awq_config(step="prepare"), filter_fn=whole_model)
    with torch.no_grad():
        model(torch.full((1, 8), 7))
    with pytest.raises(FloatingPointError, match=r"model\.layers\.0\.self_attn\.q_proj"):
        quantize_(model, awq_config(), filter_fn=whole_model)


def test_unsupported_dtype():
    model = tiny_model("llama", layers=1, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64.*skip="):
        quantize_(model, awq_config(step="prepare"), filter_fn=whole_model)


def test_unquantizable_module_requested():
    model = tiny_model("llama", layers=1)
    with pytest.raises(ValueError, match="cannot be quantized"):
        quantize_(model, awq_config(step="prepare", include=("model.embed_tokens",)), filter_fn=whole_model)


@pytest.mark.parametrize("kw", [{"bits": 1}, {"bits": 9}, {"group_size": 0}, {"n_grid": 0}, {"step": "calibrate"}])
def test_bad_config(kw):
    with pytest.raises(ValueError):
        awq_config(**kw)


@pytest.mark.parametrize("sequential", [False, True])
def test_failure_midway_restores_model(monkeypatch, sequential):
    model = tiny_model("llama", layers=2)
    quantize_(model, awq_config(step="prepare"), filter_fn=whole_model)
    with torch.no_grad():
        for b in token_batches(2):
            model(b)
    snap = snapshot(model)
    import awq_ao.lowering.swap as swap

    real = swap.quantize_linear_module
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 9:  # in the second block: the first block's linears are already swapped
            raise RuntimeError("simulated failure in the middle of convert")
        return real(*a, **k)

    monkeypatch.setattr(swap, "quantize_linear_module", flaky)
    with pytest.raises(RuntimeError, match="simulated"):
        quantize_(model, awq_config(group_size=32, verbose=False, progress=False, sequential=sequential), filter_fn=whole_model)
    assert calls["n"] == 9
    assert_unchanged(model, snap)
    assert get_state(model).phase == "prepared"
    monkeypatch.setattr(swap, "quantize_linear_module", real)
    quantize_(model, awq_config(group_size=32, verbose=False, progress=False), filter_fn=whole_model)
    assert get_state(model).phase == "converted"


def test_rtn_needs_no_calibration():
    model = tiny_model("llama", layers=1)
    report = awq_ao.quantize(model, None, group_size=32, scale_search=False, clip=False, verbose=False)
    assert report.quantized and not report.groups


def test_calibration_that_rtn_ignores_is_said(recwarn):
    """scale_search=False, clip=False is round-to-nearest: given calibration data, it says so."""
    model = tiny_model("llama", layers=1)
    with pytest.warns(UserWarning, match="round-to-nearest"):
        awq_ao.quantize(model, token_batches(1), group_size=32, scale_search=False, clip=False, verbose=False)
    model = tiny_model("llama", layers=1)
    quantize_(model, awq_config(step="prepare", group_size=32), filter_fn=awq_ao.whole_model)
    model(token_batches(1)[0])
    with pytest.warns(UserWarning, match="without reading the calibration data"):
        quantize_(model, awq_config(group_size=32, scale_search=False, clip=False, verbose=False),
                  filter_fn=awq_ao.whole_model)


def test_swapped_out_modules_hold_no_folded_copies():
    """A linear replaced by its INT4 module keeps only its original weight (for rollback)."""
    from awq_ao.passes.fold import Transaction

    model = tiny_model("llama", layers=1)
    lin = model.model.layers[0].mlp.down_proj
    orig = lin.weight
    txn = Transaction()
    txn.set_param(lin, "weight", orig.detach() * 2)
    assert lin.weight is not orig
    txn.set_module(model, "model.layers.0.mlp.down_proj", torch.nn.Identity())
    assert lin.weight is orig  # the scaled copy is released as soon as the module leaves
    txn.rollback()
    assert model.model.layers[0].mlp.down_proj is lin and lin.weight is orig
