"""Graph capture: ``torch.export`` (non-strict, static shapes) of the model's recorded call.

The exported graph is used for analysis only; every edit happens on the eager modules by name.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from awq_ao.observers.activation import RecordedCall
from awq_ao.observers.attach import accepts_kwarg


class CaptureError(RuntimeError):
    """The model could not be captured as a graph."""


def call_kwargs(model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The recorded kwargs with caching turned off (AWQ replays calls; a KV cache would grow)."""
    kw = dict(kwargs)
    if accepts_kwarg(model, "use_cache"):
        kw["use_cache"] = False
        kw.pop("past_key_values", None)
    return kw


def slice_batch(call: RecordedCall, rows: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Keep the first ``rows`` rows of every tensor whose leading dim is the batch."""

    def f(t: Any) -> Any:
        if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == call.rows:
            return t[:rows]
        return t

    return tree_map(f, call.args), tree_map(f, call.kwargs)


def capture(model: nn.Module, call: RecordedCall) -> torch.export.ExportedProgram:
    """Export ``model`` on (one row of) a recorded call; raise :class:`CaptureError` on failure."""
    args, kwargs = slice_batch(call, 1) if call.rows > 1 else (call.args, call.kwargs)
    kwargs = call_kwargs(model, kwargs)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return torch.export.export(model, tuple(args), kwargs, strict=False)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__}: {type(e).__name__}: {msg}"
        ) from e
    finally:
        model.train(was_training)
