"""Work units: bounded parts of one file's extent, the train/validation split, and reading them.

Each file is cut into **blocks** (`BlockGrid`): about `data.val_block` samples each, and at
least `MIN_BLOCKS` per file, so that a small file still has blocks spread over its whole length.
Blocks live in the file's extent (rows, snapshots, or bytes for CSV and logs, where a line
belongs to the block its first byte is in); a file planned `whole_file` (a derived phase, which
needs every earlier row) has its blocks in sample order instead.

The split holds out a fraction f of **every** file: the blocks are grouped in strata of 1/f
blocks and stratum j holds out block floor((j + u_j) / f), u_j a hash of (path, j). So every
file gives about f of its samples to validation, spread over its whole length (a year of
hourly data gives about 1/f stretches of a few days, never a season), a block's side depends on
its path and index only (adding files changes nothing for the others), and no file is left out.

A work unit is a set of block ranges of one file (`ranges`, sorted, disjoint) with at most
`data.unit_samples` samples (`data.unit_bytes` for byte extents). Every pass over the data (the
statistics pass, the training stream, the histogram export, the state cache) reads through
`read_unit`, which refuses a file changed since the crawl.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import math
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from ebm_vae.data.extractors import Extractor, FilePlan, StateInfo
from ebm_vae.data.extractors.base import flat_states
from ebm_vae.data.readers import (
    DEFAULT_OPTIONS,
    READERS,
    FileInfo,
    Handle,
    ReadOptions,
    TableHandle,
)
from ebm_vae.data.readers.base import one_line

if TYPE_CHECKING:
    from ebm_vae.crawl.manifest import ManifestEntry

log = logging.getLogger(__name__)

MIN_BLOCKS = 64  # blocks per file at least (fewer only for files of fewer samples)
HULL_DENSITY = 0.5  # read a row-group table unit's hull (and drop the holes) above this fill


def byte_extent(fmt: str) -> bool:
    """Whether a format's extent is bytes (CSV, logs): a block's sample count is known only once read."""
    return READERS[fmt].byte_extent


class ChangedFile(Exception):
    """A file whose size or mtime differs from the manifest: the crawl's plan no longer holds."""


