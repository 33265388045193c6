"""The stream of physical states: the split of work units over ranks and workers, StateStream.

Units (`ebm_vae.data.units`, which also splits train from validation) are dealt out to ranks
and workers here. Files are opened only
inside the process that reads them (after the DataLoader's fork), a unit at a time, and read
chunk by chunk through the extractor. Batches hold states in their physical units: the model
owns its normalisation (`ebm_vae.model.transforms`), on whatever device it runs.
"""

from __future__ import annotations

import heapq
import itertools
import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ebm_vae.data.extractors import Extractor, StateInfo
from ebm_vae.data.readers.base import one_line
from ebm_vae.data.units import OpenFiles, WorkUnit, chunk_samples, read_unit

log = logging.getLogger(__name__)


def split_units(units: Sequence[WorkUnit], rank: int, world: int, worker: int,
                n_workers: int) -> list[WorkUnit]:
    """The disjoint share of (rank, worker) among world x n_workers shares, in the given order.

    Units go one by one to the share holding the fewest samples so far (ties: lowest share),
    so shares differ by at most one unit's samples whatever the file sizes.
    """
    n_shares = world * n_workers
    me = rank * n_workers + worker
    heap = [(0, s) for s in range(n_shares)]
    mine = []
    for unit in units:
        load, share = heapq.heappop(heap)
        if share == me:
            mine.append(unit)
        heapq.heappush(heap, (load + unit.n_samples, share))
    return mine


