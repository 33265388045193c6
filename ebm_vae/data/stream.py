"""The stream of physical states: the split of work units over ranks and workers, StateStream.

Units (`ebm_vae.data.units`, which also splits train from validation) are dealt out to ranks
and workers here. Files are opened only
inside the process that reads them (after the DataLoader's fork), a unit at a time, and read
chunk by chunk through the extractor. Batches hold states in their physical units: the model
owns its normalisation (`ebm_vae.model.transforms`), on whatever device it runs.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ebm_vae.data.cache import OpenShards, read_cached
from ebm_vae.data.extractors import Extractor, StateInfo
from ebm_vae.data.extractors.base import flat_states
from ebm_vae.data.readers.base import one_line
from ebm_vae.data.report import StreamCounters
from ebm_vae.data.shuffle import WindowShuffle
from ebm_vae.data.units import OpenFiles, WorkUnit, chunk_samples, deal, read_unit

log = logging.getLogger(__name__)


def split_units(units: Sequence[WorkUnit], rank: int, world: int, worker: int,
                n_workers: int) -> list[WorkUnit]:
    """The disjoint share of (rank, worker) among world x n_workers shares, in the given order.

    Units go one by one to the share holding the fewest samples so far (ties: lowest share),
    so shares differ by at most one unit's samples whatever the file sizes.
    """
    return deal(units, lambda unit: unit.n_samples, world * n_workers, rank * n_workers + worker)


def _batched(chunks: Iterable[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
    """Consecutive batches of `batch_size` (the last may be partial), in order."""
    pending: list[np.ndarray] = []
    held = 0
    for chunk in chunks:
        pending.append(chunk)
        held += len(chunk)
        if held >= batch_size:
            joined = np.concatenate(pending)
            full = len(joined) // batch_size * batch_size
            yield from np.split(joined[:full], full // batch_size)
            pending, held = [joined[full:]], len(joined) - full
    if held:
        yield np.concatenate(pending)


def all_finite(states: np.ndarray) -> bool:
    """Whether every value is finite, from one sum (NaN and Inf propagate into it; a sum that
    overflows says False, and the caller's per-row test then finds nothing to drop). A third
    of the cost of `np.isfinite(states).all()`, which writes a mask as large as the states."""
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.isfinite(np.add.reduce(states, axis=None)))


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class StateStream(IterableDataset):
    """Batches of float32 states in physical units (batch, *state.shape) from work units; use it with
    `DataLoader(batch_size=None)`.

    Training (`train=True`): each epoch the units are permuted with a generator seeded by
    (seed, epoch) and dealt to the world x n_workers (rank, worker) shares (`split_units`).
    Every rank yields the same number of batches, its budget
    B = `batches_per_epoch` or max(1, floor(samples of the split / (world x batch_size))),
    from the manifest's sample counts; worker w of a rank yields B // n_workers, plus one for
    w < B % n_workers, so the budgets depend on nothing read and no rank waits for another.
    Remainder policy, per share: one holding more than its budget x batch_size samples stops at
    its budget (the rest is left out this epoch; which samples changes with the epoch's
    permutation); one holding fewer yields all of its samples (but fewer than batch_size that
    wait in the shuffle window), then reads its own units again (repeats); a share without
    units reads everyone's. Shares are balanced by samples (`split_units`), so the left-out and
    repeated samples are bounded by about one work unit per share plus world x batch_size; with
    equal shares and a total divisible by world x n_workers x batch_size every sample is
    yielded exactly once. States are shuffled in windows of `shuffle_buffer` states (at most
    `shuffle_buffer_bytes`, never under one batch; `WindowShuffle`) seeded by (seed, epoch,
    rank, worker).

    Validation (`train=False`): no shuffling or cycling; each share reads its units in order
    once, every sample exactly once over all shares; the last batch of a share may be partial.

    With `shards` (unit path -> a state cache shard: `ebm_vae.data.cache`), those files' states
    come from the cache (when every unit is cached, training shuffles rows of the memory maps).

    Samples with a NaN/Inf component are dropped and counted. A file that is missing, changed
    since the crawl (size/mtime) or unreadable is skipped with a one-line warning naming it.
    `counters` (shared memory, `n_slots` >= the DataLoader's workers) total what every worker
    read, dropped and skipped; `dropped` and `skipped` hold this process's own.
    """

    def __init__(self, units: Sequence[WorkUnit], extractor: Extractor, state: StateInfo, root: str | Path,
                 batch_size: int, *, train: bool = True, seed: int = 0, shuffle_buffer: int = 65536,
                 shuffle_buffer_bytes: int = 256 << 20, chunk_bytes: int = 8 << 20,
                 batches_per_epoch: int | None = None, rank: int | None = None,
                 world: int | None = None, shards: dict[str, tuple[str, dict]] | None = None,
                 n_slots: int = 1):
        super().__init__()
        self.units = list(units)
        self.extractor = extractor
        self.state = state
        self.root = Path(root)
        self.batch_size = batch_size
        self.train = train
        self.seed = seed
        self.shuffle_buffer = min(shuffle_buffer, shuffle_buffer_bytes // (4 * self.state.dim))
        self.chunk = chunk_samples(self.state, chunk_bytes)
        self.batches_per_epoch = batches_per_epoch
        self.rank, self.world = rank, world
        # shared memory: persistent DataLoader workers see set_epoch made in the main process
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self.n_samples = sum(u.n_samples for u in self.units)
        self.shards = dict(shards or {})
        self.cached = bool(self.units) and all(u.path in self.shards for u in self.units)
        self.counters = StreamCounters(n_slots)
        self.dropped = 0  # non-finite samples dropped by this process's iterators
        self.skipped: dict[str, str] = {}  # path -> reason, files skipped by this process
        self._slot = 0  # this process's slot of the counters (its DataLoader worker id)
        self._sources: tuple[int, OpenFiles, OpenShards] | None = None  # (pid, files, shards)

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(int(epoch))

    def _world(self) -> tuple[int, int]:
        rank, world = _distributed()
        return (rank if self.rank is None else self.rank), (world if self.world is None else self.world)

    def rank_budget(self, world: int | None = None) -> int:
        """Batches every rank yields per training epoch."""
        if self.batches_per_epoch is not None:
            return self.batches_per_epoch
        world = self._world()[1] if world is None else world
        return max(1, self.n_samples // (world * self.batch_size)) if self.n_samples else 0

    def __len__(self) -> int:
        if not self.train:
            raise TypeError("the validation stream's length is not known in advance")
        return self.rank_budget()

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rank, world = self._world()
        for batch in self.iter_share(rank, world, worker, n_workers):
            yield torch.from_numpy(batch).view(len(batch), *self.state.shape)

    def iter_share(self, rank: int, world: int, worker: int, n_workers: int) -> Iterator[np.ndarray]:
        """The (batch, D) float32 batches of one (rank, worker) share for the current epoch."""
        epoch = self.epoch
        self._slot = worker
        if not self.train:
            mine = split_units(self.units, rank, world, worker, n_workers)
            yield from _batched(map(flat_states, self._states(mine)), self.batch_size)
            return
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.units))
        units = [self.units[i] for i in order]
        mine = split_units(units, rank, world, worker, n_workers)
        budget = self.rank_budget(world)
        budget = budget // n_workers + (worker < budget % n_workers)
        if budget == 0:
            return
        rng = np.random.default_rng([self.seed, epoch, rank, worker])
        shuffler = WindowShuffle(self.shuffle_buffer, self.batch_size, self.state.dim, rng)
        pieces = self._cached_rows if self.cached else lambda us: ((s,) for s in self._states(us))
        batches = self._train_batches(mine, units, shuffler, pieces)
        try:
            yield from itertools.islice(batches, budget)
        finally:
            batches.close()  # closes the file being read

    def _train_batches(self, mine: list[WorkUnit], everyone: list[WorkUnit], shuffler: Any,
                       pieces: Any) -> Iterator[np.ndarray]:
        """Endless batches: passes over the own units (everyone's when the own give nothing);
        `pieces(units)` yields the arguments of `shuffler.push`, states last."""
        source = mine or everyone
        while True:
            got = 0
            for piece in pieces(source):
                got += len(piece[0]) if len(piece) == 1 else piece[2] - piece[1]
                yield from shuffler.push(*piece)
            yield from shuffler.drain()  # a pass ends: its samples go out before any repeats
            if got:
                continue
            if source is everyone:
                raise RuntimeError(f"no readable samples in {len(everyone)} work units "
                                   f"(skipped files: {sorted(self.skipped)[:5]})")
            source = everyone

    def _open_sources(self) -> tuple[OpenFiles, OpenShards]:
        """This process's open files and shards, kept across passes and epochs: a small tree's
        files are opened once per worker, not once per epoch (an open costs as much as reading
        hundreds of field states). Made afresh in a process other than the one that opened
        them: handles never cross a fork."""
        if self._sources is None or self._sources[0] != os.getpid():
            self._sources = (os.getpid(), OpenFiles(), OpenShards(self.shards))
        return self._sources[1], self._sources[2]

    def __getstate__(self) -> dict[str, Any]:
        """What goes to a spawned DataLoader worker: no open handles."""
        return {**self.__dict__, "_sources": None}

    def _skip(self, path: str, exc: BaseException) -> None:
        """A bad file never stops training: skip it from now on in this process, say why once."""
        self.skipped[path] = one_line(exc)
        log.warning("skipping %s: %s", path, self.skipped[path])
        self.counters.skipped(self._slot, path, self.skipped[path])

    def _cached_rows(self, units: Iterable[WorkUnit]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(shard array, first row, stop) of each unit's states (all finite: the cache keeps no others)."""
        _, shards = self._open_sources()
        for unit in units:
            if unit.path in self.skipped:
                continue
            try:
                shard = shards.get(unit.path)
                found = shard.slices(unit)
                if found is None:
                    raise ValueError("the state cache's blocks differ from the split's (data.val_block?)")
            except Exception as exc:
                self._skip(unit.path, exc)
                continue
            rows, dropped = found
            self.counters.add(self._slot, read=sum(b - a for a, b in rows) + dropped, dropped=dropped)
            for a, b in rows:
                yield shard.states, a, b

    def _states(self, units: Iterable[WorkUnit]) -> Iterator[np.ndarray]:
        """Finite states of `units` in physical units, chunk by chunk (from the cache where it
        holds them), one state per row in any layout (`Extractor.iter_states`); bad files skipped."""
        dropped_here = 0
        files, shards = self._open_sources()
        try:
            for unit in units:
                if unit.path in self.skipped:
                    continue
                read = dropped = 0
                skipped_rows: Counter[str] = Counter()
                try:
                    found = shards.get(unit.path).slices(unit) if unit.path in shards else None
                    if found is not None:  # the cache holds finite states only: its drops are known
                        rows, dropped = found
                        read = dropped
                        source = read_cached(shards.get(unit.path), rows, self.chunk)
                    else:  # rows of any layout: the shuffle's copy (or _batched's) makes them batches
                        source = read_unit(self.extractor, self.root, unit, self.chunk, files, skipped_rows,
                                           flat=False)
                    for states in source:
                        read += len(states)
                        if not (unit.finite or all_finite(states)):  # the per-row test only when needed
                            finite = np.isfinite(states).reshape(len(states), -1).all(axis=1)
                            dropped += int(len(finite) - finite.sum())
                            states = states[finite]
                        if len(states):
                            yield states
                except Exception as exc:
                    self._skip(unit.path, exc)
                finally:
                    self.counters.add(self._slot, read=read, dropped=dropped,
                                      skipped_rows=skipped_rows[unit.path])
                    dropped_here += dropped
        finally:
            if dropped_here:  # said once per process: every later pass drops the same samples again
                level = logging.INFO if not self.dropped else logging.DEBUG
                self.dropped += dropped_here
                log.log(level, "dropped %d samples with NaN/Inf values", dropped_here)


def stream_args(data_cfg: Any) -> dict[str, Any]:
    """StateStream keyword arguments from a DataConfig."""
    return {"batch_size": data_cfg.batch_size, "seed": data_cfg.seed,
            "shuffle_buffer": data_cfg.shuffle_buffer, "shuffle_buffer_bytes": data_cfg.shuffle_buffer_bytes,
            "chunk_bytes": data_cfg.chunk_bytes,
            "batches_per_epoch": data_cfg.batches_per_epoch}
