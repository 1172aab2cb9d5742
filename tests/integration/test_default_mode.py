"""sequential="auto" (the default): layer by layer where one block stack holds every target."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model, token_batches
from torch import nn

import awq_ao


def test_decoder_defaults_to_layer_by_layer_with_gptq():
    model = tiny_model("llama", layers=2)
    rep = awq_ao.quantize(model, token_batches(2), group_size=32, verbose=False, progress=False)
    assert rep.mode == "layer by layer (2 blocks of model.layers)"
    assert rep.error_feedback == len(rep.quantized) == 14
    assert "layer by layer" in rep.summary()
    # the time breakdown names every phase of a layer-by-layer run, the calibration loop too
    phases = {"capture+groups", "search", "block outputs", "fold+clip+quantize", "total",
              "calibration loop (before convert)"}
    assert phases <= set(rep.times), rep.times
    assert all(v >= 0 for v in rep.times.values())
    assert rep.times["total"] >= rep.times["search"] + rep.times["block outputs"]


def test_auto_and_forced_layer_by_layer_agree():
    a, b = tiny_model("llama", layers=2), tiny_model("llama", layers=2)
    b.load_state_dict(a.state_dict())
    awq_ao.quantize(a, token_batches(2), group_size=32, verbose=False, progress=False)
    awq_ao.quantize(b, token_batches(2), group_size=32, sequential=True, verbose=False, progress=False)
    x = token_batches(1, seed=5)[0]
    with torch.no_grad():
        assert torch.equal(a(x).logits, b(x).logits)


class _NoStack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(64)
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(self.norm(x))))


def test_model_without_a_block_stack_runs_whole_and_says_so():
    model = _NoStack().eval()
    rep = awq_ao.quantize(model, [torch.randn(4, 64) for _ in range(2)], group_size=32,
                          verbose=False, progress=False)
    assert rep.mode.startswith("whole model at once (no stack of repeated blocks")
    assert len(rep.quantized) == 2 and rep.kind_counts() == {"norm": 1, "linear": 1}
    assert rep.fallback_multiplies == 0 and rep.error_feedback == 2


def test_forced_layer_by_layer_without_a_stack_is_an_error():
    with pytest.raises(ValueError, match="sequential=False"):
        awq_ao.quantize(_NoStack().eval(), [torch.randn(4, 64)], group_size=32, sequential=True,
                        verbose=False, progress=False)


def test_bad_sequential_value():
    with pytest.raises(ValueError, match="'auto'"):
        awq_ao.awq_config(sequential="sometimes")


def test_block_that_cannot_be_captured_alone_falls_back_to_the_whole_model():
    """BLOOM's alibi bias is built for the whole batch: its block cannot be exported alone."""
    import warnings

    from devtools.arch_sweep import _batches, build_tiny

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_tiny("BloomForCausalLM")
    vocab = model.config.vocab_size
    calib = [{"input_ids": b, "use_cache": False} for b in _batches(vocab, 2, 0)]
    rep = awq_ao.quantize(model, calib, group_size=32, n_grid=3, progress=False, verbose=False)
    assert rep.mode.startswith("whole model at once (a block could not be captured on its own")
    assert rep.error_feedback == len(rep.quantized) == 8 and rep.kind_counts() == {"norm": 4, "linear": 2, "fallback": 2}
    with pytest.raises(Exception, match="could not capture"):
        awq_ao.quantize(build_tiny("BloomForCausalLM"), calib, group_size=32, n_grid=3, sequential=True,
                        progress=False, verbose=False)