class ShuffleBuffer:
    """At most `capacity` states in fixed slots; batches are drawn without replacement.

    When the buffer is full, three quarters of it (whole batches, at least one) go out and
    the freed slots take the next states, so memory is `capacity` states
    whatever the file size. The randomness is in where states are put, not in a fresh
    permutation per draw (which cost more than reading Parquet): the first fill writes the
    arriving states to a random permutation of the slots, each refill writes them to the freed
    slots in the order of a random permutation of the draw drawn once per buffer, and a draw
    takes its slots consecutively (cyclically) from a uniformly random start. Quality kept:
    in every draw each held state goes out with the same probability, drawn/capacity (about
    3/4; so how long a state stays is distributed as with uniform draws), and the states of a batch are spread over the
    arrivals of the last refills rather than neighbours in a file; not kept: which states go
    out together is not fresh per draw but follows that fixed placement. A draw from a buffer
    that is not full (the end of a pass) is uniform. Rows are moved as single opaque items (a
    void view), one copy in and one out, which is what makes the buffer cheap for both 2-value
    and 12,288-value states.
    """

    def __init__(self, capacity: int, batch_size: int, dim: int, rng: np.random.Generator,
                 storage: np.ndarray | None = None):
        """`storage`: a (>= capacity, dim) float32 array to reuse; the first writes to fresh
        memory page-fault, which for a 256 MB buffer costs as much as an epoch of small files."""
        self.capacity = max(capacity, batch_size)
        self.batch_size = batch_size
        if storage is None or storage.shape[0] < self.capacity or storage.shape[1] != dim:
            storage = np.empty((self.capacity, dim), dtype=np.float32)
        self.data = storage[: self.capacity]
        self.rows = self.data.view(np.dtype((np.void, 4 * dim))).reshape(-1)
        self.free = rng.permutation(self.capacity)  # empty slots, filled front first
        self.draw_batches = max(1, self.capacity * 3 // 4 // batch_size)
        self.refill = rng.permutation(self.draw_batches * batch_size)  # offsets in a drawn run
        self._refill_slots = np.empty_like(self.refill)
        self.rng = rng

    @property
    def size(self) -> int:
        return self.capacity - len(self.free)

    def push(self, states: np.ndarray) -> Iterator[np.ndarray]:
        """Add (n, D) float32 states; yield batches each time the buffer fills."""
        pos = 0
        while pos < len(states):
            take = min(len(self.free), len(states) - pos)
            part = np.ascontiguousarray(states[pos : pos + take])
            self.rows[self.free[:take]] = part.view(self.rows.dtype).reshape(-1)
            self.free = self.free[take:]
            pos += take
            if not len(self.free):
                yield from self._draw(self.draw_batches)

    def drain(self) -> Iterator[np.ndarray]:
        """The whole batches the buffer holds, shuffled; under one batch stays for later."""
        if self.size >= self.batch_size:
            yield from self._draw(self.size // self.batch_size)

    def _draw(self, n_batches: int) -> Iterator[np.ndarray]:
        """`n_batches` batches; from a full buffer, consecutive slots from a random start."""
        if len(self.free) or n_batches != self.draw_batches:
            yield from self._draw_uniform(n_batches)
            return
        start = int(self.rng.integers(self.capacity))
        for i in range(self.draw_batches):
            yield self._run((start + i * self.batch_size) % self.capacity)
        # their states are out: slots reusable. Into memory made once (already consumed by
        # push): a fresh array this size page-faults on every write, which costs 3x the `%`.
        self.free = np.remainder(np.add(self.refill, start, out=self._refill_slots), self.capacity,
                                 out=self._refill_slots)

    def _run(self, first: int) -> np.ndarray:
        """One batch from the slots `first`, `first` + 1, ... (cyclically)."""
        out = np.empty((self.batch_size, self.data.shape[1]), dtype=np.float32)
        head = min(self.batch_size, self.capacity - first)
        out[:head] = self.data[first : first + head]
        out[head:] = self.data[: self.batch_size - head]
        return out

    def _draw_uniform(self, n_batches: int) -> Iterator[np.ndarray]:
        """Uniform draws without replacement from what a partly filled buffer holds."""
        held = np.ones(self.capacity, dtype=bool)
        held[self.free] = False
        occupied = np.flatnonzero(held)
        picked = occupied[self.rng.choice(len(occupied), n_batches * self.batch_size, replace=False)]
        for start in range(0, len(picked), self.batch_size):
            yield self._gather(picked[start : start + self.batch_size])
        self.free = np.concatenate([self.free, picked])  # their states are out: slots reusable

    def _gather(self, slots: np.ndarray) -> np.ndarray:
        """One batch. Allocated per batch, not per draw: allocations of a few MB are recycled
        by malloc, while a draw-sized one (up to the whole buffer) would be mapped fresh from the
        OS every time and page-fault on every write."""
        out = np.empty((len(slots), self.data.shape[1]), dtype=np.float32)
        np.take(self.rows, slots, out=out.view(self.rows.dtype).reshape(-1))
        return out


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
    wait in the shuffle buffer), then reads its own units again (repeats); a share without
    units reads everyone's. Shares are balanced by samples (`split_units`), so the left-out and
    repeated samples are bounded by about one work unit per share plus world x batch_size; with
    equal shares and a total divisible by world x n_workers x batch_size every sample is
    yielded exactly once. States pass a shuffle buffer of `shuffle_buffer` states (at most
    `shuffle_buffer_bytes`, never under one batch) seeded by (seed, epoch, rank, worker).

    Validation (`train=False`): no shuffling or cycling; each share reads its units in order
    once, every sample exactly once over all shares; the last batch of a share may be partial.

    Samples with a NaN/Inf component are dropped and counted. A file that is missing, changed
    since the crawl (size/mtime) or unreadable is skipped with a one-line warning naming it.
    """

    def __init__(self, units: Sequence[WorkUnit], extractor: Extractor, state: StateInfo, root: str | Path,
                 batch_size: int, *, train: bool = True, seed: int = 0, shuffle_buffer: int = 65536,
                 shuffle_buffer_bytes: int = 256 << 20, chunk_bytes: int = 8 << 20,
                 batches_per_epoch: int | None = None,
                 rank: int | None = None, world: int | None = None):
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
        self.dropped = 0  # non-finite samples dropped by this process's iterators
        self.skipped: dict[str, str] = {}  # path -> reason, files skipped by this process
        self._storage: np.ndarray | None = None  # the shuffle buffer's memory, made in the worker

    def __getstate__(self) -> dict[str, Any]:
        """What goes to a spawned DataLoader worker: never the shuffle buffer's memory."""
        return {**self.__dict__, "_storage": None}

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
        if not self.train:
            mine = split_units(self.units, rank, world, worker, n_workers)
            yield from _batched(self._states(mine), self.batch_size)
            return
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.units))
        units = [self.units[i] for i in order]
        mine = split_units(units, rank, world, worker, n_workers)
        budget = self.rank_budget(world)
        budget = budget // n_workers + (worker < budget % n_workers)
        if budget == 0:
            return
        rng = np.random.default_rng([self.seed, epoch, rank, worker])
        storage, self._storage = self._storage, None  # reused across epochs, one iterator at a time
        buffer = ShuffleBuffer(self.shuffle_buffer, self.batch_size, self.state.dim, rng, storage)
        batches = self._train_batches(mine, units, buffer)
        try:
            yield from itertools.islice(batches, budget)
        finally:
            batches.close()  # closes the file being read
            self._storage = buffer.data

    def _train_batches(self, mine: list[WorkUnit], everyone: list[WorkUnit],
                       buffer: ShuffleBuffer) -> Iterator[np.ndarray]:
        """Endless batches: passes over the own units (everyone's when the own give nothing)."""
        source = mine or everyone
        while True:
            got = 0
            for states in self._states(source):
                got += len(states)
                yield from buffer.push(states)
            yield from buffer.drain()  # a pass ends: its samples go out before any repeats
            if got:
                continue
            if source is everyone:
                raise RuntimeError(f"no readable samples in {len(everyone)} work units "
                                   f"(skipped files: {sorted(self.skipped)[:5]})")
            source = everyone

    def _states(self, units: Iterable[WorkUnit]) -> Iterator[np.ndarray]:
        """Finite states of `units` in physical units, chunk by chunk; bad files skipped."""
        dropped = 0
        files = OpenFiles()
        try:
            for unit in units:
                if unit.path in self.skipped:
                    continue
                try:
                    for states in read_unit(self.extractor, self.root, unit, self.chunk, files):
                        if not np.isfinite(states).all():  # the per-row test only when needed
                            finite = np.isfinite(states).all(axis=1)
                            dropped += int(len(finite) - finite.sum())
                            states = states[finite]
                        if len(states):
                            yield states
                except Exception as exc:  # a bad file never stops training: skip it, say why
                    self.skipped[unit.path] = one_line(exc)
                    log.warning("skipping %s: %s", unit.path, self.skipped[unit.path])
        finally:
            files.close()
            if dropped:  # said once per process: every later pass drops the same samples again
                level = logging.INFO if not self.dropped else logging.DEBUG
                self.dropped += dropped
                log.log(level, "dropped %d samples with NaN/Inf values", dropped)


def stream_args(data_cfg: Any) -> dict[str, Any]:
    """StateStream keyword arguments from a DataConfig."""
    return {"batch_size": data_cfg.batch_size, "seed": data_cfg.seed,
            "shuffle_buffer": data_cfg.shuffle_buffer, "shuffle_buffer_bytes": data_cfg.shuffle_buffer_bytes,
            "chunk_bytes": data_cfg.chunk_bytes,
            "batches_per_epoch": data_cfg.batches_per_epoch}
