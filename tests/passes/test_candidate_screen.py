"""Successive halving of the scale candidates (passes/candidate_screen, screen_rows)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import block_call

from awq_ao.config import awq_config
from awq_ao.observers.activation import ChannelStatsObserver, RecordedCall
from awq_ao.passes.candidate_screen import (
    screen_keep,
    screen_stages,
    screened_grid_search,
    stage_chunks,
)
from awq_ao.passes.pipeline import analyze, search
from awq_ao.report import ConvertReport


def test_stages_double_the_rows_and_halve_the_survivors():
    assert screen_stages(16, 2, 8) == [(2, 8), (4, 4), (8, 2)]
    assert screen_stages(16, 4, 8) == [(4, 8), (8, 4)]
    assert screen_stages(16, 2, 1) == [(2, 1)]
    assert screen_stages(16, 16, 8) == [] and screen_stages(3, 4, 8) == []
    assert stage_chunks(16, [(2, 8), (4, 4), (8, 2)]) == [(0, 2), (2, 4), (4, 8), (8, 16)]
    assert stage_chunks(5, []) == [(0, 5)]


def _search_on(sse: torch.Tensor, numel: list[int], ends: list[tuple[int, int]], rtn: float):
    """screened_grid_search on a table ``sse [candidates, chunks]``; returns (best, calls)."""
    calls: list[tuple[int, int]] = []
    cands = [torch.full((1,), float(i)) for i in range(sse.shape[0])]

    def chunk_loss(s, j):
        i = int(s[0])
        calls.append((i, j))
        return float(sse[i, j]), numel[j]

    best = screened_grid_search(chunk_loss, sse.shape[1], ends, (rtn, None, None), [cands])
    return best, calls


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 24), chunks=st.integers(1, 4), seed=st.integers(0, 2**16),
       keep=st.integers(1, 30), first=st.integers(1, 3))
def test_screen_chooses_on_the_full_loss_among_survivors(n, chunks, seed, keep, first):
    g = torch.Generator().manual_seed(seed)
    sse = torch.rand(n, chunks, generator=g, dtype=torch.float64)
    numel = [int(v) for v in torch.randint(1, 9, (chunks,), generator=g)]
    ends = [(c, max(keep >> k, 1)) for k, c in enumerate(range(first, chunks))]
    best, calls = _search_on(sse, numel, ends, float("inf"))
    full = sse.sum(dim=1) / sum(numel)
    i = round(best[1] * n)
    assert best[0] == pytest.approx(float(full[i]), rel=1e-12)  # the winner's loss is its full loss
    assert len(set(calls)) == len(calls)  # no (candidate, chunk) scored twice
    scored_everywhere = {c for c in range(n) if all((c, j) in calls for j in range(chunks))}
    assert i in scored_everywhere and float(full[i]) == min(float(full[c]) for c in scored_everywhere)
    if all(k >= n for _, k in ends):  # nothing dropped: the full grid search's answer
        assert i == int(torch.argmin(full))
    dominant = int(torch.argmin(full))
    sse2 = sse.clone()
    sse2[dominant] = 0.0  # best on every prefix: never dropped
    best2, _ = _search_on(sse2, numel, ends, float("inf"))
    assert round(best2[1] * n) == dominant


def test_rtn_wins_when_no_survivor_beats_it_and_ties_keep_the_smaller_alpha():
    sse = torch.ones(6, 3, dtype=torch.float64)
    best, _ = _search_on(sse, [1, 1, 1], [(1, 3)], rtn=1.0)
    assert best[1] is None  # equal to RTN's loss is not better
    best, _ = _search_on(sse, [1, 1, 1], [(1, 3)], rtn=2.0)
    assert best[1] == 0.0  # all tie: the smallest alpha


def _results(rows: int, **opts):
    block, a, kw = block_call(rows=rows)
    targets = [n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
    cfg = awq_config(group_size=32, max_search_samples=rows, **opts)
    analysis = analyze(block, RecordedCall(a, kw, rows), targets, cfg, ConvertReport(4, 32, True))
    observers = {n: ChannelStatsObserver(n, block.get_submodule(n).in_features) for n in targets}
    hooks = [block.get_submodule(n).register_forward_pre_hook(o) for n, o in observers.items()]
    with torch.no_grad():
        block(*a, **kw)
    for h in hooks:
        h.remove()
    forwards = {"rows": 0}

    def count(mod, args, kwargs):
        forwards["rows"] += kwargs.get("hidden_states", args[0] if args else None).shape[0]

    hooks = [block.get_submodule(g.inspect).register_forward_pre_hook(count, with_kwargs=True)
             for g in analysis.groups if g.inspect and g.inspect != g.consumers[0]]
    try:
        res, _ = search(block, analysis, a, kw, observers, cfg, ConvertReport(4, 32, True), rows=rows)
    finally:
        for h in hooks:
            h.remove()
    return res, forwards["rows"]


def test_a_screen_that_keeps_every_candidate_is_the_full_search():
    full, full_rows = _results(8, screen_rows=None)
    kept, kept_rows = _results(8, screen_rows=2, screen_keep=64)
    assert {gi: r.alpha for gi, r in kept.items()} == {gi: r.alpha for gi, r in full.items()}
    searched = [gi for gi, r in full.items() if r.loss_best is not None]
    assert searched
    for gi in searched:
        assert kept[gi].loss_best == pytest.approx(full[gi].loss_best, rel=1e-5)
        assert kept[gi].loss_rtn == pytest.approx(full[gi].loss_rtn, rel=1e-5)
    assert kept_rows == full_rows  # same row-forwards, cut into chunks


def test_screen_scores_fewer_rows_and_never_loses_to_rtn():
    full, full_rows = _results(8, screen_rows=None)
    screened, rows = _results(8, screen_rows=1, screen_keep=4)
    # per module group: ref + RTN on 8 rows, 20 candidates on 1 row, 4 on 2, 2 on 4, 1 on 8
    assert rows < full_rows / 2
    for gi, r in screened.items():
        if r.loss_best is not None:
            assert r.loss_best <= r.loss_rtn
            assert r.loss_best >= full[gi].loss_best * (1 - 1e-5)  # never better than the full grid


def test_default_keep_follows_how_the_candidates_are_rounded():
    assert screen_keep(None, rounded=True) == 12 and screen_keep(None, rounded=False) == 20
    assert screen_keep(3, rounded=True) == 3
    for rounding, keep in (("gptq", 12), ("nearest", 20)):
        default, _ = _results(8, screen_rows=1, search_rounding=rounding, rounding=rounding)
        explicit, _ = _results(8, screen_rows=1, screen_keep=keep, search_rounding=rounding, rounding=rounding)
        other, _ = _results(8, screen_rows=1, screen_keep=1, search_rounding=rounding, rounding=rounding)
        assert {gi: r.loss_best for gi, r in default.items()} == {gi: r.loss_best for gi, r in explicit.items()}
        assert {gi: r.loss_best for gi, r in default.items()} != {gi: r.loss_best for gi, r in other.items()}


def test_options_are_validated():
    assert awq_config(screen_rows=2).search_options.screen_rows == 2
    assert (awq_config().screen_rows, awq_config().screen_keep) == (2, None)  # the default screens
    with pytest.raises(ValueError, match="screen_rows"):
        awq_config(screen_rows=0)
    with pytest.raises(ValueError, match="screen_keep"):
        awq_config(screen_rows=2, screen_keep=0)
