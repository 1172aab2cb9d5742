"""The benchmarks' machine record (``benchmarks/machine.py``) for the devtools' result files."""

from __future__ import annotations

import sys
from pathlib import Path

_BENCHMARKS = str(Path(__file__).resolve().parent.parent / "benchmarks")


def machine_info() -> dict:
    """CPU model, ISA flags, memory, torch threads and library versions of this machine."""
    if _BENCHMARKS not in sys.path:
        sys.path.insert(0, _BENCHMARKS)
    from machine import machine_info as info

    return info()
