"""Activation observers: per-channel mean |x|, shared between linears that read one tensor."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import awq_ao.observers.activation as act
from awq_ao.observers.activation import ChannelStatsObserver


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 700), k=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_mean_abs_matches_float64(rows, k, seed):
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed))
    obs = ChannelStatsObserver("l", k)
    obs(nn.Identity(), (x,))
    obs(nn.Identity(), (x * 2,))
    ref = torch.cat([x, x * 2]).double().abs().mean(0)
    torch.testing.assert_close(obs.mean_abs(), ref, rtol=1e-6, atol=1e-9)


def test_linears_reading_one_tensor_share_the_sums_and_in_place_changes_are_seen(monkeypatch):
    calls = []
    real = torch.linalg.vector_norm
    monkeypatch.setattr(torch.linalg, "vector_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(8, 16)
    q, k, v = (ChannelStatsObserver(n, 16) for n in "qkv")
    q(nn.Identity(), (x,))
    n_one = len(calls)
    k(nn.Identity(), (x,))
    assert len(calls) == n_one  # same tensor, same version: reused
    x.mul_(3)  # an in-place change between the calls must not reuse stale sums
    v(nn.Identity(), (x,))
    assert len(calls) == 2 * n_one
    torch.testing.assert_close(v.mean_abs(), x.double().abs().mean(0))
    torch.testing.assert_close(q.mean_abs(), k.mean_abs())
    y = x.clone()  # equal values, another tensor: computed afresh
    q(nn.Identity(), (y,))
    assert len(calls) == 3 * n_one
    assert act._last_sums is not None and act._last_sums[0]() is y
