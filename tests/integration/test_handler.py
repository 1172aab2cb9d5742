"""The torchao handler: ``filter_fn=whole_model`` hands it the root; the default filter still works."""

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


@pytest.fixture
def no_frame_lookup(monkeypatch):
    def refuse(module):
        raise AssertionError("the handler looked for quantize_'s model although it was given the root")

    monkeypatch.setattr(config_mod, "_enclosing_quantize_model", refuse)


def test_whole_model_filter_gives_the_root_once(monkeypatch, no_frame_lookup):
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


def test_whole_model_and_default_filter_quantize_identically(no_frame_lookup, monkeypatch):
    a = _run(tiny_model("llama", layers=2), whole_model)
    monkeypatch.undo()  # the default filter needs the lookup
    b = _run(tiny_model("llama", layers=2), None)
    assert torch.equal(a, b)


def test_whole_model_on_a_model_without_nn_linear_targets(no_frame_lookup):
    """GPT-2's blocks hold Conv1D only: the default filter would never visit them."""
    model = tiny_model("gpt2", layers=1)
    _run(model, whole_model)
    assert any(".attn.c_attn" in n for n in get_state(model).report.quantized)


def test_one_call_helper_takes_the_root_path(no_frame_lookup):
    model = tiny_model("llama", layers=1)
    report = awq_ao.quantize(model, token_batches(2), **OPTS)
    assert report.quantized and get_state(model).phase == "converted"
