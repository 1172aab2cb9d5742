"""Successive halving of the AWQ scale candidates over the search chunk's rows.

Scoring a candidate scale on its enclosing module's output (``search_loss="module"``) costs
one forward of that module over every search row, and the grid has 20 of them. Most are
clearly worse than the best few after a handful of rows, so :func:`screened_grid_search`
scores every candidate on the first rows only, keeps the best ones, scores the survivors on
more rows, and so on; the last survivors are scored on every row, and the winner is chosen on
the full loss exactly as the full grid search would choose among them (plain RTN, the
candidate to beat, is always scored on every row). With the default stages for candidates
scored after error-feedback rounding (all 20 candidates on 2 of the 16 search rows, the best
12 on 4, the best 6 on 8, the best 3 on all 16) a group costs 0.38x the full grid's module
forwards; nearest-rounded candidates keep all 20 after 2 rows, then the best 10 on 8 and the
best 5 on 16 (0.52x). Both picked the same scale as the full grid in every module-scored group
of SmolLM2-135M and Gemma 3 270M (``devtools/search_rank_check.py``), and the rounded default
gave a byte-identical SmolLM2 model to the 4-row screen before it, 9% faster.

The losses are sums of squared output errors over row chunks: a survivor's total over every
chunk is the same mean squared error the full search measures (up to float summation order).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["screen_stages", "screen_keep", "stage_chunks", "screened_grid_search", "screened_candidates"]

#: ``screen_keep=None``: survivors of the first stage (``screen_rows=2``) when the candidates
#: are scored after error-feedback rounding (12) or rounded to nearest (20: all of them). In
#: the offline replays (``devtools/search_rank_check.py``) at 2 rows the smallest keep that
#: reproduced the full grid's pick in every group was 12 for rounded candidates (10 missed one
#: Gemma pick) and 20 for nearest-rounded ones (14 missed two SmolLM2 picks), i.e. the same
#: 4/10, 8/5 screen as the 4-row default before 2026-12-07.
KEEP_ROUNDED, KEEP_NEAREST = 12, 20

#: a chunk's loss: ``(sum of squared errors, number of elements)``
ChunkLoss = Callable[[torch.Tensor | None, int], tuple[float, int]]


def screen_stages(total_rows: int, first_rows: int, keep: int) -> list[tuple[int, int]]:
    """``[(rows, survivors)]``: stage ``i`` scores the survivors on the first ``rows`` rows.

    Starting at ``first_rows`` rows, each stage doubles the rows and keeps ``keep``, then half
    as many, while fewer rows than ``total_rows`` have been seen; ``keep`` of at least 1 means
    the last stage's survivors (at least one) are then scored on every row. No stage when
    ``first_rows`` already covers the sample (the screen then is the full search).
    """
    stages: list[tuple[int, int]] = []
    rows, k = first_rows, keep
    while rows < total_rows and k >= 1:
        stages.append((rows, k))
        rows, k = rows * 2, k // 2
    return stages


def screen_keep(keep: int | None, rounded: bool) -> int:
    """The ``screen_keep`` option resolved: ``keep``, or by default by how the candidates are
    rounded when scored (``rounded``: with error feedback)."""
    if keep is not None:
        return keep
    return KEEP_ROUNDED if rounded else KEEP_NEAREST


def screened_candidates(total_rows: int, n_grid: int, stages: list[tuple[int, int]]) -> float:
    """Candidates scored on every row that cost as much as one family's screen (RTN excluded)."""
    if total_rows <= 0:
        return float(n_grid)
    alive, done, rows = n_grid, 0, 0
    for end, keep in stages:
        end = min(end, total_rows)
        rows += alive * (end - done)
        alive, done = min(alive, max(keep, 1)), end
    rows += alive * (total_rows - done)
    return rows / total_rows


def stage_chunks(total_rows: int, stages: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Row chunks ``[(start, stop)]`` whose boundaries are the stages' row counts."""
    bounds = [0, *(r for r, _ in stages if 0 < r < total_rows), total_rows]
    return [(a, b) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


def screened_grid_search(
    chunk_loss: ChunkLoss,
    n_chunks: int,
    stage_ends: list[tuple[int, int]],
    best: tuple[float, float | None, torch.Tensor | None],
    families: list[list[torch.Tensor]],
) -> tuple[float, float | None, torch.Tensor | None]:
    """Minimise the full loss over the grid's candidates by successive halving.

    ``chunk_loss(s, j)``: sum of squared errors and element count of row chunk ``j`` at scale
    ``s``. ``stage_ends``: ``[(chunks, survivors)]``, each stage scoring the survivors on the
    first ``chunks`` chunks and keeping the best ``survivors`` (per duo family) by their loss
    so far. ``best``: ``(loss, alpha, s)`` to beat, a full mean squared error (plain RTN).
    ``families``: per duo family, the candidate scale of every grid point ``i`` (alpha
    ``i / len``). Among the final survivors, ties keep the smaller alpha, as the full grid
    search does.
    """
    for cands in families:
        n_grid = len(cands)
        for i, loss in _halve(chunk_loss, cands, n_chunks, stage_ends):  # grid order
            if loss < best[0]:  # ties keep the smaller alpha
                best = (loss, i / n_grid, cands[i])
    return best


def _halve(chunk_loss: ChunkLoss, cands: list[torch.Tensor], n_chunks: int,
           stage_ends: list[tuple[int, int]]) -> list[tuple[int, float]]:
    """The survivors of one family's stages with their full losses, in grid order."""
    sse = [0.0] * len(cands)
    numel = [0] * len(cands)
    alive, done = list(range(len(cands))), 0
    for end, keep in [*stage_ends, (n_chunks, len(cands))]:
        end = min(end, n_chunks)
        for i in alive:
            for j in range(done, end):
                e, n = chunk_loss(cands[i], j)
                sse[i] += e
                numel[i] += n
        done = end
        alive = sorted(alive, key=lambda i: (sse[i] / max(numel[i], 1), i))[: max(keep, 1)]
    return [(i, sse[i] / max(numel[i], 1)) for i in sorted(alive)]
