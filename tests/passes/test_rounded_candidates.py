"""Scale candidates scored after error-feedback rounding, against float64 references."""

from __future__ import annotations

from types import SimpleNamespace as NS

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from awq_ao.config import awq_config
from awq_ao.passes.rounded_candidates import (
    RoundedWeights,
    direct_rounded_search,
    rounded_gram_loss,
)
from awq_ao.passes.rounding import error_feedback_round
from awq_ao.passes.scale_grid import candidate_scales
from awq_ao.passes.search_loss import gram_output_mse


def _cfg(**kw):
    base = dict(bits=4, group_size=4, zero_point=True, gptq_damp=0.1, gptq_act_order=True, n_grid=5,
                duo_scaling=True)
    base.update(kw)
    return NS(**base)


def _data(seed: int, n: list[int], k: int, t: int):
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(m, k, generator=g, dtype=torch.float64) for m in n]
    x = torch.randn(t, k, generator=g, dtype=torch.float64) * torch.rand(k, generator=g, dtype=torch.float64).add(0.1) * 3
    s = torch.rand(k, generator=g, dtype=torch.float64).add(0.5)
    return ws, x, s


@settings(max_examples=25, deadline=None)
@given(n=st.lists(st.integers(1, 5), min_size=1, max_size=3), k=st.integers(2, 11), t=st.integers(4, 40),
       bits=st.sampled_from([3, 4]), scaled=st.booleans(), act_order=st.booleans(), seed=st.integers(0, 2**16))
def test_rounded_weights_are_the_error_feedback_rounding_at_that_scale(n, k, t, bits, scaled, act_order, seed):
    """RoundedWeights(s) == error_feedback_round(W s, grid of W s, Gram of x / s) / s, per consumer."""
    ws, x, s = _data(seed, n, k, t)
    s = s if scaled else None
    cfg = _cfg(bits=bits, gptq_act_order=act_order)
    gram = x.t() @ x / t
    got = RoundedWeights(ws, [False] * len(ws), gram, cfg)(s)
    from awq_ao.lowering.quant_math import quant_params

    w = torch.cat(ws)
    sf = torch.ones(k, dtype=torch.float64) if s is None else s
    scale, zero = quant_params((w * sf).float(), bits, cfg.group_size, True)
    xs = x / sf
    want = error_feedback_round((w * sf).float(), scale, zero, (xs.t() @ xs / t).float(), bits, cfg.group_size,
                                damp=0.1, act_order=act_order).double() / sf
    torch.testing.assert_close(torch.cat(got), want, rtol=1e-4, atol=1e-4)


def test_rounded_weights_keep_layout_and_cache_per_candidate():
    """Conv1D consumers get [K, N]; the same scale object is rounded once."""
    ws, x, s = _data(0, [3, 2], 8, 20)
    ws = [w.float() for w in ws]
    rw = RoundedWeights(ws, [False, True], (x.t() @ x / 20).float(), _cfg())
    a = rw(s.float())
    assert a[0].shape == (3, 8) and a[1].shape == (8, 2) and a[0].dtype == torch.float32
    sf = s.float()
    assert rw(sf) is rw(sf)


@settings(max_examples=25, deadline=None)
@given(n=st.lists(st.integers(1, 4), min_size=1, max_size=2), k=st.integers(2, 9), t=st.integers(4, 30),
       seed=st.integers(0, 2**16))
def test_rounded_gram_loss_is_the_output_mse_on_the_tokens(n, k, t, seed):
    """tr((Q - W) H (Q - W)^T) / N equals the mean squared output error over tokens and outputs."""
    ws, x, s = _data(seed, n, k, t)
    cfg = _cfg()
    gram = x.t() @ x / t
    q = torch.cat(RoundedWeights(ws, [False] * len(ws), gram.float(), cfg)(s.float())).double()
    want = float(((x @ (q - torch.cat(ws)).t()) ** 2).mean())
    got = rounded_gram_loss(ws, s.float(), gram.float(), cfg)
    assert got == pytest.approx(want, rel=2e-4, abs=1e-9)


def test_direct_search_scores_the_best_by_nearest_after_rounding():
    """keep = every candidate: the minimum of the rounded losses over the grid and no scaling;
    keep = 1: the round-to-nearest winner, or no scaling."""
    ws, x, _ = _data(3, [6, 5], 12, 64)
    ws = [w.float() for w in ws]
    gram = (x.t() @ x / 64).float()
    cfg = _cfg(group_size=4)
    x_mean = x.abs().mean(0).float()
    w_mean = torch.cat(ws).abs().mean(0)
    cands = [(i / cfg.n_grid, candidate_scales(x_mean, w_mean, i / cfg.n_grid, None)) for i in range(cfg.n_grid)]
    losses = [rounded_gram_loss(ws, s, gram, cfg) for _, s in cands]
    none = rounded_gram_loss(ws, None, gram, cfg)
    (loss, alpha, s), loss_none = direct_rounded_search(ws, gram, x_mean, w_mean, None, cfg, keep=cfg.n_grid)
    assert loss_none == none
    assert loss == min([none, *losses])
    if alpha is not None:
        assert alpha == cands[losses.index(loss)][0]
    nearest = [gram_output_mse(ws, s, gram, 4, 4, True) for _, s in cands]
    j = min(range(len(cands)), key=lambda i: (nearest[i], i))
    (loss1, alpha1, _), _ = direct_rounded_search(ws, gram, x_mean, w_mean, None, cfg, keep=1)
    assert (alpha1, loss1) in {(cands[j][0], losses[j]), (None, none)}
    assert loss1 == min(losses[j], none)


