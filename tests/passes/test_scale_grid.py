"""The alpha grid search: full scan vs coarse-then-neighbours refinement."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import awq_ao.passes.scale_grid as search
from awq_ao.passes.scale_grid import grid_search


def _run(loss_by_alpha, n_grid: int, refine: bool, duo: bool | str = False):
    """grid_search on a loss given as a function of alpha; returns (best, alphas tried)."""
    tried: list[float] = []
    real = search.candidate_scales

    def spy(xm, wm, alpha, tie):  # remember which alpha the next loss call scores
        tried.append(alpha)
        return real(xm, wm, alpha, tie)

    search.candidate_scales = spy
    try:
        best = grid_search(lambda s: loss_by_alpha(tried[-1]), (float("inf"), None, None),
                           torch.rand(8) + 0.5, torch.rand(8) + 0.5, n_grid, duo, refine=refine)
    finally:
        search.candidate_scales = real
    return best, tried


@settings(max_examples=60, deadline=None)
@given(center=st.floats(0.0, 1.0), width=st.floats(0.05, 3.0), n_grid=st.integers(4, 30))
def test_refine_finds_the_full_grid_minimum_of_a_unimodal_loss(center, width, n_grid):
    def loss(a: float) -> float:
        return abs(a - center) ** 1.5 * width + 1.0

    full, full_tried = _run(loss, n_grid, refine=False)
    ref, ref_tried = _run(loss, n_grid, refine=True)
    assert len(full_tried) == n_grid and len(ref_tried) <= (n_grid + 1) // 2 + 2
    assert ref[1] == full[1] and ref[0] == full[0]


def test_refine_at_the_default_grid_tries_12_candidates_per_family():
    _, tried = _run(lambda a: (a - 0.33) ** 2, 20, refine=True)
    assert len(tried) == 12 and tried[-2:] == [0.25, 0.35]  # coarse best 0.3, then its neighbours
    _, tried = _run(lambda a: (a - 0.33) ** 2, 20, refine=True, duo="both")
    assert len(tried) == 24


def test_rtn_stays_best_when_no_candidate_beats_it():
    best = grid_search(lambda s: 5.0, (1.0, None, None), torch.ones(4), None, 20, False, refine=True)
    assert best[1] is None and best[0] == 1.0
