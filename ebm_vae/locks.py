"""A lock per output, so that two processes never interleave their writes of one output.

    with output_lock(index_dir, "the crawl of /data"):            # exclusive; others wait
        ...
    with output_lock(index_dir, "reading the index", shared=True):  # many readers, no writer
        ...
    with output_lock(ckpt_dir, "training grid", wait=False, advice="..."):  # refuse if held
        ...

The lock of `DIR/NAME` is the hidden file `DIR/.NAME.lock`, locked with a POSIX record lock
(`fcntl.lockf`: released by the kernel when its holder dies, so a killed run never leaves a
stale lock; not inherited by forked workers; honoured over NFS) and removed by the last
holder. An exclusive holder writes who it is into the file; a process that has to wait says
once whom it waits for. A process may take a lock it already holds (the crawl inside a
training run's index read). Without file locks (a file system that has none, a folder this
process may not write, such as a read-only index it only reads) the block runs unlocked.

The code of this module never opens a lock file that its own process holds (a POSIX lock
ends when its process closes any descriptor of the file).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from ebm_vae.errors import UserError

try:
    import fcntl
except ImportError:  # not POSIX: no locks
    fcntl = None

log = logging.getLogger(__name__)

POLL_S = 0.2  # how often a waiting process tries again
_held: dict[Path, list] = {}  # lock file -> [fd, depth, shared] of this process's locks
_unsupported_warned = False


class LockedError(UserError):
    """The output is in use by another process and this one does not wait for it."""


def lock_path(target: str | os.PathLike) -> Path:
    target = Path(target).absolute()
    return target.parent / f".{target.name}.lock"


@contextlib.contextmanager
def output_lock(target: str | os.PathLike, purpose: str, *, shared: bool = False, wait: bool = True,
                advice: str = "") -> Iterator[None]:
    """Hold the lock of `target` (a file or folder, existing or not) for the block.

    `purpose` says what this process does with it (shown to a process that waits for it);
    `wait=False` raises `LockedError` naming the holder, and `advice`, instead of waiting.
    A shared lock whose folder does not exist yet is not taken: there is nothing to read.
    """
    path = lock_path(target)
    if path in _held:  # re-entrant within a process (an exclusive hold covers a shared one)
        if _held[path][2] and not shared:
            raise RuntimeError(f"{path}: an exclusive lock inside a shared one of the same process")
        _held[path][1] += 1
        try:
            yield
        finally:
            _held[path][1] -= 1
        return
    if fcntl is None or (shared and not path.parent.is_dir()):
        yield
        return
    fd = _acquire(Path(target), path, purpose, shared, wait, advice)
    if fd is None:  # no locks on this file system
        yield
        return
    _held[path] = [fd, 1, shared]
    try:
        yield
    finally:
        del _held[path]
        _release(path, fd)


def _acquire(target: Path, path: Path, purpose: str, shared: bool, wait: bool, advice: str) -> int | None:
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    started, told = time.monotonic(), False
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:  # e.g. reading an index on a read-only share
            if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            if not shared:  # a write there fails on its own, naming the output
                _warn_unsupported(path, exc)
            return None
        try:
            fcntl.lockf(fd, mode | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                _warn_unsupported(path, exc)
                return None
            holder = _holder(path)
            if not wait:
                raise LockedError(f"{target} is in use by {holder}"
                                  + (f"; {advice}" if advice else "")) from None
            if not told:
                log.warning("waiting for %s: in use by %s", target, holder)
                told = True
            time.sleep(POLL_S)
            continue
        # The last holder removes the file: a lock on a file no longer at `path` is no lock.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        if told:
            log.warning("%s is free after %.0f s: %s goes on", target, time.monotonic() - started, purpose)
        if not shared:
            _describe_holder(fd, purpose)
        return fd


def _release(path: Path, fd: int) -> None:
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # nobody else holds it: remove the file
        path.unlink(missing_ok=True)
    except OSError:
        pass  # other readers still hold it; the last one removes it
    finally:
        os.close(fd)  # releases the lock


def _describe_holder(fd: int, purpose: str) -> None:
    info = {"pid": os.getpid(), "host": socket.gethostname(), "purpose": purpose,
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "",
            "since": dt.datetime.now().astimezone().isoformat(timespec="seconds")}
    with contextlib.suppress(OSError):  # only a courtesy to a process that waits
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return (f"{info['purpose']} ({info['command']}, pid {info['pid']} on {info['host']}, "
                f"since {info['since']})")
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (reading it)"


def _warn_unsupported(path: Path, exc: OSError) -> None:
    global _unsupported_warned
    if not _unsupported_warned:
        log.warning("cannot lock %s (%s): two runs on the same outputs are not kept apart here",
                    path, exc.strerror or exc)
        _unsupported_warned = True
