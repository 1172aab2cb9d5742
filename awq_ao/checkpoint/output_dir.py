"""Which folders a save may write or replace (checked before any work, and again when the save
commits).

Only a folder awq_ao wrote (marker present) or an empty one is replaced, never the current
directory or a parent of it, the home directory, the filesystem root, or the folder the model
was loaded from. Split out of :mod:`awq_ao.checkpoint.atomic_dir`, which re-exports these names.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from awq_ao.checkpoint.formats import MARKER_NAME
from awq_ao.checkpoint.marker import has_marker

__all__ = ["check_output_dir", "source_dirs"]


def _is_empty_dir(p: Path) -> bool:
    try:
        with os.scandir(p) as it:
            return next(it, None) is None
    except OSError:
        return False


def source_dirs(*objs: Any) -> list[Path]:
    """Local folders the model / tokenizer were loaded from (``name_or_path``), if any."""
    out = []
    for obj in objs:
        for holder in (obj, getattr(obj, "config", None)):
            for attr in ("name_or_path", "_name_or_path"):
                v = getattr(holder, attr, None) if holder is not None else None
                if isinstance(v, (str, os.PathLike)) and str(v).strip():
                    p = Path(v).expanduser()
                    if p.is_dir():
                        out.append(p)
    return out


def _protected_reason(target: Path, sources: tuple[Path, ...] | list[Path]) -> str | None:
    """Why ``target`` must never be replaced whatever it holds, or None."""
    real = target.resolve()
    if real.parent == real:
        return "it is the filesystem root"
    try:
        cwd: Path | None = Path.cwd().resolve()
    except OSError:
        cwd = None
    if cwd is not None and real == cwd:
        return "it is the current directory"
    if cwd is not None and real in cwd.parents:
        return f"it is a parent of the current directory ({cwd})"
    try:
        home: Path | None = Path.home().resolve()
    except (OSError, RuntimeError):
        home = None
    if home is not None and real == home:
        return "it is your home directory"
    if home is not None and real in home.parents:
        return f"it contains your home directory ({home})"
    for s in sources:
        sr = Path(s).expanduser().resolve()
        if real == sr:
            return "it is the folder the model (or its tokenizer) was loaded from"
        if real in sr.parents:
            return f"it contains the folder the model was loaded from ({sr})"
    return None


def _replace_refusal(target: Path, sources: tuple[Path, ...] | list[Path]) -> str | None:
    """Why an existing ``target`` may not be replaced with ``overwrite=True``, or None."""
    reason = _protected_reason(target, sources)
    if reason is not None:
        return reason
    if target.is_symlink():
        return "it is a symbolic link"
    if not target.is_dir():
        return "it exists and is not a directory"
    if _is_empty_dir(target) or has_marker(target):
        return None
    return (
        f"it has no {MARKER_NAME} marker, so awq_ao did not write it (it does not look like a "
        "model directory saved by awq_ao); remove it yourself or choose another folder"
    )


def check_output_dir(
    out_dir: str | os.PathLike, overwrite: bool, sources: tuple[Path, ...] | list[Path] = ()
) -> Path:
    """Validate the target of a save early (before expensive work); returns it as a Path.

    ``sources`` are folders the model was loaded from: never replaced. The same checks are
    made again, atomically with the final rename, when the save commits.

    Raises:
        FileExistsError: the target exists and ``overwrite`` is False, or ``overwrite`` is
            True but the target may not be replaced (see :func:`save_quantized`).
    """
    target = Path(out_dir).expanduser().absolute()
    if os.path.lexists(target):
        if not overwrite:
            raise FileExistsError(f"{target} already exists; pass overwrite=True (--overwrite) to replace it.")
        reason = _replace_refusal(target, sources)
        if reason is not None:
            raise FileExistsError(f"refusing to overwrite {target}: {reason}. Nothing was changed.")
    return target