def test_search_rounding_gptq_needs_gptq_rounding():
    with pytest.raises(ValueError, match="search_rounding"):
        awq_config(search_rounding="gptq", rounding="nearest")
    assert awq_config(rounding="nearest").search_rounding == "auto"  # auto follows rounding


@pytest.mark.parametrize("mode, expect", [("auto", True), ("gptq", True), ("nearest", False)])
def test_the_search_rounds_candidates_as_configured(monkeypatch, mode, expect):
    """Defaults (rounding='gptq', search_rounding='auto') score module and Gram groups after
    error-feedback rounding; 'nearest' never does."""
    import warnings

    from tiny_models import tiny_model, token_batches

    import awq_ao
    import awq_ao.passes.rounded_candidates as rc
    import awq_ao.passes.search as search

    calls = {"module": 0, "gram": 0}
    orig_call, orig_loss = rc.RoundedWeights.__call__, rc.rounded_gram_losses

    def counted_call(self, s):
        calls["module"] += 1
        return orig_call(self, s)

    def counted_loss(*a, **kw):
        calls["gram"] += 1
        return orig_loss(*a, **kw)

    monkeypatch.setattr(rc.RoundedWeights, "__call__", counted_call)
    monkeypatch.setattr(rc, "rounded_gram_losses", counted_loss)
    assert search.direct_rounded_search.__module__ == rc.__name__
    model = tiny_model("llama", layers=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        awq_ao.quantize(model, token_batches(4, seq=32), group_size=32, progress=False, verbose=False,
                        search_rounding=mode)
    assert (calls["module"] > 0) is expect and (calls["gram"] > 0) is expect, calls


@settings(max_examples=15, deadline=None)
@given(n=st.lists(st.integers(1, 5), min_size=1, max_size=3), k=st.integers(2, 11), t=st.integers(4, 40),
       act_order=st.booleans(), seed=st.integers(0, 2**16))
def test_shared_factor_rounds_every_candidate_with_the_scaled_unscaled_factor(n, k, t, act_order, seed):
    """gptq_shared_factor: RoundedWeights(s) uses scaled_factor(factor of the unscaled Gram, s)."""
    from awq_ao.lowering.quant_math import quant_params
    from awq_ao.passes.rounding import inverse_factor, scaled_factor

    ws, x, s = _data(seed, n, k, t)
    cfg = _cfg(gptq_act_order=act_order, gptq_shared_factor=True)
    gram = (x.t() @ x / t).float()
    got = RoundedWeights(ws, [False] * len(ws), gram, cfg)(s)
    w = torch.cat(ws).float()
    sf = s.float()
    scale, zero = quant_params(w * sf, 4, cfg.group_size, True)
    xs = x / s
    factor = scaled_factor(inverse_factor(gram, 0.1, act_order), sf)
    want = error_feedback_round(w * sf, scale, zero, (xs.t() @ xs / t).float(), 4, cfg.group_size,
                                damp=0.1, act_order=act_order, factor=factor) / sf
    torch.testing.assert_close(torch.cat(got).float(), want, rtol=1e-5, atol=1e-5)


def test_shared_factor_factorizes_once_per_input(monkeypatch):
    """With gptq_shared_factor the search and convert factorize each linear input's Gram once,
    not once per candidate; the model is still fully quantized with error feedback."""
    import warnings

    from tiny_models import tiny_model, token_batches

    import awq_ao
    import awq_ao.passes.rounding as rounding

    counts = []
    orig = rounding.inverse_cholesky

    def counted(h, damp):
        counts[-1] += 1
        return orig(h, damp)

    monkeypatch.setattr(rounding, "inverse_cholesky", counted)
    reports = []
    for shared in (False, True):
        counts.append(0)
        model = tiny_model("llama", layers=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reports.append(awq_ao.quantize(model, token_batches(4, seq=32), group_size=32, progress=False,
                                           verbose=False, gptq_shared_factor=shared))
    per_candidate, shared = counts
    # 4 inputs per llama block (q/k/v, o, gate/up, down): 21 candidates each, plus convert
    assert per_candidate >= 4 * 21
    assert shared <= 2 * 4, counts  # one per input in the search, one per input in convert
    assert reports[1].error_feedback == len(reports[1].quantized) == len(reports[0].quantized)
