"""Weight-clipping search: bounds, monotone improvement over RTN, asymmetric refinement."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from awq_ao.lowering.quant_math import fake_quantize
from awq_ao.passes.search import apply_clip, clip_ratios


def group_errors(w: torch.Tensor, wq: torch.Tensor, x: torch.Tensor, g: int) -> torch.Tensor:
    """Squared error of every (row, group) partial output, in float64 (reference loop)."""
    n, k = w.shape
    groups = math.ceil(k / g)
    err = torch.zeros(n, groups, dtype=torch.float64)
    for j in range(groups):
        sl = slice(j * g, min(k, (j + 1) * g))
        d = x[:, sl].double() @ (wq[:, sl].double() - w[:, sl].double()).t()  # [T, n]
        err[:, j] = d.pow(2).mean(dim=0)
    return err


shapes = st.tuples(
    st.integers(1, 24),  # out features
    st.sampled_from([16, 24, 40, 64]),  # in features (24/40 ragged for g=16)
    st.sampled_from([8, 16, -1]),  # group size
    st.integers(4, 40),  # tokens
    st.sampled_from([3, 4]),  # bits
    st.booleans(),  # zero point
    st.integers(0, 2**16),  # seed
)


@settings(max_examples=25, deadline=None)
@given(shapes)
def test_clipping_never_worse_than_rtn_and_asymmetric_refines_range(case):
    n, k, gs, t, bits, zp, seed = case
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * torch.rand(1, k, generator=gen).add(0.1)
    x = torch.randn(t, k, generator=gen) * torch.rand(1, k, generator=gen).mul(4).add(0.1)
    g = k if gs == -1 else gs
    rtn = group_errors(w, fake_quantize(w, bits, gs, zp), x, g)
    errs = {}
    for mode in ("symmetric", "range", "asymmetric"):
        r = clip_ratios(w, x, bits, gs, zp, grid=10, max_shrink=0.5, mode=mode)
        assert r.shape == (n, math.ceil(k / g), 2)
        assert bool(((r > 0.5 - 1e-6) & (r <= 1.0)).all())
        if mode != "asymmetric":
            assert torch.equal(r[..., 0], r[..., 1])
        wc = apply_clip(w, r, gs, mode)
        errs[mode] = group_errors(w, fake_quantize(wc, bits, gs, zp), x, g)
        # ratio 1 is a candidate: clipping never raises a group's error above RTN's
        assert bool((errs[mode] <= rtn * (1 + 1e-4) + 1e-9).all()), mode
    # the asymmetric search starts from the range search's answer and only accepts improvements
    assert bool((errs["asymmetric"] <= errs["range"] * (1 + 1e-4) + 1e-9).all())


def test_apply_clip_accepts_one_or_two_ratios():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 40, generator=gen)
    r = torch.rand(6, 3, generator=gen) * 0.5 + 0.5
    one = apply_clip(w, r, 16, "range")
    two = apply_clip(w, torch.stack([r, r], dim=-1), 16, "range")
    assert torch.equal(one, two)
    lo_only = apply_clip(w, torch.stack([r, torch.ones_like(r)], dim=-1), 16, "range")
    # only negative weights move when the upper ratio is 1
    moved = lo_only != w
    assert bool((w[moved] < 0).all())
    assert bool((lo_only >= w.clamp(max=0).view(6, -1)[:, :40].min()).all())


@settings(max_examples=20, deadline=None)
@given(shapes)
def test_gram_error_matches_token_error(case):
    """d^T H d over the group Gram equals the token-averaged squared partial output error."""
    from awq_ao.passes.search import group_gram, scale_gram

    n, k, gs, t, bits, zp, seed = case
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen, dtype=torch.float64)
    x = torch.randn(t, k, generator=gen, dtype=torch.float64)
    s = torch.rand(k, generator=gen, dtype=torch.float64) + 0.5
    g = k if gs == -1 else gs
    wq = fake_quantize(w, bits, gs, zp)
    ref = group_errors(w, wq, x / s, g)
    h = scale_gram(group_gram(x, gs).double(), s).double()
    groups = h.shape[0]
    pad = groups * g - k
    d = torch.cat([wq - w, torch.zeros(n, pad, dtype=torch.float64)], dim=1).view(n, groups, g)
    got = torch.einsum("ngi,gij,ngj->ng", d, h, d)
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-6)
    # the search accepts tokens or their Gram and gives the same ratios
    r_tok = clip_ratios(w.float(), x.float(), bits, gs, zp, grid=10, mode="asymmetric")
    r_gram = clip_ratios(w.float(), group_gram(x.float(), gs), bits, gs, zp, grid=10, mode="asymmetric")
    assert torch.equal(r_tok, r_gram)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 40), k=st.integers(3, 90), gs=st.sampled_from([8, 16, 32]), chunk=st.integers(1, 17),
       seed=st.integers(0, 2**16))
def test_row_chunked_helpers_match_whole_weight(n, k, gs, chunk, seed):
    """Search helpers that work on row chunks (bounded temporaries) equal the one-shot formulas."""
    from awq_ao.lowering.quant_math import fake_quantize
    from awq_ao.passes.search import fake_quantize_scaled, weight_mean

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    s = torch.rand(k, generator=g) + 0.5
    want = (fake_quantize(w.float() * s, 4, gs, True) / s).to(torch.bfloat16)
    assert torch.equal(fake_quantize_scaled(w, s, 4, gs, True, rows_per_chunk=chunk), want)
    assert torch.equal(fake_quantize_scaled(w, s, 4, gs, True, transpose=True, rows_per_chunk=chunk), want.t())
    ratios = torch.rand(n, -(-k // gs), 2, generator=g) * 0.5 + 0.5
    assert torch.equal(apply_clip(w, ratios, gs, "asymmetric", rows_per_chunk=chunk),
                       apply_clip(w, ratios, gs, "asymmetric", rows_per_chunk=n))
    # weight_mean: mean over rows of |w| / (its group's max |w|), per input channel
    pad = (-k) % gs
    wa = torch.cat([w.float().abs(), torch.zeros(n, pad)], dim=1).view(n, -1, gs)
    ref = (wa / (wa.amax(-1, keepdim=True) + 1e-6)).view(n, -1)[:, :k].mean(0)
    torch.testing.assert_close(weight_mean([w[: n // 2 + 1], w[n // 2 + 1 :]] if n > 1 else [w], gs), ref)


def test_from_float_rejects_params_of_the_wrong_shape():
    import pytest

    from awq_ao.lowering.int4_tensor import Int4WeightTensor

    w = torch.randn(8, 32)
    with pytest.raises(ValueError, match=r"params must be \(scale, zero\) of shape \(8, 2\)"):
        Int4WeightTensor.from_float(w, 4, 16, True, params=(torch.ones(8, 3), torch.zeros(8, 3)))


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 40), k=st.integers(2, 70), t=st.integers(1, 50), gs=st.sampled_from([8, 16, 32, -1]),
    scaled=st.booleans(), seed=st.integers(0, 2**16),
)
def test_gram_loss_equals_the_direct_output_mse(n, k, t, gs, scaled, seed):
    """The scale search's Gram form of a direct group's loss is the MSE of x @ d^T (float64)."""
    from awq_ao.passes.rounding import full_gram
    from awq_ao.passes.search import fake_quantize_scaled, gram_output_mse

    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(n, k, generator=g, dtype=torch.float64), torch.randn(n + 3, k, generator=g, dtype=torch.float64)]
    x = torch.randn(t, k, generator=g, dtype=torch.float64) * torch.rand(k, generator=g, dtype=torch.float64) * 3
    s = torch.rand(k, generator=g, dtype=torch.float64) + 0.5 if scaled else None
    direct = torch.cat([(x @ (fake_quantize_scaled(w, s, 4, gs, True) - w).t()).flatten() for w in ws]).pow(2).mean()
    got = gram_output_mse(ws, s, full_gram(x), 4, gs, True, rows_per_chunk=7)
    assert got == pytest.approx(float(direct), rel=1e-9, abs=1e-15)


def test_gram_loss_is_used_where_cheaper_and_finds_the_same_scales(monkeypatch):
    from tiny_models import tiny_model, token_batches

    import awq_ao
    import awq_ao.passes.search as search

    def run(force_direct: bool):
        if force_direct:
            monkeypatch.setattr(search, "use_gram_loss", lambda *a: False)
        model = tiny_model("llama", layers=2)
        rep = awq_ao.quantize(model, token_batches(4, seq=32), group_size=32, rounding="nearest",
                              verbose=False, progress=False)
        return {tuple(g.consumers): g.alpha for g in rep.groups}

    assert search.use_gram_loss(8192, 1536, 576, 21, False) and not search.use_gram_loss(16, 64, 64, 21, False)
    calls = []
    real = search.gram_output_mse
    monkeypatch.setattr(search, "gram_output_mse", lambda *a, **k: calls.append(1) or real(*a, **k))
    gram_alphas = run(False)
    assert len(calls) == 4 * 21  # the o_proj and down_proj groups of both layers
    direct_alphas = run(True)
    assert gram_alphas == direct_alphas
