"""Atomic output: every artefact is written to a temporary sibling and renamed into place.

A reader (or a crash) therefore sees the old file or the new one, never half of one. Each
write holds the output's lock (`ebm_vae.locks`), so a temporary exists only while its writer
holds that lock: the next write of the output removes any temporary that a killed writer left.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ebm_vae.locks import output_lock


class OutputError(OSError):
    """An output that could not be written (a full disk, a lost mount, permissions); names it."""


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success fsync it and rename it over `target`.

    On any exception the temporary file is removed and `target` is left untouched; an OSError
    (a full disk, a lost mount) is raised again as `OutputError` naming `target`, which the
    library's message lacks.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = suffix if suffix is not None else target.suffix + ".tmp"
    with output_lock(target, f"writing {target.name}"):
        _remove_leftovers(target, suffix)
        tmp_path = target.parent / f".{target.name}.{secrets.token_hex(6)}{suffix}"
        # Not mkstemp: its files are 0600 and keep that through the rename, so colleagues could
        # not read a shared index or map; mode 0o666 under the umask is what a plain open() gives.
        os.close(os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        try:
            yield tmp_path
            with open(tmp_path, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp_path, target)
        except OSError as exc:
            tmp_path.unlink(missing_ok=True)
            if isinstance(exc, OutputError):
                raise
            message = f"cannot write {target}: {exc.strerror or exc}"
            raise (OutputError(exc.errno, message) if exc.errno else OutputError(message)) from exc
        except BaseException:
            tmp_path.unlink(missing_ok=True)
            raise


def _remove_leftovers(target: Path, suffix: str) -> None:
    """Temporaries of `target` left by a killed writer (the caller holds the output's lock)."""
    pattern = re.compile(re.escape(f".{target.name}.") + "[0-9a-f]{12}" + re.escape(suffix))
    for path in target.parent.glob(f".{glob.escape(target.name)}.*"):
        if pattern.fullmatch(path.name):
            path.unlink(missing_ok=True)


def atomic_write(target: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call `write(tmp_path)` and move the result to `target` atomically."""
    with atomic_path(target) as tmp:
        write(tmp)
    return Path(target)


def atomic_write_text(target: str | os.PathLike, text: str) -> Path:
    return atomic_write(target, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_json(target: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(target, json.dumps(obj, indent=2, sort_keys=True, allow_nan=True) + "\n")
