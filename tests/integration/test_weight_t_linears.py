"""Linears written as ``x @ W.T`` (FalconLinear) are found in the graph and quantized; a
linear subclass whose own forward is not F.linear stays in full precision, with a warning."""

from __future__ import annotations

import warnings

import torch
from torch import nn

import awq_ao
from awq_ao.checkpoint import load_quantized, save_quantized
from awq_ao.lowering import Int4WeightTensor
from devtools.arch_sweep import _batches, build_tiny


def _quantize(model: nn.Module, vocab: int = 256) -> awq_ao.ConvertReport:
    calib = [{"input_ids": b, "use_cache": False} for b in _batches(vocab, 2, 0)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return awq_ao.quantize(model, calib, group_size=32, n_grid=5, progress=False, verbose=False)


def test_falcon_linears_are_quantized_and_scaled(tmp_path):
    model = build_tiny("FalconForCausalLM")
    vocab = int(model.config.vocab_size)
    ids = _batches(vocab, 1, 5)[0]
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    targets = [n for n, m in model.named_modules() if type(m).__name__ == "FalconLinear"]
    assert len(targets) == 8
    report = _quantize(model, vocab)
    assert sorted(report.quantized) == sorted(targets)
    assert not [w for w in report.warnings if "full precision" in w]
    assert report.kind_counts().get("norm", 0) >= 2  # the layer norms fold into q/k/v and h_to_4h
    for name in targets:
        mod = model.get_submodule(name)
        assert type(mod) is nn.Linear and isinstance(mod.weight, Int4WeightTensor), name
    with torch.no_grad():
        out = model(ids, use_cache=False).logits
    assert torch.isfinite(out).all() and float((out - ref).abs().max() / ref.abs().max()) < 0.3
    got = load_quantized(save_quantized(model, tmp_path / "falcon"))
    with torch.no_grad():
        assert torch.equal(got(ids, use_cache=False).logits, out)


class _DoubledLinear(nn.Linear):
    """Not F.linear: must not be swapped for a plain nn.Linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * (x @ self.weight.T)


def test_custom_forward_that_is_not_linear_is_kept():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), _DoubledLinear(64, 64, bias=False)).eval()
    calib = [torch.randn(4, 64) for _ in range(2)]
    with torch.no_grad():
        ref = model(calib[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = awq_ao.quantize(model, calib, group_size=32, n_grid=3, progress=False, verbose=False)
    assert isinstance(model[2], _DoubledLinear) and not isinstance(model[2].weight, Int4WeightTensor)
    assert any("2: its own forward is not F.linear and cannot run an INT4 weight; kept in full precision" in w for w in report.warnings)
    assert isinstance(model[0].weight, Int4WeightTensor)
    with torch.no_grad():
        assert float((model(calib[0]) - ref).abs().max() / ref.abs().max()) < 0.2
