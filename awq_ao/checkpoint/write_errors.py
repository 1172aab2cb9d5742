"""The one error every failed write of :func:`~awq_ao.checkpoint.save.save_quantized` becomes.

Split out of :mod:`awq_ao.checkpoint.save`, which re-exports :func:`_write_error`.
"""

from __future__ import annotations

import errno
import re
import shutil
from pathlib import Path

from awq_ao.checkpoint.formats import CheckpointWriteError


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _errno_of(e: BaseException) -> int:
    if isinstance(e, OSError) and e.errno:
        return int(e.errno)
    m = re.search(r"os error (\d+)|code: (\d+)", str(e))  # safetensors: "... (os error 28)"
    if m:
        return int(m.group(1) or m.group(2))
    if "no space left" in str(e).lower():
        return errno.ENOSPC
    return errno.EIO


def _write_error(target: Path, e: BaseException, needed: int) -> CheckpointWriteError:
    """The one error every failed write becomes: names the folder, the cause and, for a full
    disk, the space the checkpoint needs."""
    code = _errno_of(e)
    untouched = "nothing was written (any previous directory there is unchanged)"
    if code == errno.ENOSPC:
        try:
            free = f", {_human_bytes(shutil.disk_usage(_existing_parent(target)).free)} free"
        except OSError:
            free = ""
        return CheckpointWriteError(
            code,
            f"no space left on device while saving to {target} (the checkpoint needs about "
            f"{_human_bytes(needed)}{free}); {untouched}",
        )
    cause = " ".join(str(e).split()) or type(e).__name__
    return CheckpointWriteError(code, f"cannot save to {target}: {cause}; {untouched}")


def _existing_parent(p: Path) -> Path:
    while not p.exists() and p.parent != p:
        p = p.parent
    return p
