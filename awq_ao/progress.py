"""One progress display for a whole run: calibration, search, fold/clip/rounding, saving.

A run's work is planned up front in *estimated seconds*: every phase's cost is a sum over the
quantized linears of a cost model in their shapes (:class:`CostModel`), with constants fitted
on SmolLM2-135M on a 2-core AVX512 CPU (``benchmarks/progress_eta.py`` measures how good the
resulting ETA is). The display is one tqdm bar whose position is the estimated work done;
tqdm's rate (estimated seconds done per real second, averaged over the run) turns the
remaining estimate into the ETA, so a faster or slower machine changes the rate, not the
shape of the plan.

Whoever starts a run first owns it (the CLI for quantize + save, :func:`awq_ao.quantize` for
calibration + convert, convert itself in the plain ``quantize_`` flow); the phases started
inside it report to it instead of opening bars of their own (:func:`current`).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from torch import nn

from awq_ao.passes.candidate_screen import screen_keep, screen_stages, screened_candidates

#: seconds per unit of each phase's cost model (fitted on this project's reference run)
CALIBRATE_S_PER_MAC = 1.8e-11  # one forward multiply-add of a quantized linear during calibration
SEARCH_S_PER_MAC = 1.4e-11  # one multiply-add of a candidate's loss (module forward or Gram form)
CLIP_S_PER_ELEMENT = 2.7e-9  # one weight element for one clipping candidate
ROUND_S_PER_MAC = 2.0e-10  # one multiply-add of the error-feedback sweep (N K^2)
SAVE_S_PER_WEIGHT = 5.0e-8  # one weight element packed and written

PHASES = ("calibrate", "search", "round", "refine", "save")
_LABELS = {"calibrate": "calibrating", "search": "searching scales", "round": "clip + round + pack",
           "refine": "refining block", "save": "saving"}


@dataclass(frozen=True)
class CostModel:
    """Estimated seconds of each phase for one linear of ``n`` outputs and ``k`` inputs.

    ``config`` is an :class:`awq_ao.config.AWQConfig`; ``search_tokens`` the tokens of the
    search chunk (the first ``max_search_samples`` rows of the kept sample), ``kept_tokens``
    those of the whole kept sample (0: the same), over which the Grams are built (one more
    forward of the rows beyond the search chunk, and a ``tokens x K^2`` Gram). The module loss runs every linear of a block once per candidate (the
    attention's q/k/v/o, the MLP's gate/up/down), so its cost is counted per linear as
    ``candidates x tokens x N K``; a loss through the input's Gram costs ``candidates x N K^2``.
    """

    config: Any
    search_tokens: int = 0
    kept_tokens: int = 0
    kept_rows: int = 0

    def candidates(self) -> int:
        """Scale candidates per group (the grid, both duo families, plus plain RTN)."""
        c = self.config
        return c.n_grid * (2 if c.duo_scaling == "both" else 1) + 1

    def module_candidates(self) -> float:
        """Candidates scored on every search row by the module loss (fewer with a screen)."""
        c = self.config
        if not c.screen_rows:
            return float(self.candidates())
        rows = c.max_search_samples
        rounded = (c.rounding if c.search_rounding == "auto" else c.search_rounding) == "gptq"
        keep = screen_keep(c.screen_keep, rounded)
        per_family = screened_candidates(rows, c.n_grid, screen_stages(rows, c.screen_rows, keep))
        return per_family * (2 if c.duo_scaling == "both" else 1) + 1

    def calibrate(self, n: int, k: int, tokens: int) -> float:
        """One forward of ``tokens`` tokens through the linear, with its observer."""
        return CALIBRATE_S_PER_MAC * tokens * n * k

    def search(self, n: int, k: int) -> float:
        """The scale search's share of this linear."""
        c = self.config
        if not c.needs_calibration or not c.scale_search:
            return 0.0
        t = max(self.search_tokens, 1)
        kept = max(self.kept_tokens, t)
        gram = self.candidates() * n * k * min(k, t) + kept * k * k + (kept - t) * n * k
        module = self.module_candidates() * t * n * k if c.search_loss == "module" else 0.0
        return SEARCH_S_PER_MAC * (gram + module)

    def round(self, n: int, k: int) -> float:
        """Clipping search, error-feedback rounding and packing of this linear."""
        c = self.config
        cost = SAVE_S_PER_WEIGHT * n * k / 4  # quantize + pack, also for plain RTN
        if c.needs_calibration and c.clip:
            steps = max(1, int(c.max_shrink * c.clip_grid))
            passes = 3 if c.clip_mode == "asymmetric" else 1
            cost += CLIP_S_PER_ELEMENT * steps * passes * n * k
        if c.needs_calibration and c.rounding == "gptq":
            # each gptq_refit_rounds round: a least-squares refit and a re-rounding, each
            # roughly one sweep's N K^2 work (a rough estimate, not fitted)
            cost += ROUND_S_PER_MAC * n * k * k * (1 + 2 * c.gptq_refit_rounds)
        return cost

    def refine(self, n: int, k: int) -> float:
        """Block refinement's share of this linear (``config.refine_steps``, layer by layer):
        each step a forward and a backward (about three forwards) of ``block_refine_batch``
        rows, plus two forwards of the whole kept sample (the error before and after)."""
        c = self.config
        steps = c.refine_steps
        if not steps or not self.kept_tokens:
            return 0.0
        rows = max(self.kept_rows, 1)
        step_tokens = self.kept_tokens * min(c.block_refine_batch, rows) / rows
        return CALIBRATE_S_PER_MAC * n * k * (3 * steps * step_tokens + 2 * self.kept_tokens)

    def save(self, n: int, k: int) -> float:
        """Packing for the checkpoint format and writing this linear."""
        return SAVE_S_PER_WEIGHT * n * k


