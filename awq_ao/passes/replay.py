"""Replaying a recorded module call when its arguments hold mutable cache state.

The scale search records a module's ``(args, kwargs)`` in a forward pre-hook and replays
``module(*args, **kwargs)`` several times after the real call. That is only correct if the
call does not change its own arguments. A transformers KV cache (any
``transformers.cache_utils.Cache``, e.g. the ``EncoderDecoderCache`` that some models build
even with ``use_cache=False``) is updated in place by attention: after the real call it
holds this call's keys/values, so a replay would attend over them twice (and every replay
would add more).

:func:`snapshot_call` deep-copies such state objects when the call is recorded (before the
real call mutates them); :func:`replay_call` runs the module on a fresh copy of the snapshot
each time, so every replay sees exactly what the real call saw and the real cache is never
touched by a replay. Calls without cache objects are passed through without any copy.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["is_call_state", "snapshot_call", "replay_call"]


def _cache_types() -> tuple[type, ...]:
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover - transformers not installed
        return ()
    return (Cache,)


def is_call_state(obj: Any) -> bool:
    """True for an argument object that a forward call mutates in place (a transformers cache)."""
    types = _cache_types()
    return bool(types) and isinstance(obj, types)


def _has_state(obj: Any) -> bool:
    if is_call_state(obj):
        return True
    if isinstance(obj, (tuple, list)):
        return any(_has_state(o) for o in obj)
    if isinstance(obj, dict):
        return any(_has_state(o) for o in obj.values())
    return False


def _copy_state(obj: Any) -> Any:
    if is_call_state(obj):
        return copy.deepcopy(obj)
    if isinstance(obj, tuple) and _has_state(obj):
        items = [_copy_state(o) for o in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    if isinstance(obj, list) and _has_state(obj):
        return [_copy_state(o) for o in obj]
    if isinstance(obj, dict) and _has_state(obj):
        return {k: _copy_state(v) for k, v in obj.items()}
    return obj


def snapshot_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` with every cache object (also inside tuples/lists/dicts) deep-copied.

    Call it in a forward pre-hook, before the real call mutates the caches. Tensors and other
    arguments are shared, not copied; without cache objects the inputs are returned as they are.
    """
    if not _has_state(args) and not _has_state(kwargs):
        return args, kwargs
    return _copy_state(args), _copy_state(kwargs)


def replay_call(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Callable[[], Any]:
    """A function running ``module(*args, **kwargs)`` on a fresh copy of the cache objects of a
    call recorded with :func:`snapshot_call`, so it can be called any number of times."""
    if not _has_state(args) and not _has_state(kwargs):
        return lambda: module(*args, **kwargs)

    def run() -> Any:
        a, kw = snapshot_call(args, kwargs)
        return module(*a, **kw)

    return run
