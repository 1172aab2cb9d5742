"""Atomic checkpoint folders: write beside the target, then claim or swap it in one step.

:func:`atomic_directory` is how every save writes: a hidden temporary folder beside the target
that carries awq_ao's marker file from the start (locked while the save runs), fsynced and
then moved into place with ``renameat2`` (``RENAME_NOREPLACE`` for a new target,
``RENAME_EXCHANGE`` to replace one; two plain renames where the syscall is missing).
:func:`check_output_dir` says up front whether a target may be written or replaced: only a
folder awq_ao wrote (marker present) or an empty one, never the current directory or a parent
of it, the home directory, the filesystem root, or the model's own source folder. Leftovers
of killed saves are cleaned at the next save to the same target.
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

from awq_ao.checkpoint.formats import FORMAT_AWQ_AO, MARKER_NAME, MARKER_VERSION

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


# ---- what may be replaced -------------------------------------------------------------------


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


# ---- locks, removal, leftovers ----------------------------------------------------------------


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
