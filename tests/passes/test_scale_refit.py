"""Least-squares scale refit after error-feedback rounding: float64 references and guards."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from awq_ao.lowering.quant_math import group_geometry, quant_params
from awq_ao.passes.rounding import error_feedback_codes
from awq_ao.passes.scale_refit import alternate_grid, refit_scales


def _problem(seed: int, n: int, k: int, g: int, tokens: int = 96):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen, dtype=torch.float64)
    x = torch.randn(tokens, k, generator=gen, dtype=torch.float64) * torch.rand(k, generator=gen, dtype=torch.float64).add(0.2)
    h = x.t() @ x / tokens
    scale, zero = quant_params(w.float(), 4, g)
    codes = error_feedback_codes(w, scale.double(), zero.double(), h, 4, g, damp=0.1)
    return w, h, codes, scale.double(), zero.double()


def _dense_solution(w, h, codes, zero, g, damp):
    """Each row's scales by dense least squares on the damped Gram (float64, no chunks)."""
    n, k = w.shape
    gg, groups, _ = group_geometry(k, g)
    hd = h + damp * h.diagonal().mean() * torch.eye(k, dtype=torch.float64)
    col_group = torch.arange(k) // gg
    out = torch.empty(n, groups, dtype=torch.float64)
    for r in range(n):
        c = codes[r].double() - zero[r, col_group]
        a = torch.zeros(k, groups, dtype=torch.float64)
        a[torch.arange(k), col_group] = c
        out[r] = torch.linalg.solve(a.t() @ hd @ a, a.t() @ hd @ w[r])
    return out


def _errors(w, h, codes, scale, zero, g, damp):
    k = w.shape[1]
    gg = group_geometry(k, g).size
    col_group = torch.arange(k) // gg
    q = (codes.double() - zero[:, col_group]) * scale[:, col_group]
    hd = h + damp * h.diagonal().mean() * torch.eye(k, dtype=torch.float64)
    d = w - q
    return ((d @ hd) * d).sum(dim=1)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 9), k=st.sampled_from([16, 24, 40, 64]),
       g=st.sampled_from([8, 16, 32]), chunk=st.integers(1, 5))
def test_refit_matches_dense_least_squares(seed: int, n: int, k: int, g: int, chunk: int) -> None:
    w, h, codes, scale, zero = _problem(seed, n, k, g)
    got = refit_scales(w, codes, scale, zero, h, g, damp=0.1, rows_per_chunk=chunk)
    want = _dense_solution(w, h, codes, zero, g, 0.1)
    err_old = _errors(w, h, codes, scale, zero, g, 0.1)
    err_new = _errors(w, h, codes, got, zero, g, 0.1)
    assert (err_new <= err_old + 1e-12).all()
    kept = (got == scale).all(dim=1)  # rows the guard kept must not have had a better solution
    solved = ~kept
    assert torch.allclose(got[solved], want[solved], rtol=1e-6, atol=1e-9)
    # a kept row: the dense solution was not better, or had a non-positive scale
    no_gain = _errors(w, h, codes, want, zero, g, 0.1) >= err_old - 1e-9 * err_old.abs().clamp(min=1)
    assert (no_gain | (want <= 0).any(dim=1))[kept].all()


def test_refit_lowers_error_and_keeps_codes_valid_float32() -> None:
    w, h, codes, scale, zero = _problem(3, 48, 96, 32, tokens=400)
    got = refit_scales(w.float(), codes, scale.float(), zero.float(), h.float(), 32, damp=0.1)
    assert got.dtype == torch.float32 and got.shape == scale.shape
    assert (got > 0).all()
    before = _errors(w, h, codes, scale, zero, 32, 0.1).sum()
    after = _errors(w, h, codes, got.double(), zero, 32, 0.1).sum()
    assert after < 0.99 * before  # a real gain (about 4% here), not a rounding-level change


def test_groups_of_zero_point_codes_keep_their_scale() -> None:
    w, h, codes, scale, zero = _problem(5, 4, 32, 16)
    codes = codes.clone()
    codes[:, :16] = zero[:, :1].to(torch.uint8)  # the first group: every code on the zero point
    got = refit_scales(w, codes, scale, zero, h, 16, damp=0.1)
    assert torch.equal(got[:, 0], scale[:, 0])


