"""Work units: bounded ranges of one file's extent, and reading their states.

A work unit is a range [start, stop) of one file's extent (rows/snapshots, or bytes for CSV and logs)
of bounded size; a file planned `whole_file` (a derived phase) is one unit. Every pass over
the data (the statistics pass, the training stream, the histogram export, the state cache)
reads through `read_unit`, which refuses a file changed since the crawl.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ebm_vae.data.extractors import Extractor, FilePlan, StateInfo
from ebm_vae.data.readers import DEFAULT_OPTIONS, READERS, FileInfo, Handle, ReadOptions
from ebm_vae.data.readers.base import one_line

if TYPE_CHECKING:
    from ebm_vae.crawl.manifest import ManifestEntry

log = logging.getLogger(__name__)


class ChangedFile(Exception):
    """A file whose size or mtime differs from the manifest: the crawl's plan no longer holds."""


@dataclass(frozen=True)
class WorkUnit:
    path: str  # relative to the data root, as in the manifest
    start: int
    stop: int
    plan: FilePlan
    format: str
    size: int  # the file's size and mtime at crawl time, checked before reading
    mtime_ns: int

    @property
    def n_samples(self) -> int:
        """Samples in [start, stop): exact for rows/snapshots; for CSV and log byte ranges a
        proportional share of the file's samples (the shares of a file sum to its total)."""
        n, extent = self.plan.n_samples, self.plan.extent
        return n * self.stop // extent - n * self.start // extent if extent else 0

    @classmethod
    def whole(cls, entry: ManifestEntry, plan: FilePlan) -> WorkUnit:
        return cls(entry.path, 0, plan.extent, plan, entry.format, entry.size, entry.mtime_ns)


def entry_plan(extractor: Extractor, entry: ManifestEntry) -> FilePlan:
    """The extractor's plan for a manifest row, from the metadata the manifest keeps."""
    is_table = entry.format in READERS and READERS[entry.format].kind == "table"
    n_rows = entry.variables[0].shape[0] if is_table and entry.variables else None
    info = FileInfo(format=entry.format, attrs={}, variables=list(entry.variables), n_rows=n_rows,
                    extent=entry.extent)
    return extractor.plan(info)


def make_units(entries: Iterable[ManifestEntry], extractor: Extractor, state: StateInfo,
               unit_samples: int, unit_bytes: int) -> list[WorkUnit]:
    """Work units of the files whose state is `state` (others are skipped with a warning)."""
    units = []
    for entry in entries:
        try:
            plan = entry_plan(extractor, entry)
        except Exception as exc:  # a row the current capsule config cannot plan
            log.warning("skipping %s: %s", entry.path, one_line(exc))
            continue
        if plan.state != state:
            log.warning("skipping %s: state shape %s differs from the statistics' %s",
                        entry.path, plan.state.shape, state.shape)
            continue
        byte_extent = READERS[entry.format].byte_extent
        step = plan.extent if plan.whole_file else (unit_bytes if byte_extent else unit_samples)
        for start in range(0, plan.extent, max(1, step)):
            units.append(WorkUnit(entry.path, start, min(plan.extent, start + step), plan,
                                  entry.format, entry.size, entry.mtime_ns))
    return units


def chunk_samples(state: StateInfo, chunk_bytes: int) -> int:
    """Samples per extractor read so that one chunk of float32 states is about `chunk_bytes`."""
    return max(1, chunk_bytes // (4 * state.dim))


def read_unit(extractor: Extractor, root: Path, unit: WorkUnit, chunk: int,
              files: OpenFiles | None = None, skipped: Counter[str] | None = None) -> Iterator[np.ndarray]:
    """The states of one unit, chunk by chunk; raises for a missing, changed or unreadable file.

    With `files`, the handle comes from (and stays in) that cache of open files. With
    `skipped`, the rows the unit's reads skipped (log lines that do not parse, ragged CSV rows:
    `Handle.skipped_rows`) are added to `skipped[unit.path]`, also when the read stops early."""
    path = Path(root) / unit.path
    st = path.stat()
    if (st.st_size, st.st_mtime_ns) != (unit.size, unit.mtime_ns):
        raise ChangedFile(f"changed since the crawl (size {unit.size} -> {st.st_size}, "
                          f"mtime_ns {unit.mtime_ns} -> {st.st_mtime_ns}); re-run ebm-vae-crawl")
    if files is None:
        with extractor.open(path, unit.format) as handle:
            yield from _counted(extractor, handle, unit, chunk, skipped)
        return
    try:
        yield from _counted(extractor, files.open(path, unit.format, extractor.read_options), unit, chunk, skipped)
    except Exception:
        files.discard(path)
        raise


def _counted(extractor: Extractor, handle: Handle, unit: WorkUnit, chunk: int,
             skipped: Counter[str] | None) -> Iterator[np.ndarray]:
    before = handle.skipped_rows
    try:
        yield from extractor.iter_states(handle, unit.plan, unit.start, unit.stop, chunk)
    finally:
        if skipped is not None and handle.skipped_rows > before:
            skipped[unit.path] += handle.skipped_rows - before


class OpenFiles:
    """The most recently read files of one pass, kept open (per worker process, never across
    a fork). A file's work units come back in every pass, and opening costs more than a
    small unit's read: ~1.7 ms for an HDF5 file (its object walk), as much as reading ten
    3 x 64 x 64 field states. With more files than `size` this degrades to one open per unit."""

    def __init__(self, size: int = 16):
        self.size = size
        self.handles: OrderedDict[Path, Any] = OrderedDict()

    def open(self, path: Path, fmt: str, options: ReadOptions = DEFAULT_OPTIONS) -> Any:
        """The open handle of `path` (one pass reads every file with the same options)."""
        handle = self.handles.pop(path, None)
        if handle is None:
            if len(self.handles) >= self.size:
                self.handles.popitem(last=False)[1].close()
            handle = READERS[fmt].open(path, options)
        self.handles[path] = handle
        return handle

    def discard(self, path: Path) -> None:
        handle = self.handles.pop(path, None)
        if handle is not None:
            handle.close()

    def close(self) -> None:
        while self.handles:
            self.handles.popitem()[1].close()
