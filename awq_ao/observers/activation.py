"""Streaming activation statistics and the root-call recorder used by the prepare step.

Observers are plain forward pre-hooks: the user's model keeps its classes and parameter
names, so any calibration loop works. Memory is bounded: per linear a float64 vector of
``in_features`` and a counter; for the whole model at most ``search_rows`` recorded root calls.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from awq_ao.memory import release_freed_memory


def _detach_tree(obj: Any) -> Any:
    """Detach every tensor in a pytree (keeps device and dtype)."""

    def f(t: Any) -> Any:
        return t.detach() if isinstance(t, torch.Tensor) else t

    return tree_map(f, obj)


def first_tensor(obj: Any) -> torch.Tensor | None:
    """The first tensor found in a (possibly nested) call argument or module output."""
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        for o in obj:
            t = first_tensor(o)
            if t is not None:
                return t
    if hasattr(obj, "to_tuple"):  # transformers ModelOutput
        return first_tensor(obj.to_tuple())
    return None


#: The last input whose |x| column sums were computed: ``(weakref to the tensor, its version
#: counter, the sums)``. Linears called on one tensor (q/k/v, gate/up) reuse the sums.
_last_sums: tuple[Any, int, torch.Tensor] | None = None


def abs_column_sums(x: torch.Tensor, in_features: int) -> torch.Tensor:
    """Sum of |x| over all rows, per channel, in float64 (shared by observers of one tensor)."""
    global _last_sums
    last = _last_sums
    if last is not None and last[0]() is x and last[1] == x._version:
        return last[2]
    x2 = x.detach().reshape(-1, in_features)
    # sum |x| over rows in float64, a few rows at a time: whole-activation temporaries
    # (|x|, isfinite masks, float64 copies: up to 64 MiB for 1024 tokens x 8192) fragment
    # the heap during the user's calibration loop; a non-finite input makes its
    # column's sum non-finite, so one check of the sums finds it
    step = max(1, (1 << 17) // in_features)
    s = torch.zeros(in_features, dtype=torch.float64, device=x2.device)
    for r0 in range(0, x2.shape[0], step):
        s += torch.linalg.vector_norm(x2[r0 : r0 + step], 1, dim=0, dtype=torch.float64)
    release_freed_memory()
    if x.is_inference():  # no version counter: an in-place change could not be seen, so no cache
        _last_sums = None
        return s
    try:
        _last_sums = (weakref.ref(x), x._version, s)
    except TypeError:  # pragma: no cover - a tensor type without weak references
        _last_sums = None
    return s


class ChannelStatsObserver:
    """Per-input-channel mean |x| of one linear layer's input, accumulated in float64.

    Also counts rows and remembers whether a non-finite value was seen (with the batch index),
    so convert can name the layer instead of producing NaN scales. Observers of linears that
    read the same tensor (q/k/v, gate/up) compute its sums once.
    """

    def __init__(self, name: str, in_features: int) -> None:
        self.name = name
        self.in_features = in_features
        self.abs_sum: torch.Tensor | None = None
        self.rows = 0
        self.calls = 0
        self.nonfinite_call: int | None = None
        self.enabled = True

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if not self.enabled or not args or not isinstance(args[0], torch.Tensor):
            return
        x = args[0]
        self.calls += 1
        if x.shape[-1] != self.in_features or x.numel() == 0:
            return
        s = abs_column_sums(x, self.in_features)
        if not torch.isfinite(s).all():
            if self.nonfinite_call is None:
                self.nonfinite_call = self.calls
            return
        self.abs_sum = s if self.abs_sum is None else self.abs_sum + s
        self.rows += x.numel() // self.in_features

    def mean_abs(self) -> torch.Tensor | None:
        """Mean |x| per input channel (float64), or ``None`` if nothing was observed."""
        if self.abs_sum is None or self.rows == 0:
            return None
        return self.abs_sum / self.rows


@dataclass
class RecordedCall:
    """One recorded call of the root module: ``args``/``kwargs`` with tensors detached."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    rows: int


@dataclass
class RootCallRecorder:
    """Keeps the first root calls until ``max_rows`` batch rows are stored.

    The first call is used to capture the graph; the stored calls form the (bounded) sample
    that convert replays for the scale and clipping search.
    """

    max_rows: int
    calls: list[RecordedCall] = field(default_factory=list)
    rows: int = 0
    total_calls: int = 0
    enabled: bool = True
    #: raise :class:`CallRecorded` instead of letting the forward run (``awq_ao.quantize`` with
    #: ``channel_stats="sample"``: nothing of the full-model forward is needed)
    record_only: bool = False

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.total_calls += 1
        if self.rows < self.max_rows or not self.calls:
            t = first_tensor((args, kwargs))
            rows = int(t.shape[0]) if t is not None and t.dim() > 0 else 1
            self.calls.append(RecordedCall(_detach_tree(args), _detach_tree(dict(kwargs)), rows))
            self.rows += rows
        if self.record_only:
            raise CallRecorded("awq_ao: a record-only calibration call (channel_stats='sample') ended here")


class CallRecorded(Exception):
    """Ends a calibration call once the root recorder has what it needs (record-only mode)."""


HookFn = Callable[..., Any]
