"""Shuffling in bounded memory with one copy per state: windows of row references.

States reach the stream in file order, as chunks from the reader (or as rows of the
memory-mapped shards of the state cache). `WindowShuffle` keeps references to them, not copies,
until a window of `window` states is held; then a random permutation of the window is cut into
batches, and each batch is gathered from its sources straight into its own array. A state is
copied once (a buffer that stores states and copies batches out copies it twice, which
measured 20 % of a field epoch), and memory is the window plus at most one chunk being cut.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

LARGE_ROW = 256  # components: rows this large are also read in order


class WindowShuffle:
    """Batches drawn from windows of `window` states (a multiple of the batch size).

    Quality: every state of a window goes out exactly once, in a random batch of that window; a
    batch's states are spread over the window's arrivals (about the last `window` states read),
    never neighbours in a file; states of different windows never share a batch. Which window
    positions make up a batch follows a permutation drawn once per shuffler and rotated by a
    random offset for each window (a fresh permutation per window cost more than reading
    Parquet); the end of a pass (`drain`) draws a fresh one. Then the whole batches held go
    out, and fewer than one batch stays (copied, so that its sources can go) for the next pass.
    """

    def __init__(self, window: int, batch_size: int, dim: int, rng: np.random.Generator):
        self.window = max(batch_size, window // batch_size * batch_size)
        self.batch_size, self.dim, self.rng = batch_size, dim, rng
        self.pieces: list[tuple[np.ndarray, int, int]] = []  # (float32 source, first row, stop)
        self.held = 0
        self.placement: np.ndarray | None = None  # the window's permutation, drawn on first use
        self.item = np.dtype((np.void, 4 * dim))  # a row as one opaque item: one move per row

    def push(self, array: np.ndarray, start: int = 0, stop: int | None = None) -> Iterator[np.ndarray]:
        """Add rows [start, stop) of `array` (float32, one state per row: (n, dim), or (n, *shape)
        in any memory layout; not modified while held); yield batches each time a window fills."""
        array = np.asarray(array)  # a memory map's rows without its per-item overhead
        stop = len(array) if stop is None else stop
        while start < stop:
            take = min(stop - start, self.window - self.held)
            self.pieces.append((array, start, start + take))
            self.held += take
            start += take
            if self.held == self.window:
                if self.placement is None:
                    self.placement = self.rng.permutation(self.window)
                yield from self._draw(self.placement, int(self.rng.integers(self.window)))

    def drain(self) -> Iterator[np.ndarray]:
        """The whole batches held, shuffled; under one batch stays for the next pass."""
        if self.held >= self.batch_size:
            yield from self._draw(self.rng.permutation(self.held), 0)

    def _draw(self, placement: np.ndarray, shift: int) -> Iterator[np.ndarray]:
        """Batches of consecutive entries of `placement` (positions in the window) rotated left by
        `shift`, then the rest kept. A batch's positions are one or two slices of `placement`
        (views): the rotation costs no pass over the window."""
        n = len(placement)
        n_batches = n // self.batch_size
        if len(self.pieces) == 1:  # the window is one slice of one source: positions are its rows
            source, first, stop = self.pieces[0]
            where = None
        elif self.dim < LARGE_ROW:  # small rows: one copy of the window (a few hundred kB) costs
            # less than grouping every batch by source (an argsort per batch: half a Parquet epoch)
            pieces = [a[lo:hi].reshape(hi - lo, self.dim) for a, lo, hi in self.pieces]
            source, first, stop = np.concatenate(pieces), 0, self.held
            where = None
        else:  # the (piece, row) of every position
            where = (np.repeat(np.arange(len(self.pieces)), [b - a for _, a, b in self.pieces]),
                     np.concatenate([np.arange(a, b) for _, a, b in self.pieces]))
        for k in range(n_batches + 1):
            lo = (k * self.batch_size + shift) % n if n else 0
            size = self.batch_size if k < n_batches else n - n_batches * self.batch_size
            positions = placement[lo : lo + size]
            if len(positions) < size:  # the batch wraps around the end of the placement
                positions = np.concatenate([positions, placement[: size - len(positions)]])
            if where is None:
                picked = self._gather(None, positions, source[first:stop])
            else:
                picked = self._gather(where[0][positions], where[1][positions])
            if k < n_batches:
                yield picked
        self.pieces = [(picked, 0, len(picked))] if len(picked) else []
        self.held = len(picked)

    def _gather(self, owner: np.ndarray | None, rows: np.ndarray,
                source: np.ndarray | None = None) -> np.ndarray:
        """The rows (of `source`, or of the pieces' sources `owner`) as one new (n, dim) array,
        grouped by source. Field rows are also taken in row order (a batch is a set; memory maps
        are then read page after page); sorting small rows would cost more than it saves."""
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        large = self.dim >= LARGE_ROW
        if not len(rows):
            return out
        if source is not None or owner[0] == owner[-1] and (owner == owner[0]).all():
            source = self.pieces[owner[0]][0] if source is None else source
            self._take(source, np.sort(rows) if large else rows, out)
            return out
        order = np.lexsort((rows, owner)) if large else np.argsort(owner, kind="stable")
        owner, rows = owner[order], rows[order]
        bounds = [0, *(np.flatnonzero(np.diff(owner)) + 1).tolist(), len(rows)]
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            self._take(self.pieces[owner[lo]][0], rows[lo:hi], out[lo:hi])
        return out

    def _take(self, source: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
        """out[i] = source[rows[i]] flattened. A C-contiguous source is taken as one opaque item
        per row (mode="clip", the rows being valid: the default "raise" buffers `out`, 4x slower
        for fields); any other (a field's channels-first view of a channels-last read) row by
        row, which transposes as it copies, so that a state is still copied once."""
        if source.flags.c_contiguous:
            items = source.reshape(len(source), -1).view(self.item).reshape(-1)
            np.take(items, rows, out=out.view(self.item).reshape(-1), mode="clip")
            return
        shaped = out.reshape(len(rows), *source.shape[1:])
        for i, row in enumerate(rows.tolist()):
            shaped[i] = source[row]
