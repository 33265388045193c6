"""The state cache: each file's extracted float32 states, written once, streamed every epoch.

The first pass over a capsule (the statistics pass, or a fill pass when the statistics exist)
writes, per file, its finite states in file order as a NumPy `.npy` array (read back as a memory
map) and a JSON index beside it: the file's path, size and mtime, and the number of states
before and after each block of the file's `BlockGrid`, so that any work unit (a set of block
ranges) maps to contiguous slices of the array. Shards live in
`paths.cache/<capsule>/<key[:2]>/<key>.{npy,json}`; the key hashes the file's path, size and
mtime, the capsule's definition, the state shape and the block grid, so a changed file (or
capsule) gets a new shard and only its own. The JSON is written last: a shard without it is
incomplete and ignored. Later epochs, validation, other ranks and nodes (paths.root on shared
storage) and histogram exports read the shards instead of re-extracting.

Why plain `.npy` shards and not LitData's `optimize` chunks: a shard per file is what makes
invalidation per file possible (a LitData dataset is one index over chunks that mix files);
our split, equal per-rank budgets and resumable epochs already live in `StateStream`, which
reads shards as fast as a plain read of them (`bench.py stream`, `cache_*` entries, with
LitData's rate on the same states beside it); and a memory map needs no decoding per item.
What LitData would add and this does not: streaming from object stores.

`data.cache`: `on`, `off`, or `auto`: on when the capsule's states take at most `AUTO_RATIO` of
the bytes of its files (field planes cut out of volumes, CSV text) and the disk has room.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ebm_vae.config import CapsuleConfig
from ebm_vae.data.extractors import StateInfo
from ebm_vae.data.units import BlockGrid, WorkUnit
from ebm_vae.io import atomic_path, atomic_write_json

log = logging.getLogger(__name__)

CACHE_MODES = ("auto", "on", "off")
AUTO_RATIO = 0.25  # auto: cache when states are at most this fraction of their files' bytes
FREE_MARGIN = 1.1  # the disk must hold the states with this margin
STALE_TMP_S = 3600.0  # hidden temporaries older than this are leftovers of killed writers


def capsule_fingerprint(capsule: CapsuleConfig) -> str:
    """Changes when the capsule's definition (what is extracted, and how) changes."""
    from ebm_vae.crawl.crawl import capsules_fingerprint

    return capsules_fingerprint([capsule])


@dataclass(frozen=True)
class ShardIndex:
    """The JSON beside a shard: whose states these are, and where each block's states start."""

    path: str
    size: int
    mtime_ns: int
    dim: int
    block_length: int
    by_sample: bool
    span: int
    offsets: list[int]  # finite states before block b (len n_blocks + 1)
    raw_offsets: list[int]  # states read (NaN/Inf ones too) before block b

    @property
    def n_states(self) -> int:
        return self.offsets[-1]


