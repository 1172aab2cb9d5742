"""Replaying recorded module calls whose arguments hold a (mutable) transformers cache."""

from __future__ import annotations

import warnings

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

import awq_ao
from awq_ao.passes.replay import is_call_state, replay_call, snapshot_call


class CachedAttention(nn.Module):
    """Attends over every key in its cache layer, after appending this call's keys."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.k = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cache: EncoderDecoderCache | None = None) -> torch.Tensor:
        k = self.k(x).unsqueeze(1)  # [b, 1 head, s, d]
        if cache is not None:
            k, _ = cache.self_attention_cache.update(k, k, 0)
        return (x.unsqueeze(1) @ k.transpose(-1, -2)).softmax(-1) @ k


def _cache() -> EncoderDecoderCache:
    return EncoderDecoderCache(DynamicCache(), DynamicCache())


def test_replay_sees_the_cache_as_the_real_call_did():
    torch.manual_seed(0)
    mod = CachedAttention()
    x = torch.randn(2, 5, 8)
    cache = _cache()
    args, kwargs = snapshot_call((x,), {"cache": cache})  # pre-hook: before the real call
    assert kwargs["cache"] is not cache and args[0] is x
    real = mod(x, cache=cache)
    assert cache.get_seq_length() == 5
    run = replay_call(mod, args, kwargs)
    for _ in range(3):  # every replay equals the real call; the real cache is left alone
        torch.testing.assert_close(run(), real, rtol=0, atol=0)
    assert cache.get_seq_length() == 5 and kwargs["cache"].get_seq_length() == 0
    # without the snapshot, a replay attends over the real call's keys twice
    assert not torch.equal(mod(x, cache=cache), real)


def test_calls_without_state_are_not_copied():
    x = torch.randn(2, 3)
    args, kwargs = (x, [x]), {"mask": x, "n": 3, "use_cache": False}
    a, kw = snapshot_call(args, kwargs)
    assert a is args and kw is kwargs
    assert not is_call_state(x) and is_call_state(_cache()) and is_call_state(DynamicCache())
    a, kw = snapshot_call((x,), {"past": (x, _cache())})  # nested: only the cache is copied
    assert kw["past"][0] is x and is_call_state(kw["past"][1])


def test_model_that_builds_a_cache_without_use_cache_quantizes():
    """XLM builds an EncoderDecoderCache even with use_cache=False: its attention modules are
    replayed during the search with the cache as a kwarg."""
    from devtools.arch_sweep import _batches, build_tiny

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_tiny("XLMWithLMHeadModel")
    vocab = model.config.vocab_size
    ids = _batches(vocab, 1, 100)[0]
    with torch.no_grad():
        ref = model(ids).logits
    calib = [{"input_ids": b, "use_cache": False} for b in _batches(vocab, 2, 0)]
    report = awq_ao.quantize(model, calib, group_size=32, n_grid=3, progress=False, verbose=False)
    assert len(report.quantized) >= 12 and report.kind_counts()
    with torch.no_grad():
        out = model(ids).logits
    assert torch.isfinite(out).all()
    assert float((out - ref).abs().max() / ref.abs().max()) < 0.1
