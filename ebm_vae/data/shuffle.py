"""Shuffling in bounded memory: a buffer for states read from files, index windows for the cache.

States read from files arrive in file order and must be mixed in memory: `ShuffleBuffer`.
States in the state cache are addressable, so a window of them is shuffled by permuting row
indices and each batch is gathered straight from the memory-mapped shards (`WindowShuffle`):
one copy per state instead of the buffer's two, which is what keeps a cached epoch at the rate
of a plain read of the shards.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


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
        return gather_rows(self.rows, slots, self.data.shape[1])


def gather_rows(rows: np.ndarray, slots: np.ndarray, dim: int) -> np.ndarray:
    """`rows[slots]` of a void view of float32 rows, as a new (len(slots), dim) float32 array.

    Fancy indexing of the void view copies each row with one memcpy; `np.take(..., out=)`
    measured 3 to 4 times slower for rows of 16-48 KB (field states)."""
    return rows[slots].view(np.float32).reshape(len(slots), dim)


class WindowShuffle:
    """Batches drawn from windows of `window` cached states (a multiple of the batch size).

    Rows arrive as (array, row indices) pieces, e.g. a work unit's rows of a memory-mapped
    shard. Once a window is held, a random permutation of it is cut into batches; each batch's
    indices are sorted (a batch is a set: sorting keeps the reads of a shard in order) and its
    rows are gathered from their arrays straight into the batch. Quality: every state of a
    window goes out exactly once, in a uniformly random batch of that window; states of
    different windows never share a batch (the file buffer's draws are no better: they mix only
    what the buffer holds). At the end of a pass (`drain`) the whole batches held go out, and
    fewer than one batch stays for the next pass, as in `ShuffleBuffer`.
    """

    def __init__(self, window: int, batch_size: int, dim: int, rng: np.random.Generator):
        self.window = max(batch_size, window // batch_size * batch_size)
        self.batch_size, self.dim, self.rng = batch_size, dim, rng
        self.arrays: list[np.ndarray] = []
        self.rows: list[np.ndarray] = []
        self.held = 0

    def push(self, array: np.ndarray, rows: np.ndarray) -> Iterator[np.ndarray]:
        """Add `array[rows]` (rows of a 2-D float32 array); yield batches each time a window fills."""
        while len(rows):
            take = min(len(rows), self.window - self.held)
            self.arrays.append(array)
            self.rows.append(rows[:take])
            self.held += take
            rows = rows[take:]
            if self.held == self.window:
                yield from self._draw(self.window // self.batch_size)

    def drain(self) -> Iterator[np.ndarray]:
        if self.held >= self.batch_size:
            yield from self._draw(self.held // self.batch_size)

    def _draw(self, n_batches: int) -> Iterator[np.ndarray]:
        owner = np.repeat(np.arange(len(self.rows)), [len(r) for r in self.rows])
        rows = np.concatenate(self.rows)
        order = self.rng.permutation(self.held)
        for b in range(n_batches):
            picked = np.sort(order[b * self.batch_size : (b + 1) * self.batch_size])
            yield self._gather(owner[picked], rows[picked])
        rest = np.sort(order[n_batches * self.batch_size :])
        kept = np.unique(owner[rest])
        self.arrays = [self.arrays[i] for i in kept]
        self.rows = [rows[rest][owner[rest] == i] for i in kept]
        self.held = len(rest)

    def _gather(self, owner: np.ndarray, rows: np.ndarray) -> np.ndarray:
        bounds = np.flatnonzero(np.diff(owner)) + 1
        parts = [gather_rows(_void_rows(self.arrays[owner[lo]]), rows[lo:hi], self.dim)
                 for lo, hi in zip([0, *bounds.tolist()], [*bounds.tolist(), len(rows)], strict=True)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _void_rows(array: np.ndarray) -> np.ndarray:
    """A 2-D float32 array's rows as single opaque items (a view)."""
    return array.view(np.dtype((np.void, 4 * array.shape[1]))).reshape(-1)