def linear_shapes(model: nn.Module, names: list[str]) -> dict[str, tuple[int, int]]:
    """``{name: (out_features, in_features)}`` of the linears (or Conv1D) ``names``."""
    shapes: dict[str, tuple[int, int]] = {}
    for name in names:
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            continue
        w = getattr(mod, "weight", None)
        if w is None or w.dim() != 2:
            continue
        n, k = w.shape
        if type(mod).__name__ == "Conv1D":  # transformers' Conv1D stores [in, out]
            n, k = k, n
        shapes[name] = (int(n), int(k))
    return shapes


class RunProgress:
    """One bar over the planned phases of a run (a no-op when ``enabled`` is False)."""

    def __init__(self, enabled: bool = True, desc: str = "awq_ao") -> None:
        self.enabled = enabled
        self.desc = desc
        self.totals: dict[str, float] = {}
        self.done: dict[str, float] = {}
        self.costs: dict[str, dict[str, float]] = {}  # phase -> linear -> planned cost
        self._counted: dict[str, set[str]] = {}
        self._bar: Any = None
        self._phase = ""
        self._detail = ""
        self.started = time.perf_counter()
        #: ``(seconds since start, fraction done, phase)`` at every update (for benchmarks)
        self.timeline: list[tuple[float, float, str]] = []

    # --- planning ----------------------------------------------------------------------
    def plan(self, phase: str, cost: float) -> None:
        """Plan ``cost`` estimated seconds for ``phase`` (once: a later plan is ignored)."""
        if phase in self.totals:
            return
        self.totals[phase] = max(float(cost), 0.0)
        self.done.setdefault(phase, 0.0)
        self._refresh()

    def plan_linears(self, phase: str, costs: dict[str, float]) -> None:
        """Plan ``phase`` as the sum of per-linear ``costs`` (advanced by :meth:`linear_done`)."""
        if phase in self.totals:
            return
        self.costs[phase] = dict(costs)
        self._counted[phase] = set()
        self.plan(phase, math.fsum(costs.values()))

    def planned(self, phase: str) -> bool:
        """Whether ``phase`` already has a plan."""
        return phase in self.totals

    # --- reporting ---------------------------------------------------------------------
    def advance(self, phase: str, cost: float, detail: str | None = None) -> None:
        """Record ``cost`` estimated seconds of ``phase`` as done (never past its plan)."""
        if phase not in self.totals:
            return
        self.done[phase] = min(self.totals[phase], self.done.get(phase, 0.0) + max(cost, 0.0))
        self._phase = phase
        if detail is not None:
            self._detail = detail
        self._refresh()

    def linear_done(self, phase: str, name: str, detail: str | None = None) -> None:
        """Record the planned cost of linear ``name`` in ``phase`` as done (once per name)."""
        counted = self._counted.get(phase)
        if counted is None or name in counted:
            if detail is not None:
                self.set_detail(phase, detail)
            return
        counted.add(name)
        self.advance(phase, self.costs[phase].get(name, 0.0), detail)

    def set_detail(self, phase: str, detail: str) -> None:
        """Show ``detail`` (e.g. "block 3/30") next to the phase name."""
        self._phase, self._detail = phase, detail
        self._refresh()

    def finish(self, phase: str) -> None:
        """Mark ``phase`` complete (whatever of its plan was not reported)."""
        if phase in self.totals:
            self.done[phase] = self.totals[phase]
            self._refresh()

    def fraction(self) -> float:
        """Estimated fraction of the planned work done, in [0, 1]."""
        total = math.fsum(self.totals.values())
        return math.fsum(self.done.values()) / total if total > 0 else 0.0

    def write(self, msg: str, file: Any = None) -> None:
        """Print ``msg`` on its own line without breaking the bar (default: stderr)."""
        import sys

        file = sys.stderr if file is None else file
        if self._bar is not None:
            self._bar.write(msg, file=file)
        else:
            print(msg, file=file)

    def close(self) -> None:
        """Close the bar."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _refresh(self) -> None:
        self.timeline.append((time.perf_counter() - self.started, self.fraction(), self._phase))
        if not self.enabled:
            return
        total = math.fsum(self.totals.values())
        if total <= 0:
            return
        if self._bar is None:
            try:
                from tqdm.auto import tqdm
            except ImportError:  # pragma: no cover
                self.enabled = False
                return
            # smoothing=0: the rate is the run's average, steadier across phases of unequal speed
            self._bar = tqdm(total=1.0, desc=self.desc, smoothing=0, leave=False,
                             bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}{postfix}")
        self._bar.n = self.fraction()
        label = _LABELS.get(self._phase, self._phase)
        self._bar.set_postfix_str(f"{label}{' ' + self._detail if self._detail else ''}", refresh=False)
        self._bar.refresh()


_ACTIVE: list[RunProgress] = []


def current() -> RunProgress | None:
    """The run in progress (its owner plans it; phases inside it report to it)."""
    return _ACTIVE[-1] if _ACTIVE else None


@contextlib.contextmanager
def run_progress(enabled: bool, desc: str = "awq_ao") -> Iterator[tuple[RunProgress, bool]]:
    """The active run, or a new one for the duration of the block.

    Yields ``(run, owned)``: ``owned`` is True where this call started the run (and so plans
    its phases and closes its bar).
    """
    run = current()
    if run is not None:
        yield run, False
        return
    run = RunProgress(enabled, desc)
    _ACTIVE.append(run)
    try:
        yield run, True
    finally:
        _ACTIVE.remove(run)
        run.close()


def sample_tokens(parts: Iterable[tuple[int, int]], max_search_rows: int,
                  max_kept_rows: int) -> tuple[int, int, int]:
    """Tokens of the search chunk and of the whole kept sample, and the kept sample's rows, from
    ``(tokens, rows)`` per calibration call in order. Whole calls are kept until
    ``max_kept_rows`` rows are held (as the recorder keeps them); the search chunk is their
    first ``max_search_rows`` rows."""
    search = kept = rows = 0
    for t, r in parts:
        if rows >= max_kept_rows:
            break
        if rows < max_search_rows:
            search += t * min(r, max_search_rows - rows) // max(r, 1)
        kept += t
        rows += r
    return search, kept, rows


def plan_quantization(
    run: RunProgress,
    model: nn.Module,
    targets: list[str],
    config: Any,
    search_tokens: int,
    calibration_tokens: int = 0,
    save: bool = False,
    kept_tokens: int = 0,
    kept_rows: int = 0,
) -> CostModel:
    """Plan the phases of quantizing ``targets`` (those not yet planned) and return the model."""
    shapes = linear_shapes(model, targets)
    cm = CostModel(config, search_tokens, kept_tokens, kept_rows)
    if calibration_tokens and config.needs_calibration:
        run.plan("calibrate", math.fsum(cm.calibrate(n, k, calibration_tokens) for n, k in shapes.values()))
    run.plan_linears("search", {name: cm.search(n, k) for name, (n, k) in shapes.items()})
    run.plan_linears("round", {name: cm.round(n, k) for name, (n, k) in shapes.items()})
    refine = {name: cm.refine(n, k) for name, (n, k) in shapes.items()}
    if any(refine.values()):
        run.plan_linears("refine", refine)
    if save:
        run.plan("save", math.fsum(cm.save(n, k) for n, k in shapes.values()))
    return cm


def _first_input(batch: Any) -> Any:
    """The tensor that carries a model input's tokens: ``input_ids`` (or ``inputs_embeds``)
    of a dict, the first element of a tuple/list, or the batch itself."""
    if isinstance(batch, dict):
        return batch.get("input_ids", batch.get("inputs_embeds", next(iter(batch.values()), None)))
    if isinstance(batch, (tuple, list)):
        return batch[0] if batch else None
    return batch


def tokens_of(batch: Any) -> int:
    """Tokens in one model input: ``[B, S]`` ids (or ``[B, S, H]`` embeddings) count ``B x S``."""
    import torch

    t = _first_input(batch)
    if not isinstance(t, torch.Tensor) or t.dim() == 0:
        return 0
    if t.is_floating_point() and t.dim() >= 2:
        return t.numel() // t.shape[-1]
    return t.numel()


def rows_of(batch: Any) -> int:
    """Batch rows of one model input (1 for an unbatched tensor)."""
    import torch

    t = _first_input(batch)
    if not isinstance(t, torch.Tensor) or t.dim() < 2:
        return 1
    return int(t.shape[0])


def write(msg: str, file: Any = None) -> None:
    """Print ``msg`` (default: to stderr) above the running bar, or plainly when none runs."""
    run = current()
    if run is not None:
        run.write(msg, file)
    else:
        import sys

        print(msg, file=sys.stderr if file is None else file)