@dataclass(frozen=True)
class BlockGrid:
    """Blocks of `length` over [0, span) of a file: extent units, or samples when `by_sample`."""

    length: int
    span: int
    by_sample: bool = False

    @property
    def n_blocks(self) -> int:
        return -(-self.span // self.length) if self.span else 0

    def bounds(self, first: int, stop: int) -> tuple[int, int]:
        """[start, stop) of blocks first .. stop - 1."""
        return first * self.length, min(self.span, stop * self.length)

    def block_of(self, position: int) -> int:
        return position // self.length


def block_grid(plan: FilePlan, val_block: int) -> BlockGrid:
    """The blocks of a file: about `val_block` samples (at least 1), and at least `MIN_BLOCKS`
    blocks when the file has that many samples."""
    samples = max(1, min(int(val_block), plan.n_samples // MIN_BLOCKS))
    if plan.whole_file:
        return BlockGrid(samples, plan.n_samples, by_sample=True)
    if plan.n_samples == 0:
        return BlockGrid(max(1, plan.extent), plan.extent)
    return BlockGrid(max(1, math.ceil(samples * plan.extent / plan.n_samples)), plan.extent)


def path_seed(path: str) -> int:
    return int.from_bytes(hashlib.blake2b(path.encode(), digest_size=8).digest(), "big")


def holdout_blocks(path: str, n_blocks: int, fraction: float) -> np.ndarray:
    """Sorted indices of the validation blocks of a file (see the module docstring)."""
    if fraction <= 0 or n_blocks == 0:
        return np.zeros(0, dtype=np.int64)
    strata = int(math.ceil(n_blocks * fraction)) + 1
    u = np.random.default_rng(path_seed(path)).random(strata)
    picked = np.floor((np.arange(strata) + u) / fraction).astype(np.int64)
    return np.unique(picked[picked < n_blocks])


@dataclass(frozen=True)
class WorkUnit:
    path: str  # relative to the data root, as in the manifest
    start: int  # the hull of `ranges` in the extent ([0, extent) for a whole_file plan)
    stop: int
    plan: FilePlan
    format: str
    size: int  # the file's size and mtime at crawl time, checked before reading
    mtime_ns: int
    # the parts read, sorted and disjoint, in the coordinates of the file's BlockGrid (samples
    # for a whole_file plan, else the extent); empty = all of [start, stop)
    ranges: tuple[tuple[int, int], ...] = ()
    # the statistics pass read this file (this size and mtime) and found every state finite, so
    # the stream need not test them again (`mark_finite`; `read_unit` refuses it once changed)
    finite: bool = False

    @property
    def spans(self) -> tuple[tuple[int, int], ...]:
        return self.ranges or ((self.start, self.stop),)

    @property
    def n_samples(self) -> int:
        """Samples in the unit: exact for rows/snapshots; for CSV byte ranges a proportional
        share of the file's samples (the shares of a file sum to its total)."""
        n, extent = self.plan.n_samples, self.plan.extent
        if self.plan.whole_file:
            return sum(b - a for a, b in self.ranges) if self.ranges else n
        return sum(n * b // extent - n * a // extent for a, b in self.spans) if extent else 0

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


def majority_state(extractor: Extractor, entries: Iterable[ManifestEntry]) -> StateInfo:
    """The state most files of a capsule plan (files of another shape are skipped)."""
    return Counter(entry_plan(extractor, e).state for e in entries).most_common(1)[0][0]


@dataclass
class FileSplit:
    """One file's share of each side: samples as planned (exact but for CSV byte ranges)."""

    path: str
    format: str
    train_samples: int = 0
    val_samples: int = 0
    grid: BlockGrid | None = None
    val_blocks: tuple[int, ...] = ()


@dataclass
class Split:
    train: list[WorkUnit] = field(default_factory=list)
    val: list[WorkUnit] = field(default_factory=list)
    files: list[FileSplit] = field(default_factory=list)
    val_fraction: float = 0.0

    def report(self, block_counts: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
        """Samples and files of each side, per file, as plain containers (checkpoints, maps).

        `block_counts` (path -> {"length", "counts"}: the samples the statistics pass read per
        block) makes the counts of byte-extent files exact; without it they are shares of the
        file's planned samples in proportion to bytes, and `exact` is False."""
        rows, exact = [], True
        for f in self.files:
            train, val = f.train_samples, f.val_samples
            if byte_extent(f.format) and f.grid is not None and not f.grid.by_sample:
                recorded = (block_counts or {}).get(f.path) or {}
                counts = np.asarray(recorded.get("counts", []), dtype=np.int64)
                if recorded.get("length") == f.grid.length and len(counts) == f.grid.n_blocks:
                    val = int(counts[list(f.val_blocks)].sum())
                    train = int(counts.sum()) - val
                else:
                    exact = False
            rows.append({"path": f.path, "train_samples": train, "val_samples": val})
        return {
            "val_fraction": self.val_fraction,
            "train_samples": sum(r["train_samples"] for r in rows),
            "val_samples": sum(r["val_samples"] for r in rows),
            "train_files": sum(r["train_samples"] > 0 for r in rows),
            "val_files": sum(r["val_samples"] > 0 for r in rows),
            "only_val": [r["path"] for r in rows if r["val_samples"] and not r["train_samples"]],
            "exact": exact,
            "files": rows,
        }


def split_warnings(report: dict[str, Any]) -> list[str]:
    """What a user should know about a split: files the model never sees, an empty side."""
    lines = []
    only_val = report["only_val"]
    if only_val:
        lines.append(f"{len(only_val)} file(s) are in validation only (fewer blocks than 1/val_fraction): "
                     f"the model never trains on {', '.join(only_val[:5])}{' ...' if len(only_val) > 5 else ''}")
    if report["val_fraction"] > 0 and not report["val_samples"]:
        lines.append("validation is empty: too few samples to hold any out (val/* metrics will be missing)")
    return lines


def _runs(blocks: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs of consecutive block indices as [first, stop) pairs."""
    if not len(blocks):
        return []
    breaks = np.flatnonzero(np.diff(blocks) != 1)
    firsts = np.concatenate([[blocks[0]], blocks[breaks + 1]])
    lasts = np.concatenate([blocks[breaks], [blocks[-1]]])
    return list(zip(firsts.tolist(), (lasts + 1).tolist(), strict=True))


def _units_of(entry: ManifestEntry, plan: FilePlan, grid: BlockGrid, blocks: np.ndarray,
              per_unit: int) -> list[WorkUnit]:
    """Units of `per_unit` consecutive blocks of `blocks` (a whole_file plan: one unit)."""
    groups = [blocks] if plan.whole_file else [blocks[i : i + per_unit] for i in range(0, len(blocks), per_unit)]
    units = []
    for group in groups:
        if not len(group):
            continue
        ranges = tuple(grid.bounds(a, b) for a, b in _runs(group))
        start, stop = (0, plan.extent) if plan.whole_file else (ranges[0][0], ranges[-1][1])
        whole = ranges == ((0, grid.span),)
        units.append(WorkUnit(entry.path, start, stop, plan, entry.format, entry.size, entry.mtime_ns,
                              () if whole or (not plan.whole_file and len(ranges) == 1) else ranges))
    return units


def plan_units(entries: Iterable[ManifestEntry], extractor: Extractor, state: StateInfo,
               unit_samples: int, unit_bytes: int, val_fraction: float = 0.0,
               val_block: int = 4096) -> Split:
    """Train and validation units of the files whose state is `state` (others are skipped
    with a warning), holding out `val_fraction` of every file's blocks.

    Only when the strata hold out nothing at all (a few tiny files) does one block of the
    largest file go to validation, and when they hold out everything (files of one block
    each), the largest file goes back to training: both sides then exist."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    files = []  # (entry, plan, grid, held blocks)
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
        grid = block_grid(plan, val_block)
        files.append([entry, plan, grid, holdout_blocks(entry.path, grid.n_blocks, val_fraction)])
    n_blocks = sum(f[2].n_blocks for f in files)
    n_held = sum(len(f[3]) for f in files)
    if files and n_held == n_blocks:
        max(files, key=lambda f: f[2].n_blocks)[3] = np.zeros(0, dtype=np.int64)
    elif val_fraction > 0 and n_blocks >= 2 and n_held == 0:
        largest = max(files, key=lambda f: f[2].n_blocks)
        u = np.random.default_rng(path_seed(largest[0].path)).random()
        largest[3] = np.array([int(u * largest[2].n_blocks)])
    split = Split(val_fraction=val_fraction)
    for entry, plan, grid, held in files:
        kept = np.setdiff1d(np.arange(grid.n_blocks), held)
        limit = unit_bytes if byte_extent(entry.format) else unit_samples
        per_unit = max(1, limit // grid.length) if not grid.by_sample else grid.n_blocks
        train = _units_of(entry, plan, grid, kept, per_unit)
        val = _units_of(entry, plan, grid, held, per_unit)
        split.train += train
        split.val += val
        split.files.append(FileSplit(entry.path, entry.format, sum(u.n_samples for u in train),
                                     sum(u.n_samples for u in val), grid, tuple(held.tolist())))
    return split


def make_units(entries: Iterable[ManifestEntry], extractor: Extractor, state: StateInfo,
               unit_samples: int, unit_bytes: int) -> list[WorkUnit]:
    """Work units covering every file whose state is `state`, nothing held out."""
    return plan_units(entries, extractor, state, unit_samples, unit_bytes).train


def mark_finite(units: Iterable[WorkUnit], files: Iterable[dict[str, Any]]) -> list[WorkUnit]:
    """The units, marked `finite` where the statistics pass's record of their file (`Stats.files`:
    path, size, mtime_ns, n_read, n_finite) says it read every state of this version finite. The
    test it saves is a pass over every state, a tenth of a field epoch's reading time."""
    clean = {(f["path"], f["size"], f["mtime_ns"]) for f in files
             if "size" in f and f["n_read"] == f["n_finite"]}
    return [replace(u, finite=True) if (u.path, u.size, u.mtime_ns) in clean else u for u in units]


def chunk_samples(state: StateInfo, chunk_bytes: int) -> int:
    """Samples per extractor read so that one chunk of float32 states is about `chunk_bytes`."""
    return max(1, chunk_bytes // (4 * state.dim))


def check_unchanged(root: Path, unit: WorkUnit) -> Path:
    """The unit's file, refused (ChangedFile) when its size or mtime differs from the crawl's."""
    path = Path(root) / unit.path
    st = path.stat()
    if (st.st_size, st.st_mtime_ns) != (unit.size, unit.mtime_ns):
        raise ChangedFile(f"changed since the crawl (size {unit.size} -> {st.st_size}, "
                          f"mtime_ns {unit.mtime_ns} -> {st.st_mtime_ns}); re-run ebm-vae-crawl")
    return path


def read_unit(extractor: Extractor, root: Path, unit: WorkUnit, chunk: int,
              files: OpenFiles | None = None, skipped: Counter[str] | None = None,
              flat: bool = True) -> Iterator[np.ndarray]:
    """The states of one unit, chunk by chunk; raises for a missing, changed or unreadable file.

    With `files`, the handle comes from (and stays in) that cache of open files. With
    `skipped`, the rows the unit's reads skipped (log lines that do not parse, ragged CSV rows:
    `Handle.skipped_rows`) are added to `skipped[unit.path]`, also when the read stops early.
    `flat=False` passes on what the extractor yields (rows of any layout: `Extractor.iter_states`)
    instead of (n, D) arrays."""
    path = check_unchanged(root, unit)
    if files is None:
        with extractor.open(path, unit.format) as handle:
            yield from _counted(extractor, handle, unit, chunk, skipped, flat)
        return
    try:
        yield from _counted(extractor, files.open(path, unit.format, extractor.read_options), unit, chunk,
                            skipped, flat)
    except Exception:
        files.discard(path)
        raise


def _counted(extractor: Extractor, handle: Handle, unit: WorkUnit, chunk: int,
             skipped: Counter[str] | None, flat: bool) -> Iterator[np.ndarray]:
    before = handle.skipped_rows
    try:
        for states in read_ranges(extractor, handle, unit, chunk):
            yield flat_states(states) if flat else states
    finally:
        if skipped is not None and handle.skipped_rows > before:
            skipped[unit.path] += handle.skipped_rows - before


def read_ranges(extractor: Extractor, handle: Any, unit: WorkUnit, chunk: int) -> Iterator[np.ndarray]:
    """The states of a unit's ranges from an open handle, in order.

    One range is one read. Several ranges are read one by one, except where that would read
    data twice: a whole_file plan is read whole and its states kept by position, and a
    Parquet unit whose ranges fill most of their hull is read as the hull (row groups are
    decoded whole) with the holes dropped."""
    plan = unit.plan
    if not unit.ranges:
        yield from extractor.iter_states(handle, plan, unit.start, unit.stop, chunk)
        return
    if plan.whole_file:
        yield from keep_positions(extractor.iter_states(handle, plan, 0, plan.extent, chunk), unit.ranges)
        return
    covered = sum(b - a for a, b in unit.ranges)
    per_row, rest = divmod(plan.n_samples, plan.extent) if plan.extent else (0, 1)
    if (isinstance(handle, TableHandle) and handle.extent_unit == "rows" and not rest
            and covered >= HULL_DENSITY * (unit.stop - unit.start)):
        ranges = [((a - unit.start) * per_row, (b - unit.start) * per_row) for a, b in unit.ranges]
        yield from keep_positions(extractor.iter_states(handle, plan, unit.start, unit.stop, chunk), ranges)
        return
    for a, b in unit.ranges:
        yield from extractor.iter_states(handle, plan, a, b, chunk)


def keep_positions(chunks: Iterable[np.ndarray], ranges: Iterable[tuple[int, int]]) -> Iterator[np.ndarray]:
    """The rows of consecutive `chunks` whose position (counted from 0) lies in `ranges`
    (sorted, disjoint), as views."""
    pending = iter(ranges)
    current = next(pending, None)
    position = 0
    for states in chunks:
        end = position + len(states)
        while current is not None and current[0] < end:
            lo, hi = max(current[0], position), min(current[1], end)
            if hi > lo:
                yield states[lo - position : hi - position]
            if current[1] > end:
                break
            current = next(pending, None)
        position = end
        if current is None:
            return


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


T = TypeVar("T")


def deal(items: Sequence[T], weight: Callable[[T], int], n_shares: int, share: int) -> list[T]:
    """The items of one share among `n_shares`, in the given order: each item goes to the share
    holding the least weight so far (ties: the lowest share), so shares differ by at most one
    item's weight whatever the sizes. Every share computes the same deal without talking."""
    heap = [(0, s) for s in range(n_shares)]
    mine = []
    for item in items:
        load, owner = heapq.heappop(heap)
        if owner == share:
            mine.append(item)
        heapq.heappush(heap, (load + weight(item), owner))
    return mine
