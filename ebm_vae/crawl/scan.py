"""Walk a data tree: every visible regular file once, with its size and mtime, nothing opened.

Hidden files and folders (a leading dot) are skipped. Symbolic links are followed only when
they resolve inside the root; a directory is entered once, identified by (st_dev, st_ino),
which stops symlink loops. Real entries are walked before symlinked ones, so a file reachable
both ways is listed under its real path (and counted once: files are deduplicated the same way).
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FoundFile:
    relpath: str  # POSIX, relative to the root
    size: int
    mtime_ns: int


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def scan(root: str | Path) -> Iterator[FoundFile]:
    """Yield the files under `root` (real entries first, then symlinked ones inside the root)."""
    real_root = os.path.realpath(root)
    seen_dirs: set[tuple[int, int]] = set()
    seen_files: set[tuple[int, int]] = set()
    deferred: list[tuple[str, str]] = []  # (relpath, path) of symlinks, visited after real entries

    def visit_file(relpath: str, st: os.stat_result) -> FoundFile | None:
        key = (st.st_dev, st.st_ino)
        if key in seen_files:
            return None
        seen_files.add(key)
        return FoundFile(relpath, st.st_size, st.st_mtime_ns)

    def walk(top: str, rel_top: str) -> Iterator[FoundFile]:
        """Depth-first with an explicit stack (no recursion limit on deep trees)."""
        stack = [(top, rel_top)]
        while stack:
            dir_path, rel_dir = stack.pop()
            try:
                st = os.stat(dir_path)
                if (st.st_dev, st.st_ino) in seen_dirs:
                    continue  # a loop, or a folder already walked under another name
                seen_dirs.add((st.st_dev, st.st_ino))
                with os.scandir(dir_path) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError as exc:
                log.warning("skipping %s: %s", dir_path, exc.strerror or exc)
                continue
            subdirs = []
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                relpath = f"{rel_dir}{entry.name}"
                try:
                    if entry.is_symlink():
                        deferred.append((relpath, entry.path))
                    elif entry.is_dir(follow_symlinks=False):
                        subdirs.append((entry.path, relpath + "/"))
                    elif entry.is_file(follow_symlinks=False):
                        found = visit_file(relpath, entry.stat(follow_symlinks=False))
                        if found is not None:
                            yield found
                except OSError as exc:  # vanished or unreadable while walking
                    log.warning("skipping %s: %s", entry.path, exc.strerror or exc)
            stack.extend(reversed(subdirs))

    yield from walk(real_root, "")
    while deferred:
        relpath, path = deferred.pop(0)
        target = os.path.realpath(path)
        if not _inside(target, real_root):
            log.info("not following %s: it leads outside the data root (%s)", relpath, target)
            continue
        try:
            st = os.stat(target)
        except OSError:
            log.info("not following %s: broken link", relpath)
            continue
        if stat.S_ISDIR(st.st_mode):
            yield from walk(target, relpath + "/")
        elif stat.S_ISREG(st.st_mode):
            found = visit_file(relpath, st)
            if found is not None:
                yield found
