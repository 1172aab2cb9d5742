"""The torchao handler works on the root ``filter_fn=whole_model`` hands it; torchao's default
per-linear filter is refused with the fix, before anything changes."""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny_models import tiny_model, token_batches
from torchao.quantization import quantize_

import awq_ao
from awq_ao import awq_config, get_state, whole_model
from awq_ao import config as config_mod

OPTS = dict(group_size=32, progress=False, verbose=False)


def _run(model, filter_fn):
    quantize_(model, awq_config(step="prepare", **OPTS), filter_fn=filter_fn)
    with torch.no_grad():
        for b in token_batches(2):
            model(b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(model, awq_config(**OPTS), filter_fn=filter_fn)
    with torch.no_grad():
        return model(token_batches(1, seed=5)[0]).logits


def test_whole_model_filter_gives_the_root_once(monkeypatch):
    calls = []
    real = config_mod._awq_transform

    def spy(module, cfg):
        calls.append((type(module).__name__, cfg.step))
        return real(module, cfg)

    from torchao.quantization.transform_module import _QUANTIZE_CONFIG_HANDLER

    monkeypatch.setitem(_QUANTIZE_CONFIG_HANDLER, awq_ao.AWQConfig, spy)
    model = tiny_model("llama", layers=1)
    _run(model, whole_model)
    assert calls == [("LlamaForCausalLM", "prepare"), ("LlamaForCausalLM", "convert")]
    state = get_state(model)
    assert state.phase == "converted" and state.report.quantized


@pytest.mark.parametrize("step", ["prepare", "convert"])
def test_default_filter_is_refused_with_the_fix_and_nothing_changes(step):
    from tiny_models import assert_unchanged, snapshot

    model = tiny_model("llama", layers=1)
    if step == "convert":
        quantize_(model, awq_config(step="prepare", **OPTS), filter_fn=whole_model)
        with torch.no_grad():
            model(token_batches(1)[0])
    snap = snapshot(model)
    phase = get_state(model).phase if get_state(model) else None
    with pytest.raises(ValueError, match="filter_fn=awq_ao.whole_model") as err:
        quantize_(model, awq_config(step=step, **OPTS) if step == "prepare" else awq_config(**OPTS))
    assert "Linear" in str(err.value) and "Nothing was changed" in str(err.value)
    assert_unchanged(model, snap)
    assert (get_state(model).phase if get_state(model) else None) == phase


def test_handler_never_walks_python_frames():
    import inspect

    src = inspect.getsource(config_mod)
    assert "_getframe" not in src and "f_locals" not in src


def test_whole_model_on_a_model_without_nn_linear_targets():
    """GPT-2's blocks hold Conv1D only: the default filter would never visit them."""
    model = tiny_model("gpt2", layers=1)
    _run(model, whole_model)
    assert any(".attn.c_attn" in n for n in get_state(model).report.quantized)


def test_one_call_helper_takes_the_root_path():
    model = tiny_model("llama", layers=1)
    report = awq_ao.quantize(model, token_batches(2), **OPTS)
    assert report.quantized and get_state(model).phase == "converted"
