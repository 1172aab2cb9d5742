"""Atomic checkpoint folders: write beside the target, then claim or swap it in one step.

:func:`atomic_directory` is how every save writes: a hidden temporary folder beside the target
that carries awq_ao's marker file from the start (locked while the save runs), fsynced and
then moved into place with ``renameat2`` (``RENAME_NOREPLACE`` for a new target,
``RENAME_EXCHANGE`` to replace one; two plain renames where the syscall is missing).
:func:`check_output_dir` says up front whether a target may be written or replaced: only a
folder awq_ao wrote (marker present) or an empty one, never the current directory or a parent
of it, the home directory, the filesystem root, or the model's own source folder. Leftovers
of killed saves are cleaned at the next save to the same target.

The marker file and its lock are in :mod:`~awq_ao.checkpoint.marker` and the checks of what
may be replaced in :mod:`~awq_ao.checkpoint.output_dir`; their names are re-exported here.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from awq_ao.checkpoint.formats import FORMAT_AWQ_AO, MARKER_NAME
from awq_ao.checkpoint.marker import _flock, _lock_marker, _write_marker, has_marker
from awq_ao.checkpoint.output_dir import (
    _is_empty_dir,
    _replace_refusal,
    check_output_dir,
    source_dirs,
)

__all__ = ["atomic_directory", "check_output_dir", "current_umask", "fsync_path", "has_marker", "source_dirs", "write_json"]




def fsync_path(path: Path) -> None:
    """fsync a file or directory (its entries reach the disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process umask (read without changing it for longer than the call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON with sorted keys (reproducible files)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


# ---- renameat2 --------------------------------------------------------------------------------

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


def _load_renameat2() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2  # glibc >= 2.28
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


#: libc's ``renameat2`` (Linux), or None where it is missing: then the two-rename fallback runs.
_RENAMEAT2 = _load_renameat2()


class _NoRenameat2(Exception):
    """``renameat2`` (or the flag, on this filesystem) is not available."""


def _rename2(src: Path, dst: Path, flags: int) -> None:
    fn = _RENAMEAT2
    if fn is None:
        raise _NoRenameat2
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        raise _NoRenameat2
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


# ---- removal, leftovers ----------------------------------------------------------------------


def _remove_tree(p: Path) -> None:
    """Delete a folder awq_ao owns, its marker last (so a deletion cut short by a kill still
    carries the marker and is recognised as a leftover by the next save)."""
    try:
        entries = list(os.scandir(p))
    except OSError:
        return
    for e in entries:
        if e.name == MARKER_NAME:
            continue
        try:
            if e.is_dir(follow_symlinks=False):
                shutil.rmtree(e.path, ignore_errors=True)
            else:
                os.unlink(e.path)
        except OSError:
            pass
    shutil.rmtree(p, ignore_errors=True)


def _leftover_pattern(target: Path) -> re.Pattern[str]:
    return re.compile(rf"^\.{re.escape(target.name)}\.(?:tmp|old)-[A-Za-z0-9_]+$")


#: An empty (or marker-only, marker unfinished) leftover folder is removed only once it is this
#: old: a live save has such a folder for the microseconds between ``mkdtemp`` and its marker.
_EMPTY_LEFTOVER_AGE_S = 10.0


def _unfinished_leftover(p: Path) -> bool:
    """True for a pattern-named folder a save was killed in before its marker was complete (or
    after deleting it): nothing in it but, at most, an unfinished marker; and old enough."""
    try:
        names = os.listdir(p)
        age = time.time() - p.stat().st_mtime
    except OSError:
        return False
    if age < _EMPTY_LEFTOVER_AGE_S:
        return False
    return not names or (names == [MARKER_NAME] and (p / MARKER_NAME).stat().st_size < 4096 and not has_marker(p))


def _clean_leftovers(target: Path) -> list[Path]:
    """Remove ``.<name>.tmp-*`` / ``.<name>.old-*`` folders beside ``target`` left by killed
    saves: those with awq_ao's marker whose marker no live save holds locked, and (after
    :data:`_EMPTY_LEFTOVER_AGE_S`) those holding nothing but an unfinished marker. Returns what
    was removed."""
    pat = _leftover_pattern(target)
    removed = []
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return removed
    for e in entries:
        if not pat.match(e.name) or not e.is_dir(follow_symlinks=False):
            continue
        p = Path(e.path)
        if not has_marker(p):
            if _unfinished_leftover(p):
                with contextlib.suppress(OSError):
                    (p / MARKER_NAME).unlink(missing_ok=True)
                    os.rmdir(p)  # fails (harmlessly) if anything appeared in it
                    removed.append(p)
            continue
        try:
            fd = os.open(p / MARKER_NAME, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            if _flock(fd, blocking=False) is True:  # nobody holds it: the save that made it is gone
                _remove_tree(p)
                removed.append(p)
        finally:
            os.close(fd)
    return removed


# ---- committing the new folder --------------------------------------------------------------


def _appeared_error(target: Path) -> FileExistsError:
    return FileExistsError(
        f"{target} appeared while saving (another save or program created it) and was left as "
        "it is; nothing was written. Pass overwrite=True (--overwrite) to replace a checkpoint."
    )


def _claim(tmp: Path, target: Path) -> None:
    """Move ``tmp`` to a ``target`` that must not exist (not even as an empty folder)."""
    try:
        _rename2(tmp, target, _RENAME_NOREPLACE)
        return
    except _NoRenameat2:
        pass
    # fallback: claim the name with mkdir (atomic, fails if anything is there), then rename
    # onto the empty folder this process just made
    os.mkdir(target)
    try:
        os.rename(tmp, target)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.rmdir(target)  # only if still empty: never removes what someone put there
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise FileExistsError(errno.EEXIST, str(_appeared_error(target))) from e
        raise


def _replace(tmp: Path, target: Path, sources: tuple[Path, ...] | list[Path]) -> bool:
    """Replace the existing ``target`` by ``tmp``; False if ``target`` vanished meanwhile.

    With ``renameat2(RENAME_EXCHANGE)`` the two folders swap in one step, so ``target`` is
    the complete old or the complete new checkpoint at every instant; the old one (now at
    ``tmp``) is then deleted. Without it (not Linux, old kernel or libc, or a filesystem that
    lacks the flag) two renames are used: ``target`` -> ``.<name>.old-*``, ``tmp`` ->
    ``target``, with a short window in which ``target`` does not exist (a crash there leaves
    the old checkpoint in the ``.old-*`` folder, which the next save removes).
    """
    reason = _replace_refusal(target, sources)
    if reason is not None:
        raise FileExistsError(f"refusing to overwrite {target}: {reason}. Nothing was changed.")
    guard = _lock_marker(target)  # the old checkpoint is ours to delete, not a leftover
    try:
        try:
            _rename2(tmp, target, _RENAME_EXCHANGE)
            old = tmp
        except _NoRenameat2:
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:12]}"
            try:
                os.rename(target, old)
            except FileNotFoundError:
                return False
            if not (_is_empty_dir(old) or has_marker(old)):
                os.rename(old, target)
                raise FileExistsError(
                    f"refusing to overwrite {target}: it was replaced by a folder awq_ao did not write "
                    "while saving; it was left as it is."
                ) from None
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(old, target)
                raise
        except FileNotFoundError:
            return False
        else:
            if old == tmp and not (_is_empty_dir(old) or has_marker(old)):
                # someone put a foreign folder at the target after the check: swap it back
                try:
                    _rename2(tmp, target, _RENAME_EXCHANGE)
                except (OSError, _NoRenameat2) as e:
                    raise _Stranded(
                        f"a folder awq_ao did not write appeared at {target} while saving; it is now at "
                        f"{tmp} (move it back yourself) and the new checkpoint is at {target}."
                    ) from e
                raise FileExistsError(
                    f"refusing to overwrite {target}: it was replaced by a folder awq_ao did not write "
                    "while saving; it was left as it is."
                )
        _remove_tree(old)
        return True
    finally:
        if guard is not None:
            os.close(guard)


class _Stranded(FileExistsError):
    """A foreign folder ended up in our temporary folder: it must not be deleted."""


def _commit(tmp: Path, target: Path, overwrite: bool, sources: tuple[Path, ...] | list[Path]) -> None:
    """Move ``tmp`` to ``target``: the claim itself is the existence check (no check-then-act)."""
    for _ in range(8):
        try:
            _claim(tmp, target)
            return
        except FileExistsError:
            if not overwrite:
                raise _appeared_error(target) from None
        if _replace(tmp, target, sources):  # something is there: replace it if allowed
            return
    raise FileExistsError(f"{target} kept changing while saving; nothing was written.")


@contextmanager
def atomic_directory(
    out_dir: str | os.PathLike,
    overwrite: bool = False,
    format: str = FORMAT_AWQ_AO,
    sources: tuple[Path, ...] | list[Path] = (),
) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``out_dir``; on success it becomes ``out_dir``.

    Files are written into ``.<name>.tmp-XXXX`` in the same parent (so the final rename stays
    on one filesystem), which carries awq_ao's marker (:data:`MARKER_NAME`) from the start,
    locked while this save runs. On success the folder is fsynced and moved into place:

    * new target (``overwrite`` False, or nothing there): ``renameat2(RENAME_NOREPLACE)``, so
      the claim is atomic: a folder (even an empty one) that appeared at the target meanwhile
      is never replaced; this save then fails with :class:`FileExistsError`. Where the syscall
      is missing the name is claimed with ``os.mkdir`` first (also atomic).
    * existing target (``overwrite`` True): only a folder with the marker, or an empty one, and
      never the current directory or one of its parents, the home directory, the filesystem
      root, or one of ``sources``. The two folders are swapped with
      ``renameat2(RENAME_EXCHANGE)``: at every instant the target is the complete old or the
      complete new checkpoint. Where the syscall is missing, two renames are used instead
      (see :func:`_replace`).

    On any error the temporary directory is removed and the target is left untouched. Leftover
    ``.<name>.tmp-*`` / ``.<name>.old-*`` folders of killed saves (marker present and not
    locked by a live save) are removed at the start of the next save to the same target.
    """
    target = check_output_dir(out_dir, overwrite, sources)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
    lock_fd: int | None = None
    owned = True  # whatever is at tmp may be deleted on failure
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it 0700; a saved model should look like any dir
        lock_fd = _write_marker(tmp, format)
        yield tmp
        fsync_path(tmp)
        try:
            _commit(tmp, target, overwrite, sources)
        except _Stranded:
            owned = False
            raise
        fsync_path(parent)
    except BaseException:
        if owned:
            _remove_tree(tmp)
        raise
    finally:
        if lock_fd is not None:
            os.close(lock_fd)
