"""Per-model bookkeeping shared by prepare and convert (stored on the root module)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from awq_ao.observers.activation import ChannelStatsObserver, RootCallRecorder

_ATTR = "_awq_ao_state"


@dataclass
class AWQState:
    """What prepare attached to a model and what convert produced."""

    phase: str = "new"  # "prepared" | "converted"
    observers: dict[str, ChannelStatsObserver] = field(default_factory=dict)
    recorder: RootCallRecorder | None = None
    handles: list[Any] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    report: Any = None

    def remove_hooks(self) -> None:
        """Detach every hook prepare registered."""
        for h in self.handles:
            h.remove()
        self.handles.clear()


def get_state(model: nn.Module) -> AWQState | None:
    """The awq_ao state attached to ``model`` (``None`` if never prepared)."""
    return model.__dict__.get(_ATTR)


def set_state(model: nn.Module, state: AWQState | None) -> None:
    """Attach (or with ``None`` remove) the awq_ao state of ``model``."""
    if state is None:
        model.__dict__.pop(_ATTR, None)
    else:
        model.__dict__[_ATTR] = state
