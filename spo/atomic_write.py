"""Atomic outputs: a stage produces all of its outputs or none, so DVC/KFP never cache half a result.

An output dir has one writer at a time: `output_lock` holds `flock` on `.NAME.lock` beside it (the
kernel drops it when the holder dies, however it dies), so a second writer (an orphaned stage of a
killed `dvc`, a second `dvc repro`) fails at once, naming the dir and the holder's pid. Holding the
lock, `atomic_dir` removes the `.NAME.tmp-*` / `.NAME.old-*` siblings an interrupted writer left.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)
NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)  # e.g. some network/FUSE mounts
_HELD: dict[Path, int] = {}  # lock file -> how many `output_lock` blocks of this process hold it


class OutputLockedError(RuntimeError):
    """Another live process is writing the same output."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def lock_path(final: str | Path) -> Path:
    final = Path(final)
    return final.parent / f".{final.name}.lock"


@contextmanager
def output_lock(final: str | Path) -> Iterator[bool]:
    """Hold the write lock of `final` (re-entrant within a process); raise OutputLockedError if taken.
    Yields False where the file system has no locks (then nothing is guarded)."""
    path = lock_path(final).absolute()
    if path in _HELD:
        _HELD[path] += 1
        try:
            yield True
        finally:
            _HELD[path] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    # the file stays when released: unlinking it would let two writers lock two different inodes
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise OutputLockedError(f"{final} is being written by another process (pid {holder}); "
                                "wait for it to end or stop it") from None
    except OSError as err:
        os.close(fd)
        if err.errno not in NO_LOCKS:
            raise
        log.warning("%s: this file system has no locks (%s): not guarding against a second writer", path, err)
        yield False
        return
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[path] = 1
    try:
        yield True
    finally:
        _HELD[path] -= 1
        if not _HELD[path]:
            del _HELD[path]
            os.close(fd)  # closing the last descriptor releases the flock


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_leftovers(final: Path, *, all_writers: bool) -> None:
    """The `.NAME.tmp-PID-*` / `.NAME.old-PID` siblings of `final` that interrupted writers left: all
    of them when the caller holds the lock (none is live), else only those whose process is gone."""
    for kind in ("tmp", "old"):
        prefix = f".{final.name}.{kind}-"
        for path in final.parent.glob(f"{glob.escape(prefix)}*"):
            pid = path.name.removeprefix(prefix).split("-", 1)[0]
            if not all_writers and not (pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid))):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _carry_gitignores(old: Path, new: Path) -> None:
    """Keep the `.gitignore` files DVC wrote inside the dir being replaced (it lists the outs there)."""
    for path in old.rglob(".gitignore"):
        target = new / path.relative_to(old)
        if target.parent.is_dir() and not target.exists():
            shutil.copy2(path, target)


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `final`, on error it is removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(final) as exclusive:
        _remove_leftovers(final, all_writers=exclusive)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if final.exists():
            _carry_gitignores(final, tmp)
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)


@contextmanager
def atomic_file(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path to write; it is renamed over `final` only on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(final, all_writers=False)  # no lock for single files: live writers' temp files stay
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent)
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it 0600
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, final)


def write_json(path: str | Path, data: object) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
