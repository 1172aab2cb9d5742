"""Handing freed heap memory back to the operating system (glibc ``malloc_trim``)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any


@functools.cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None where the C library has none."""
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc's ``malloc_trim``; no-op elsewhere).

    glibc keeps freed pages resident when live allocations sit above them in the heap, so
    the many same-sized activation temporaries of a forward pass, or of one block's search,
    can leave hundreds of MiB resident that nothing uses. Sequential convert calls this
    after each block's search and after each block; the activation observers after each
    observed call.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
