"""clip_after_rounding: every row keeps the clipping whose error-feedback codes have the lowest
output error (float64 reference), and with one strength only it is exactly the default."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import tiny_model, token_batches

import awq_ao
from awq_ao.config import awq_config
from awq_ao.lowering.quant_math import quant_params
from awq_ao.passes import apply as apply_mod
from awq_ao.passes import clip_choice
from awq_ao.passes.rounding import error_feedback_codes, inverse_factor

OPTS = dict(group_size=32, verbose=False, progress=False)


def _grid(w: torch.Tensor, shrink: float, gs: int) -> tuple[torch.Tensor, torch.Tensor]:
    return quant_params(w * shrink, 4, gs, True)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(2, 12), groups=st.integers(1, 3))
def test_rows_keep_the_grid_with_the_lowest_float64_error(seed: int, n: int, groups: int) -> None:
    gs = 16
    k = gs * groups
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    x = torch.randn(4 * k, k, generator=g) @ torch.randn(k, k, generator=g)  # correlated inputs
    h = x.t() @ x / x.shape[0]
    grids = [_grid(w, s, gs) for s in (0.7, 0.85, 1.0)]
    cfg = awq_config(bits=4, group_size=gs)
    factor = inverse_factor(h, cfg.gptq_damp, cfg.gptq_act_order)
    codes, scale, zero, best = clip_choice.round_choosing_rows(w, grids, h, factor, cfg)
    col = torch.arange(k) // gs
    errs = []
    for sc, zr in grids:  # each grid rounded alone, its error in float64
        c = error_feedback_codes(w, sc, zr, h, 4, gs, cfg.gptq_damp, act_order=cfg.gptq_act_order)
        d = (c.double() - zr.double()[:, col]) * sc.double()[:, col] - w.double()
        errs.append(((d @ h.double()) * d).sum(1))
        for r in range(n):
            if int(best[r]) == len(errs) - 1:
                assert torch.equal(codes[r], c[r]) and torch.equal(scale[r], sc[r]) and torch.equal(zero[r], zr[r])
    errs = torch.stack(errs)
    chosen = errs.gather(0, best[None]).squeeze(0)
    assert torch.all(chosen <= errs.min(0).values * (1 + 1e-5) + 1e-9)


def test_alternatives_run_from_searched_to_unclipped() -> None:
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(1))
    from awq_ao.passes.clipping import group_gram

    alts = clip_choice.clip_alternatives(w, group_gram(x, 32), awq_config(bits=3, group_size=32))
    assert len(alts) == len(clip_choice.CLIP_STRENGTHS) == 3
    assert alts[2] is w
    # shrinking moves each group's ends toward 0: the searched clip is the narrowest
    assert torch.all(alts[0].abs() <= alts[1].abs() + 1e-7) and torch.all(alts[1].abs() <= w.abs() + 1e-7)
    assert not torch.equal(alts[0], w)  # 3-bit g32 on random weights: some row is clipped


def test_one_strength_is_exactly_the_default(monkeypatch) -> None:
    a, b = tiny_model("llama", layers=1), tiny_model("llama", layers=1)
    calib = token_batches(2)
    awq_ao.quantize(a, calib, **OPTS)
    monkeypatch.setattr(clip_choice, "CLIP_STRENGTHS", (1.0,))
    monkeypatch.setattr(apply_mod, "CLIP_STRENGTHS", (1.0,))
    rep = awq_ao.quantize(b, calib, clip_after_rounding=True, **OPTS)
    assert len(rep.clip_after_rounding_rows) == 1 and rep.clip_after_rounding_rows[0] > 0
    x = token_batches(1, seed=3)[0]
    with torch.no_grad():
        assert torch.equal(a(x).logits, b(x).logits)


def test_report_counts_every_clipped_row() -> None:
    model = tiny_model("llama", layers=2)
    rows = {n: m.out_features for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    rep = awq_ao.quantize(model, token_batches(2), bits=3, clip_after_rounding=True, **OPTS)
    clipped = [n for n in rows if n.startswith("model.layers.") and not n.endswith(("q_proj", "k_proj"))]
    assert sum(rep.clip_after_rounding_rows) == sum(rows[n] for n in clipped)
    assert rep.clipped == len(clipped)
    assert "clipping chosen after rounding" in rep.summary()
