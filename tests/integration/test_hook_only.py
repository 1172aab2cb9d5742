"""A model torch.export cannot capture: clear error, or hook-only groups on request."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import awq_ao
from awq_ao import CaptureError


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        if h.abs().sum() > 0:  # data-dependent Python branch: torch.export cannot capture it
            h = self.fc2(torch.relu(self.fc1(h)))
        return x + h


class Net(nn.Module):
    def __init__(self, d: int = 64, n: int = 2) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(n))
        self.head = nn.Linear(d, 50)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def _model() -> Net:
    torch.manual_seed(0)
    m = Net().eval()
    with torch.no_grad():
        for b in m.blocks:
            b.norm.weight.uniform_(0.5, 2.0)
            b.norm.bias.normal_()
    return m


def _data():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 50, (2, 16), generator=g) for _ in range(3)]


def test_capture_failure_is_clear():
    model = _model()
    with pytest.raises(CaptureError, match="hook_only"):
        awq_ao.quantize(model, _data(), group_size=32, verbose=False, progress=False, skip=("head",))


def test_hook_only_groups():
    model = _model()
    x = _data()[0]
    with torch.no_grad():
        ref = model(x)
    rep = awq_ao.quantize(model, _data(), group_size=32, verbose=False, progress=False,
                          skip=("head",), on_capture_error="hook_only")
    counts = rep.kind_counts()
    # LayerNorm -> fc1 folds (checked numerically); fc1 -> ReLU -> fc2 needs the graph
    assert counts.get("norm") == 2 and counts.get("fallback") == 2, counts
    assert any("hook-only" in w for w in rep.warnings)
    assert len(rep.quantized) == 4
    with torch.no_grad():
        out = model(x)
    assert float((out - ref).abs().max() / ref.abs().max()) < 0.2
