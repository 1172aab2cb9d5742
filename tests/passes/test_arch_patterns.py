"""Graph patterns found by the architecture sweep: each fold must stay exact (float64).

Each tiny module below reproduces one way real transformers architectures write a block;
the test exports it, finds the scale groups, folds random scales into every foldable group
and checks the output is unchanged (as tests/passes/test_fold.py does for whole models).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from awq_ao.observers.activation import RecordedCall
from awq_ao.observers.attach import is_quantizable
from awq_ao.passes.capture import capture
from awq_ao.passes.fold import Transaction, fold_group
from awq_ao.passes.groups import find_groups

H = 32


class TorchRMSNorm(nn.Module):
    """``torch.nn.RMSNorm`` (the ``aten.rms_norm`` op) before q/k/v-like linears."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(H)
        self.q = nn.Linear(H, H)
        self.k = nn.Linear(H, H, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return self.q(h) * self.k(h).sigmoid()


class PerHeadGatedNorm(nn.Module):
    """A per-head RMSNorm whose [head_dim] weight is shared by all heads, times a gate
    (linear-attention output norms): X channel h*d+j folds into weight[j]."""

    def __init__(self, heads: int = 4) -> None:
        super().__init__()
        self.heads, self.hd = heads, H // heads
        self.v = nn.Linear(H, H)
        self.g = nn.Linear(H, H)
        self.weight = nn.Parameter(torch.ones(self.hd))
        self.out = nn.Linear(H, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        v = self.v(x).view(b, t, self.heads, self.hd)
        g = self.g(x).view(b, t, self.heads, self.hd)
        v32 = v.float()
        n = v32 * torch.rsqrt(v32.pow(2).mean(-1, keepdim=True) + 1e-6)
        n = self.weight * n.to(v.dtype)
        y = (n * F.silu(g)).reshape(b, t, H)
        return self.out(y)


class ScaledBranches(nn.Module):
    """One norm feeding two branches through constant multipliers (muP-style)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(H)
        self.a = nn.Linear(H, H)
        self.b = nn.Linear(H, 2 * H)
        self.c = nn.Linear(H, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return self.a(h * 0.5) + self.b(h / 3.0)[..., :H] + self.c(2.0 * h)


class MetadataReaders(nn.Module):
    """The norm output is also read for its shape/dtype only (new_zeros, zeros_like, view_as)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(H)
        self.a = nn.Linear(H, H)
        self.b = nn.Linear(H, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        acc = h.new_zeros(h.shape) + torch.zeros_like(h)
        y = self.a(h) + acc
        z = self.b(h).view(-1, H).view_as(h)
        return y + z


class ValueDividedByConstant(nn.Module):
    """Attention written out, value scaled by a constant, then a transpose + contiguous +
    view before the output projection (CodeGen/GPT-J style)."""

    def __init__(self, heads: int = 4) -> None:
        super().__init__()
        self.heads, self.hd = heads, H // heads
        self.qkv = nn.Linear(H, 3 * H)
        self.o = nn.Linear(H, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).split(H, dim=-1)
        q, k, v = (z.view(b, t, self.heads, self.hd).transpose(1, 2) for z in (q, k, v))
        p = torch.softmax(q @ k.transpose(-1, -2) / self.hd**0.5, dim=-1)
        y = torch.matmul(p, v / 2.0).permute(0, 2, 1, 3).contiguous().view(b, t, H)
        return self.o(y)


class NormAlsoSummed(nn.Module):
    """Negative case: the norm output is also reduced (a value use): no fold is legal."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(H)
        self.a = nn.Linear(H, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return self.a(h) + h.sum(-1, keepdim=True)


def _randomise(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


def fold_check(model: nn.Module, seed: int = 0) -> tuple[list, float]:
    """Fold random scales into every foldable group; return (groups, relative error)."""
    torch.manual_seed(seed)
    model = model.double().eval()
    _randomise(model, seed)
    x = torch.randn(2, 5, H, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = model(x)
    ep = capture(model, RecordedCall((x,), {}, 2))
    targets = [n for n, m in model.named_modules() if n and is_quantizable(m)]
    groups = find_groups(ep, model, targets).groups
    g = torch.Generator().manual_seed(seed + 1)
    txn = Transaction()
    for grp in groups:
        if grp.foldable:
            s = torch.rand(grp.producer.out_channels, generator=g, dtype=torch.float64) * 3.75 + 0.25
            fold_group(model, grp, s[grp.channel_map], txn)
    with torch.no_grad():
        out = model(x)
    return groups, float((out - ref).abs().max() / ref.abs().max())


def _kinds(groups: list) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for grp in groups:
        out.setdefault(grp.kind, []).extend(grp.consumers)
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_torch_rms_norm_folds(seed):
    groups, err = fold_check(TorchRMSNorm(), seed)
    assert _kinds(groups) == {"norm": ["q", "k"]}
    assert err < 1e-12


@pytest.mark.parametrize("seed", [0, 1])
def test_per_head_gated_norm_folds_with_tied_scales(seed):
    groups, err = fold_check(PerHeadGatedNorm(), seed)
    out = next(g for g in groups if g.consumers == ["out"])
    assert out.foldable and out.producer.kind == "norm" and out.producer.out_channels == 8
    assert torch.equal(out.channel_map, torch.arange(H) % 8)
    assert out.tie_groups() is not None
    assert err < 1e-6  # the norm computes in float32 inside, as real models do


@pytest.mark.parametrize("seed", [0, 1])
def test_constant_multipliers_join_one_group(seed):
    groups, err = fold_check(ScaledBranches(), seed)
    norm = [g for g in groups if g.foldable and g.producer.kind == "norm"]
    assert len(norm) == 1 and sorted(norm[0].consumers) == ["a", "b", "c"]
    assert err < 1e-12


def test_metadata_only_readers_do_not_block_folding():
    groups, err = fold_check(MetadataReaders())
    assert _kinds(groups) == {"norm": ["a", "b"]}
    assert err < 1e-12


def test_value_divided_by_constant_then_view_folds():
    groups, err = fold_check(ValueDividedByConstant())
    o = next(g for g in groups if g.consumers == ["o"])
    assert o.foldable and o.producer.module == "qkv", o.reason
    # o's input channel c reads v channel c, which is qkv output channel 2H + c
    assert torch.equal(o.channel_map, torch.arange(H) + 2 * H)
    assert err < 1e-12


def test_value_use_of_norm_output_blocks_folding():
    groups, err = fold_check(NormAlsoSummed())
    assert [g.kind for g in groups] == ["fallback"]
    assert "sum" in groups[0].reason
    assert err == 0.0


class LayerNormOnePlusWeight(nn.Module):
    """``F.layer_norm(x, shape, 1 + weight, bias)`` (zero-centred LayerNorm weights, as in
    Nemotron's LayerNorm1P), written with ``torch.multiply`` on the consumer side."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(H))
        self.bias = nn.Parameter(torch.zeros(H))
        self.a = nn.Linear(H, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.layer_norm(x, (H,), 1 + self.weight, self.bias, 1e-5)
        return torch.multiply(self.a(h), 2.0)


def test_layer_norm_one_plus_weight_folds():
    groups, err = fold_check(LayerNormOnePlusWeight())
    assert _kinds(groups) == {"norm": ["a"]}
    pf = groups[0].producer.params
    assert [(p.name, p.affine) for p in pf] == [("weight", [("add", 1.0)]), ("bias", [])]
    assert err < 1e-12