class StateCache:
    """The shards of one capsule under `directory` (`paths.cache/<capsule>`)."""

    def __init__(self, directory: str | Path, fingerprint: str, state: StateInfo):
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self.state = state

    def key(self, unit: WorkUnit, grid: BlockGrid) -> str:
        payload = json.dumps([unit.path, unit.size, unit.mtime_ns, self.fingerprint, list(self.state.shape),
                              dataclasses.astuple(grid)])
        return hashlib.sha1(payload.encode()).hexdigest()

    def files(self, key: str) -> tuple[Path, Path]:
        folder = self.directory / key[:2]
        return folder / f"{key}.npy", folder / f"{key}.json"

    def lookup(self, key: str) -> ShardIndex | None:
        """The index of a complete shard, or None."""
        array, index = self.files(key)
        try:
            found = ShardIndex(**json.loads(index.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            return None
        return found if array.is_file() else None

    def writer(self, unit: WorkUnit, grid: BlockGrid) -> ShardWriter:
        return ShardWriter(self, unit, grid)

    def prune(self, keep: set[str]) -> int:
        """Remove shards whose key is not in `keep` (changed or deleted files, an old capsule
        definition) and temporaries left by killed writers; returns the shards removed."""
        removed = 0
        if not self.directory.is_dir():
            return 0
        now = time.time()
        for path in self.directory.glob("*/*"):
            if path.name.startswith("."):
                if now - path.stat().st_mtime > STALE_TMP_S:
                    path.unlink(missing_ok=True)
                continue
            if path.name.split(".")[0] not in keep:
                removed += path.suffix == ".json"
                path.unlink(missing_ok=True)
        return removed


class ShardWriter:
    """Writes one file's finite states, block by block in order, then its index (commit)."""

    def __init__(self, cache: StateCache, unit: WorkUnit, grid: BlockGrid):
        self.cache, self.unit, self.grid = cache, unit, grid
        self.array_path, self.index_path = cache.files(cache.key(unit, grid))
        self._target = atomic_path(self.array_path)
        tmp = self._target.__enter__()
        # an upper bound: CSV rows that do not parse, and NaN/Inf rows, leave the end unused
        self.capacity = max(1, unit.plan.n_samples)
        self.array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32,
                                               shape=(self.capacity, cache.state.dim))
        self.finite = np.zeros(grid.n_blocks, dtype=np.int64)
        self.raw = np.zeros(grid.n_blocks, dtype=np.int64)
        self.written = 0

    def add(self, states: np.ndarray, finite: np.ndarray, read: np.ndarray) -> None:
        """Append finite `states` (in file order); `finite` and `read` count, per block, the
        states appended and the states read (NaN/Inf ones too)."""
        end = self.written + len(states)
        if end > self.capacity:
            raise ValueError(f"more states than planned ({self.capacity}): not cached")
        self.array[self.written : end] = states
        self.written = end
        self.finite += finite
        self.raw += read

    def commit(self) -> ShardIndex:
        self.array.flush()
        del self.array
        self._target.__exit__(None, None, None)
        index = ShardIndex(self.unit.path, self.unit.size, self.unit.mtime_ns, self.cache.state.dim,
                           self.grid.length, self.grid.by_sample, self.grid.span,
                           [0, *np.cumsum(self.finite).tolist()], [0, *np.cumsum(self.raw).tolist()])
        atomic_write_json(self.index_path, dataclasses.asdict(index))
        return index

    def abort(self) -> None:
        self.__dict__.pop("array", None)
        self._target.__exit__(RuntimeError, RuntimeError("aborted"), None)


class Shard:
    """A shard opened for reading (a memory map; one per process, never across a fork)."""

    def __init__(self, array_path: Path, index: ShardIndex):
        self.index = index
        self.states = np.load(array_path, mmap_mode="r")
        self.offsets = np.asarray(index.offsets, dtype=np.int64)
        self.raw_offsets = np.asarray(index.raw_offsets, dtype=np.int64)

    def slices(self, unit: WorkUnit) -> tuple[list[tuple[int, int]], int] | None:
        """The unit's states as [start, stop) rows of the array, and its NaN/Inf count; None when
        a range does not fall on the shard's blocks (another split made the unit)."""
        length, span = self.index.block_length, self.index.span
        out, dropped = [], 0
        for a, b in unit.spans:
            if a % length or (b % length and b != span):
                return None
            first, stop = a // length, -(-b // length)
            out.append((int(self.offsets[first]), int(self.offsets[stop])))
            dropped += int(self.raw_offsets[stop] - self.raw_offsets[first]) - (out[-1][1] - out[-1][0])
        return out, dropped


class OpenShards:
    """The shards a stream process has opened, most recent last (memory maps are cheap to keep,
    but each holds a file descriptor). `shards`: unit path -> the shard's `.npy` path."""

    def __init__(self, shards: dict[str, str], size: int = 256):
        self.paths = shards
        self.size = size
        self.open: OrderedDict[str, Shard] = OrderedDict()

    def __contains__(self, path: str) -> bool:
        return path in self.paths

    def get(self, path: str) -> Shard:
        shard = self.open.pop(path, None)
        if shard is None:
            if len(self.open) >= self.size:
                self.open.popitem(last=False)
            array = Path(self.paths[path])
            index = ShardIndex(**json.loads(array.with_suffix(".json").read_text(encoding="utf-8")))
            shard = Shard(array, index)
        self.open[path] = shard
        return shard


def read_cached(shard: Shard, rows: Sequence[tuple[int, int]], chunk: int) -> Iterator[np.ndarray]:
    """Views of the shard's rows, at most `chunk` states each."""
    for start, stop in rows:
        for i in range(start, stop, max(1, chunk)):
            yield shard.states[i : min(stop, i + max(1, chunk))]


def resolve_mode(mode: str, entries: Iterable[Any], state: StateInfo, directory: Path) -> bool:
    """Whether a capsule's states are cached under `data.cache=mode` (see the module docstring)."""
    if mode not in CACHE_MODES:
        raise ValueError(f"data.cache must be one of {', '.join(CACHE_MODES)}, got '{mode}'")
    if mode == "off":
        return False
    entries = list(entries)
    states = sum(e.n_samples for e in entries) * 4 * state.dim
    files = sum(e.size for e in entries)
    if mode == "auto" and states > AUTO_RATIO * files:
        return False
    directory.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(directory).free
    if states * FREE_MARGIN > free:
        message = (f"the state cache needs {states / 1e9:.1f} GB and {directory} has {free / 1e9:.1f} GB "
                   "free")
        if mode == "on":
            raise OSError(f"data.cache=on: {message}")
        log.warning("not caching states: %s", message)
        return False
    return True


def state_cache(cfg: Any, capsule: CapsuleConfig, manifest: Any) -> StateCache | None:
    """The state cache of `capsule` under `cfg.paths.cache`, or None when `cfg.data.cache`
    (resolved for this capsule's files) says not to cache."""
    from ebm_vae.data.extractors import EXTRACTORS
    from ebm_vae.data.units import majority_state

    entries = manifest.usable(capsule.name)
    if not entries:
        return None
    state = majority_state(EXTRACTORS[capsule.extractor](capsule), entries)
    directory = Path(cfg.paths.cache) / capsule.name
    if not resolve_mode(cfg.data.cache, entries, state, directory):
        return None
    return StateCache(directory, capsule_fingerprint(capsule), state)
