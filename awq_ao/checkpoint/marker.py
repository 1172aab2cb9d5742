"""awq_ao's marker file (:data:`~awq_ao.checkpoint.formats.MARKER_NAME`): what it holds, whether
a folder carries it, and its lock.

Every save writes the marker into its temporary folder first and keeps it locked (``flock``)
while the save runs, so a folder with an unlocked marker beside a target is a leftover of a
killed save. Split out of :mod:`awq_ao.checkpoint.atomic_dir`, which re-exports these names.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from awq_ao.checkpoint.formats import MARKER_NAME, MARKER_VERSION

__all__ = ["has_marker"]


def _marker_json(fmt: str) -> dict[str, Any]:
    from awq_ao import __version__

    return {"writer": "awq_ao", "format": fmt, "version": MARKER_VERSION, "awq_ao_version": __version__}


def has_marker(d: str | os.PathLike) -> bool:
    """True if folder ``d`` carries awq_ao's marker file (:data:`MARKER_NAME`): awq_ao wrote it."""
    p = Path(d) / MARKER_NAME
    try:
        if p.is_symlink() or not p.is_file() or p.stat().st_size > 4096:
            return False
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and data.get("writer") == "awq_ao" and isinstance(data.get("version"), int)


def _flock(fd: int, blocking: bool) -> bool | None:
    """Exclusive flock on ``fd``: True if taken, False if another holder has it (non-blocking),
    None if locks are not supported here."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        return True
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return None


def _lock_marker(d: Path, timeout_s: float = 30.0) -> int | None:
    """Open and lock ``d``'s marker (a folder being replaced, so that no other save takes it
    for a leftover while this one moves it); the fd, or None."""
    try:
        fd = os.open(d / MARKER_NAME, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    deadline = time.monotonic() + timeout_s
    while _flock(fd, blocking=False) is False:  # held by a save that is just finishing
        if time.monotonic() > deadline:
            break  # proceed unlocked rather than hang
        time.sleep(0.01)
    return fd


def _write_marker(d: Path, fmt: str) -> int:
    """Create ``d``'s marker, locked for as long as the returned fd stays open. The lock is
    taken before the content is written, so the marker never looks valid unlocked while the
    save that writes it is alive."""
    fd = os.open(d / MARKER_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        _flock(fd, blocking=True)
        os.write(fd, (json.dumps(_marker_json(fmt), sort_keys=True) + "\n").encode())
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd
