"""The kept sample's two uses: candidates scored on the search chunk, Grams over every kept row."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import block_call, tiny_model, token_batches

import awq_ao
from awq_ao.config import AWQConfig, awq_config
from awq_ao.observers.activation import RecordedCall
from awq_ao.passes.clipping import group_gram
from awq_ao.passes.pipeline import analyze, search
from awq_ao.passes.rounding import full_gram
from awq_ao.passes.sample_chunks import (
    accumulate_grams,
    gram_tokens,
    row_chunks,
    rows_of,
    splits_rows,
)
from awq_ao.passes.sequential import _block_output
from awq_ao.report import ConvertReport


class _Shared(torch.nn.Module):
    """Two linears reading one input (q/k style) and a third reading another."""

    def __init__(self, k: int = 8) -> None:
        super().__init__()
        self.a = torch.nn.Linear(k, 4)
        self.b = torch.nn.Linear(k, 4)
        self.c = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.c(self.a(x) * mask) + self.b(x).sum(-1, keepdim=True)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(2, 9), first=st.integers(1, 9), seq=st.integers(1, 5), group=st.sampled_from([4, 8]),
       full=st.booleans(), seed=st.integers(0, 2**16))
def test_accumulated_grams_equal_the_gram_of_every_row(rows, first, seq, group, full, seed):
    """The combined Gram equals X^T X / T over all rows (float64 reference); shared stays shared."""
    first = min(first, rows)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = _Shared().double()
    x = torch.randn(rows, seq, 8, generator=g, dtype=torch.float64)
    mask = torch.rand(rows, seq, 4, generator=g, dtype=torch.float64)
    hidden = model.a(x) * mask

    def gram(t):
        return full_gram(t) if full else group_gram(t, group).double()

    shared = gram(x[:first])
    grams = {"a": shared, "b": shared, "c": gram(hidden[:first])}
    tokens = {n: first * seq for n in grams}
    cfg = awq_config(group_size=group)
    out = accumulate_grams(model, grams, tokens, (x,), {"mask": mask}, rows, first, cfg)
    assert out["a"] is out["b"]
    xr = x.reshape(-1, 8)
    hr = hidden.detach().reshape(-1, 4)
    ref_x = xr.t() @ xr / xr.shape[0]
    ref_h = hr.t() @ hr / hr.shape[0]
    if full:
        torch.testing.assert_close(out["a"], ref_x, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(out["c"], ref_h, rtol=1e-10, atol=1e-12)
    else:
        torch.testing.assert_close(out["a"], group_gram(xr, group).double(), rtol=1e-5, atol=1e-6)
    if first == rows:
        assert out["a"] is shared  # nothing beyond the search chunk: untouched


def test_rows_of_cuts_batch_tensors_and_copies_caches():
    from transformers import DynamicCache

    cache = DynamicCache()
    a = (torch.arange(12).view(6, 2),)
    kw = {"pos": torch.arange(2).view(1, 2), "cache": cache, "flag": True}
    ca, ckw = rows_of(a, kw, 6, 2, 5)
    assert torch.equal(ca[0], a[0][2:5])
    assert ckw["pos"] is kw["pos"] and ckw["flag"] is True
    assert ckw["cache"] is not cache  # a chunk's forward never mutates the recorded cache
    assert rows_of(a, kw, 6, 0, 6) == (a, kw)
    assert row_chunks(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert splits_rows(a, kw, 6) and not splits_rows((torch.zeros(5, 2),), {}, 6)
    assert gram_tokens(torch.zeros(3, 5, 7), None) == 15 and gram_tokens(torch.zeros(3, 5, 7), 4) == 4


def test_search_scores_the_first_chunk_and_builds_grams_on_every_row():
    block, a, kw = block_call(rows=8)
    targets = [n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
    cfg = awq_config(max_search_samples=2, group_size=32)
    analysis = analyze(block, RecordedCall(a, kw, 8), targets, cfg, ConvertReport(4, 32, True))
    res8, grams8 = search(block, analysis, a, kw, {}, cfg, ConvertReport(4, 32, True), rows=8)
    a2, kw2 = rows_of(a, kw, 8, 0, 2)
    res2, grams2 = search(block, analysis, a2, kw2, {}, cfg, ConvertReport(4, 32, True), rows=2)
    for gi, r in res2.items():  # the candidates saw the same 2 rows
        assert r.alpha == res8[gi].alpha and r.loss_best == res8[gi].loss_best
    seen = {}
    hooks = [block.get_submodule(n).register_forward_pre_hook(
        lambda m, args, n=n: seen.setdefault(n, args[0].detach().clone())) for n in targets]
    with torch.no_grad():
        block(*a, **kw)
    for h in hooks:
        h.remove()
    assert set(grams8) == set(targets)
    for n in targets:
        torch.testing.assert_close(grams8[n], full_gram(seen[n]), rtol=2e-5, atol=1e-6)
        assert not torch.allclose(grams2[n], grams8[n])
    assert grams8["self_attn.q_proj"] is grams8["self_attn.k_proj"]  # still one Gram for q/k/v


def test_block_output_in_chunks_equals_one_pass():
    block, a, kw = block_call(rows=6)
    with torch.no_grad():
        whole = block(*a, **kw)
    whole = whole[0] if isinstance(whole, tuple) else whole
    torch.testing.assert_close(_block_output(block, a, kw, 6, 4), whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_block_output(block, a, kw, 6, 6), whole, rtol=0, atol=0)


@pytest.mark.parametrize("sequential", [True, False])
def test_more_gram_rows_change_codes_and_fewer_reproduce_the_search_only_sample(sequential):
    """max_gram_samples == max_search_samples is the old behaviour (one sample for both);
    more kept rows give different (better-informed) Grams, and the report names both sizes."""
    model = tiny_model("llama", layers=2)
    data = token_batches(4, 4, 16)  # 16 rows
    test = token_batches(1, 2, 16, seed=5)[0]
    outs = {}
    for gram_rows in (4, 16):
        m = copy.deepcopy(model)
        rep = awq_ao.quantize(m, data, group_size=32, verbose=False, progress=False, sequential=sequential,
                              max_search_samples=4, max_gram_samples=gram_rows)
        with torch.no_grad():
            outs[gram_rows] = m(test).logits
        assert rep.quantized
    assert not torch.equal(outs[4], outs[16])


def test_recorder_keeps_enough_rows_for_both_uses():
    model = tiny_model("llama", layers=1)
    from awq_ao.observers.attach import prepare

    state = prepare(model, awq_config(max_search_samples=4, max_gram_samples=6))
    with torch.no_grad():
        for b in token_batches(5, 4, 8):
            model(b)
    assert state.recorder.rows == 8  # whole batches, until at least 6 rows
    state.remove_hooks()
    state = prepare(model, awq_config(max_search_samples=10, max_gram_samples=2))
    with torch.no_grad():
        for b in token_batches(5, 4, 8):
            model(b)
    assert state.recorder.rows == 12
    state.remove_hooks()


def test_option_is_flat_grouped_and_validated():
    cfg = awq_config(max_gram_samples=8)
    assert cfg.search_options.max_gram_samples == 8 and AWQConfig().max_gram_samples == 64
    with pytest.raises(ValueError, match="max_gram_samples"):
        awq_config(max_gram_samples=0)


def test_calibration_skips_the_logits_and_quantizes_identically():
    """awq_ao.quantize calibrates with logits_to_keep=1 (no [rows, seq, vocab] logits);
    the codes are those of a calibration that computes every logit."""
    from awq_ao.api import calibration_kwargs

    model = tiny_model("llama", layers=2)
    data = token_batches(4, 4, 16)
    seen = []
    a = copy.deepcopy(model)
    h = a.register_forward_pre_hook(lambda m, args, kw: seen.append(kw.get("logits_to_keep")), with_kwargs=True)
    awq_ao.quantize(a, data, group_size=32, verbose=False, progress=False)
    h.remove()
    assert seen[:4] == [1, 1, 1, 1]
    b = copy.deepcopy(model)
    awq_ao.quantize(b, [{"input_ids": t, "logits_to_keep": 0} for t in data], group_size=32, verbose=False,
                    progress=False)
    assert calibration_kwargs(model) == {"logits_to_keep": 1}
    assert calibration_kwargs(torch.nn.Linear(2, 2)) == {}
    test = token_batches(1, 2, 16, seed=5)[0]
    with torch.no_grad():
        assert torch.equal(a(test).logits, b(test).logits)
