"""Error-feedback (GPTQ) rounding on a fixed grid: properties and a float64 reference."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from awq_ao.lowering.quant_math import dequantize_codes, quant_params, quantize_codes
from awq_ao.passes.rounding import (
    error_feedback_codes,
    error_feedback_round,
    full_gram,
    group_blocks,
    inverse_cholesky,
    inverse_factor,
    lower_triangular_inverse,
    scale_full_gram,
    scaled_factor,
)
from awq_ao.passes.search import group_gram, scale_gram


def reference_round(w, scale, zero, h, bits, g, damp, act_order=False):
    """Textbook GPTQ, one column at a time, float64, no blocking or row chunks."""
    n, k = w.shape
    if act_order:
        perm = torch.argsort(h.diagonal(), descending=True, stable=True)
        group = torch.arange(k) // g
        # permute columns; each keeps its own group's grid
        wp, hp = w[:, perm], h[perm][:, perm]
        sp, zp = scale[:, group[perm]], zero[:, group[perm]]
        out = torch.empty_like(w, dtype=torch.float64)
        out[:, perm] = reference_round(wp, sp, zp, hp, bits, 1, damp)
        return out
    hh = h.double().clone()
    hh += damp * hh.diagonal().mean() * torch.eye(k, dtype=torch.float64)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hh)), upper=True)
    wr = w.double().clone()
    out = torch.empty_like(wr)
    for c in range(k):
        s, z = scale[:, c // g].double(), zero[:, c // g].double()
        q = (torch.round(wr[:, c] / s) + z).clamp(0, 2**bits - 1)
        out[:, c] = (q - z) * s
        e = (wr[:, c] - out[:, c]) / u[c, c]
        wr[:, c:] -= e[:, None] * u[c, c:][None, :]
    return out


def correlated(t, k, gen, mix_seed=None):
    """Tokens with correlated channels (the same correlation for the same ``mix_seed``)."""
    mg = gen if mix_seed is None else torch.Generator().manual_seed(mix_seed)
    mix = torch.randn(k, k, generator=mg, dtype=torch.float64) / math.sqrt(k)
    return torch.randn(t, k, generator=gen, dtype=torch.float64) @ (torch.eye(k, dtype=torch.float64) + mix)


cases = st.tuples(
    st.integers(1, 20),  # out features
    st.sampled_from([8, 24, 40, 64]),  # in features (ragged for g=16)
    st.sampled_from([8, 16, -1]),  # group size
    st.sampled_from([3, 4]),
    st.booleans(),  # zero point
    st.sampled_from([1, 5, 16, 128]),  # column block
    st.integers(1, 7),  # rows per chunk
    st.booleans(),  # act order
    st.integers(0, 2**16),
)


@settings(max_examples=30, deadline=None)
@given(cases)
def test_matches_float64_reference_and_stays_on_the_grid(case):
    n, k, gs, bits, zp, block, rows, act_order, seed = case
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen, dtype=torch.float64)
    x = correlated(4 * k, k, gen)
    h = full_gram(x)
    g = k if gs == -1 else gs
    scale, zero = quant_params(w, bits, gs, zp)
    q = error_feedback_round(w, scale, zero, h, bits, gs, damp=0.01, block=block, rows_per_chunk=rows,
                             act_order=act_order)
    ref = reference_round(w, scale.double(), zero.double(), h, bits, g, 0.01, act_order)
    torch.testing.assert_close(q, ref, rtol=0, atol=1e-9)
    # every value is a grid point: quantizing again with the same grid reproduces it
    codes = quantize_codes(q, scale, zero, bits, gs)
    torch.testing.assert_close(dequantize_codes(codes, scale, zero, gs, torch.float64), q, rtol=0, atol=1e-9)


def test_uncorrelated_inputs_give_round_to_nearest():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(16, 48, generator=gen)
    h = torch.diag(torch.rand(48, generator=gen) + 0.5)  # a diagonal Gram: nothing to compensate
    scale, zero = quant_params(w, 4, 16)
    q = error_feedback_round(w, scale, zero, h, 4, 16)
    rtn = dequantize_codes(quantize_codes(w, scale, zero, 4, 16), scale, zero, 16)
    torch.testing.assert_close(q, rtn, rtol=0, atol=0)


def test_lowers_the_output_error_on_correlated_inputs():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(64, 96, generator=gen)
    x = correlated(2000, 96, gen, mix_seed=7).float()
    xt = correlated(2000, 96, torch.Generator().manual_seed(2), mix_seed=7).float()  # held-out tokens
    scale, zero = quant_params(w, 4, 32)
    q = error_feedback_round(w, scale, zero, full_gram(x), 4, 32)
    rtn = dequantize_codes(quantize_codes(w, scale, zero, 4, 32), scale, zero, 32)
    for data in (x, xt):
        e_q = (data @ (q - w).t()).pow(2).mean()
        e_rtn = (data @ (rtn - w).t()).pow(2).mean()
        assert e_q < 0.9 * e_rtn


@settings(max_examples=20, deadline=None)
@given(k=st.integers(2, 70), gs=st.sampled_from([4, 16, -1]), t=st.integers(1, 50), seed=st.integers(0, 999))
def test_gram_helpers_agree(k, gs, t, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=gen)
    s = torch.rand(k, generator=gen) + 0.5
    h = full_gram(x)
    torch.testing.assert_close(group_blocks(h, gs), group_gram(x, gs), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scale_full_gram(h, s), full_gram(x / s), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(group_blocks(scale_full_gram(h, s), gs), scale_gram(group_gram(x, gs), s),
                               rtol=1e-4, atol=1e-5)


def test_dead_channels_and_singular_grams():
    x = torch.randn(30, 12)
    x[:, 3] = 0  # a channel that never fires
    x[:, 5] = x[:, 4]  # collinear channels: singular without damping
    u = inverse_cholesky(full_gram(x), 0.01)
    assert torch.isfinite(u).all() and bool((u.diagonal() > 0).all())
    w = torch.randn(4, 12)
    scale, zero = quant_params(w, 4, 4)
    assert torch.isfinite(error_feedback_round(w, scale, zero, full_gram(x), 4, 4)).all()


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 300), st.sampled_from([1, 4, 33, 128]), st.integers(0, 2**16))
def test_lower_triangular_inverse_against_float64(k, leaf, seed):
    gen = torch.Generator().manual_seed(seed)
    lower = torch.randn(k, k, generator=gen, dtype=torch.float64).tril() / k**0.5
    lower.diagonal().copy_(torch.rand(k, generator=gen, dtype=torch.float64) + 0.5)
    inv = lower_triangular_inverse(lower, leaf)
    assert torch.equal(inv, inv.tril())
    torch.testing.assert_close(inv @ lower, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-9)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 200), st.sampled_from([0.01, 0.1]), st.integers(0, 2**16))
def test_inverse_cholesky_is_the_upper_factor_of_the_damped_inverse(k, damp, seed):
    """U upper triangular with a positive diagonal and U^T U = (H + damp * mean(diag H) I)^-1."""
    gen = torch.Generator().manual_seed(seed)
    h = full_gram(correlated(2 * k + 1, k, gen).double())
    u = inverse_cholesky(h, damp)
    assert torch.equal(u, u.triu()) and bool((u.diagonal() > 0).all())
    damped = h + damp * h.diagonal().mean() * torch.eye(k, dtype=torch.float64)
    torch.testing.assert_close(u.t() @ u @ damped, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-7)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 40), st.sampled_from([0.01, 0.1]), st.booleans(), st.integers(0, 2**16))
def test_scaled_factor_is_the_factor_of_the_scaled_gram_damped_on_the_unscaled_inputs(k, damp, act_order, seed):
    """scaled_factor(inverse_factor(H), s) == (perm, U_s) with U_s^T U_s = (P D (H + lam I) D P^T)^-1,
    D = diag(1 / s), lam = damp * mean(diag H), P ordering by diag(H) (float64 reference)."""
    gen = torch.Generator().manual_seed(seed)
    h = full_gram(correlated(2 * k + 1, k, gen).double())
    s = torch.rand(k, generator=gen, dtype=torch.float64) * 3 + 0.2
    perm, u = scaled_factor(inverse_factor(h, damp, act_order), s)
    order = torch.argsort(h.diagonal(), descending=True, stable=True) if act_order else torch.arange(k)
    assert (perm is None) is not act_order and (perm is None or torch.equal(perm, order))
    d = torch.diag(1.0 / s)
    a = d @ (h + damp * h.diagonal().mean() * torch.eye(k, dtype=torch.float64)) @ d
    a = a[order][:, order]
    want = torch.linalg.cholesky(torch.linalg.inv(a), upper=True)
    assert torch.equal(u, u.triu())
    torch.testing.assert_close(u, want, rtol=1e-6, atol=1e-9)
    assert scaled_factor((perm, u), None)[1] is u  # no scale: the same factor


def test_given_factors_replace_the_computed_ones():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(6, 16, generator=gen)
    h = full_gram(correlated(40, 16, gen))
    sc, zr = quant_params(w, 4, 8, True)
    for act_order in (False, True):
        own = error_feedback_codes(w, sc, zr, h, 4, 8, 0.1, act_order=act_order)
        given = error_feedback_codes(w, sc, zr, h, 4, 8, 0.1, act_order=act_order,
                                     factor=inverse_factor(h, 0.1, act_order))
        assert torch.equal(own, given)
    with pytest.raises(ValueError, match="factor"):
        error_feedback_codes(w, sc, zr, h, 4, 8, factor=(None, torch.eye(5)))


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="does not fit weight"):
        error_feedback_round(torch.randn(4, 8), torch.ones(4, 1), torch.zeros(4, 1), torch.eye(6), 4, 8)


def test_end_to_end_option_lowers_error_and_keeps_format():
    from tiny_models import compare_two_converts

    ra, rb, ea, eb = compare_two_converts("llama", 2, {"rounding": "nearest"}, {})  # gptq is the default
    assert ra.error_feedback == 0
    assert rb.error_feedback == len(rb.quantized) == len(ra.quantized)
    assert "error-feedback rounded" in rb.summary()
    assert eb < ea


def test_bad_rounding_option():
    from awq_ao import awq_config

    with pytest.raises(ValueError, match="rounding"):
        awq_config(rounding="stochastic")
    with pytest.raises(ValueError, match="gptq_damp"):
        awq_config(rounding="gptq", gptq_damp=0.0)


def test_linears_reading_one_input_share_one_gram(monkeypatch):
    from tiny_models import tiny_model, token_batches

    import awq_ao
    import awq_ao.passes.search as search

    calls = []
    real = search.full_gram
    monkeypatch.setattr(search, "full_gram", lambda x, *a: calls.append(x.shape) or real(x, *a))
    awq_ao.quantize(tiny_model("llama", layers=1), token_batches(2), group_size=32, rounding="gptq",
                    verbose=False, progress=False)
    assert len(calls) == 4  # q/k/v, o, gate/up, down


def test_whole_model_gptq_checks_its_gram_budget():
    from tiny_models import tiny_model, token_batches

    import awq_ao

    model = tiny_model("llama", layers=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MemoryError, match="sequential=True"):
        awq_ao.quantize(model, token_batches(2), group_size=32, sequential=False, max_gram_gib=1e-6,
                        verbose=False, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    rep = awq_ao.quantize(model, token_batches(2), group_size=32, sequential=False, verbose=False, progress=False)
    assert rep.error_feedback == len(rep.quantized) and rep.mode.startswith("whole model")


def test_linears_sharing_an_input_round_together_as_they_would_alone():
    """q/k/v (and gate/up) are rounded in one call on stacked rows: the same codes as one call each."""
    from awq_ao.config import awq_config
    from awq_ao.passes.apply import round_weights

    g = torch.Generator().manual_seed(3)
    k = 96
    x = torch.randn(400, k, generator=g) * (torch.rand(k, generator=g) + 0.2)
    h = x.t() @ x / x.shape[0]
    ws = [torch.randn(n, k, generator=g) for n in (48, 16, 16)]
    params = [quant_params(w, 4, 32, True) for w in ws]
    cfg = awq_config(group_size=32)
    together = round_weights(ws, params, h, cfg)
    alone = [error_feedback_codes(w, s, z, h, 4, 32, cfg.gptq_damp, act_order=cfg.gptq_act_order) for w, (s, z) in zip(ws, params, strict=True)]
    for (a, grid), b, p in zip(together, alone, params, strict=True):
        assert torch.equal(a, b)
        assert grid is p  # without gptq_refit_rounds the grids are returned as given


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 5])
def test_inputs_are_left_unchanged(n, dtype):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, 16, generator=gen, dtype=dtype)
    x = correlated(64, 16, gen).to(dtype)
    h = full_gram(x)
    scale, zero = quant_params(w, 4, 8)
    before = [t.clone() for t in (w, scale, zero, h)]
    error_feedback_codes(w, scale, zero, h, 4, 8, block=4)
    for t, b in zip((w, scale, zero, h), before, strict=True):
        assert torch.equal(t, b)