def test_bad_shapes_are_refused() -> None:
    w, h, codes, scale, zero = _problem(1, 4, 32, 16)
    try:
        refit_scales(w, codes[:, :16], scale, zero, h, 16)
    except ValueError as e:
        assert "shapes do not fit" in str(e)
    else:
        raise AssertionError("expected a ValueError")


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), rounds=st.integers(0, 4))
def test_alternating_never_raises_the_error(seed: int, rounds: int) -> None:
    w, h, _, scale, zero = _problem(seed, 6, 48, 16)
    calls = []

    def round_codes(s: torch.Tensor) -> torch.Tensor:
        calls.append(s)
        return error_feedback_codes(w, s, zero, h, 4, 16, damp=0.1)

    codes, got = alternate_grid(w, scale, zero, h, 16, 0.1, rounds, round_codes)
    first = error_feedback_codes(w, scale, zero, h, 4, 16, damp=0.1)
    assert len(calls) == max(rounds, 1)  # the first rounding, then one after every refit but the last
    assert (_errors(w, h, codes, got, zero, 16, 0.1) <= _errors(w, h, first, scale, zero, 16, 0.1) + 1e-12).all()
    if rounds == 0:
        assert torch.equal(codes, first) and torch.equal(got, scale)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15


def test_more_rounds_lower_the_error_on_correlated_inputs() -> None:
    gen = torch.Generator().manual_seed(0)
    n, k, g = 32, 128, 64
    w = torch.randn(n, k, generator=gen, dtype=torch.float64)
    mix = torch.randn(k, k, generator=gen, dtype=torch.float64) / k**0.5 + torch.eye(k, dtype=torch.float64)
    x = torch.randn(512, k, generator=gen, dtype=torch.float64) @ mix
    h = x.t() @ x / 512
    scale, zero = (t.double() for t in quant_params(w.float(), 4, g))

    def round_codes(s: torch.Tensor) -> torch.Tensor:
        return error_feedback_codes(w, s, zero, h, 4, g, damp=0.1)

    errs = [float(_errors(w, h, *alternate_grid(w, scale, zero, h, g, 0.1, r, round_codes), zero, g, 0.1).sum())
            for r in (0, 1, 4)]
    assert errs[2] <= errs[1] <= errs[0] and errs[2] < 0.99 * errs[0]


def test_config_refit_rounds_checked() -> None:
    from awq_ao import awq_config

    assert awq_config(gptq_refit_rounds=3).gptq_refit_rounds == 3
    try:
        awq_config(gptq_refit_rounds=-1)
    except ValueError as e:
        assert "gptq_refit_rounds" in str(e)
    else:
        raise AssertionError("expected a ValueError")


def _int4_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from awq_ao.lowering.int4_tensor import Int4WeightTensor

    return {n: p.dequantize() for n, p in model.named_parameters() if isinstance(p, Int4WeightTensor)}


def test_refit_rounds_in_convert_dense_and_experts() -> None:
    """gptq_refit_rounds reaches every error-feedback-rounded weight (dense linears and expert
    slabs) and the quantized models still run; rounds=0 leaves the default untouched."""
    import warnings

    from moe_models import batches, tiny_moe
    from tiny_models import tiny_model, token_batches

    import awq_ao

    for make, data in ((lambda: tiny_model("llama", layers=2), lambda: token_batches(4, seq=32)),
                       (lambda: tiny_moe("MixtralForCausalLM"), lambda: batches(3))):
        got = {}
        for rounds in (0, 2):
            model = make()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                awq_ao.quantize(model, data(), group_size=32, n_grid=3, progress=False, verbose=False,
                                gptq_refit_rounds=rounds)
            got[rounds] = _int4_weights(model)
            x = next(iter(data()))
            out = model(**x) if isinstance(x, dict) else model(x)
            assert torch.isfinite(out.logits).all()
        assert got[0].keys() == got[2].keys() and got[0]
        changed = [k for k in got[0] if not torch.equal(got[0][k], got[2][k])]
        assert len(changed) == len(got[0]), f"unchanged by the refit: {sorted(set(got[0]) - set(changed))}"
