"""Peak resident memory of a phase of this process (Linux).

``ru_maxrss`` is the peak over the whole process lifetime, so it also counts loading or
building the model (a float32 build cast to bfloat16 peaks at three times the bf16 size).
Writing ``5`` to ``/proc/self/clear_refs`` resets the kernel's high-water mark ``VmHWM``
to the current RSS; the peak of a phase is ``VmHWM`` read at its end.
"""

from __future__ import annotations

import resource
from pathlib import Path


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def current_mib() -> float:
    """Resident memory now."""
    return _status_kib("VmRSS") / 1024.0


def reset_peak() -> str:
    """Start a new peak measurement; returns how the peak will be measured."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return "VmHWM reset at the start of the phase"
    except OSError:
        return "ru_maxrss (process lifetime: includes loading the model)"


def peak_mib() -> float:
    """Peak resident memory since :func:`reset_peak` (or the process start if it could not reset)."""
    try:
        return _status_kib("VmHWM") / 1024.0
    except (OSError, RuntimeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
