"""Work in processes that may die: a library that crashes or hangs on one file costs that file.

libhdf5 and netCDF-C segfault on some damaged files and never return on others, in metadata
(the crawl) and in data chunks (the statistics pass, the state cache). Every read of that kind
runs here, in a pool of worker processes: a worker that dies (its pool breaks) or makes no
progress for `timeout_s` is stopped, the items it held are re-run one at a time in a fresh
worker, and the item that crashes or stalls alone is reported as failed; the others go on.

Progress is a heartbeat: a worker calls `heartbeat()` (any time it makes progress, e.g. after
each chunk it reads), so a long read of a large file is not taken for a hang; a task's clock
starts when a worker picks it up. Items travel in chunks of `chunk_size` to amortise the round
trip; results come back per chunk, in the order submitted among those done.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
POLL_S = 0.5  # how often the parent looks at the heartbeats

_beats: Any = None  # per-slot (monotonic time of the last beat, progress units), shared memory
_slot = -1  # this worker's slot while it runs a task


def heartbeat(progress: float = 0.0) -> None:
    """Say that the current task is alive (in a worker; a no-op elsewhere); `progress` units
    (e.g. samples read) are added to what the parent can show."""
    if _beats is not None and _slot >= 0:
        _beats[2 * _slot] = time.monotonic()
        _beats[2 * _slot + 1] += progress


def _init_worker(beats: Any, initializer: Callable[..., None] | None, initargs: tuple) -> None:
    global _beats
    _beats = beats
    if initializer is not None:
        initializer(*initargs)


def _run_task(fn: Callable[[list], list], slot: int, chunk: list) -> list:
    global _slot
    _slot = slot
    heartbeat()
    try:
        return fn(chunk)
    finally:
        _slot = -1


@dataclass(frozen=True)
class Failure:
    """Why an item was given up: its worker crashed, or it made no progress for `timeout_s`."""

    kind: str  # "crash" or "hang"
    timeout_s: float

    def describe(self, what: str = "the reader") -> str:
        if self.kind == "crash":
            return f"{what} crashed on this file"
        return f"{what} did not finish within {self.timeout_s:g} s"


class IsolatedPool(Generic[T]):
    """`fn(chunk of items) -> list of results` in `workers` processes, surviving crashes and hangs.

    `on_done(chunk, results)` is called in the parent for every chunk that finished;
    `on_failed(item, Failure)` for every item that crashed or hung a worker on its own.
    """

    def __init__(self, fn: Callable[[list[T]], list], *, workers: int, timeout_s: float,
                 on_done: Callable[[list[T], list], None], on_failed: Callable[[T, Failure], None],
                 initializer: Callable[..., None] | None = None, initargs: tuple = (),
                 progress: Callable[[float], None] | None = None):
        self.fn, self.workers, self.timeout_s = fn, max(1, workers), float(timeout_s)
        self.on_done, self.on_failed, self.progress = on_done, on_failed, progress
        self.initializer, self.initargs = initializer, initargs

    def run(self, items: Sequence[T], chunk_size: int = 1) -> None:
        chunks = deque(list(items[i : i + chunk_size]) for i in range(0, len(items), chunk_size))
        n_procs = max(1, min(self.workers, len(chunks)))
        while chunks:
            suspects = self._pool(chunks, n_procs)
            while suspects:  # a worker crashed or hung: find the item that did it
                suspects = self._isolate(suspects)

    def _executor(self, n_procs: int, beats: Any) -> ProcessPoolExecutor:
        # fork on POSIX: workers start in milliseconds and inherit the parent's imports. The
        # parent must hold no lock in another thread while it forks (no auto-refreshing bars).
        context = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
        return ProcessPoolExecutor(n_procs, mp_context=context, initializer=_init_worker,
                                   initargs=(beats, self.initializer, self.initargs))

    def _beats(self, n_slots: int) -> Any:
        context = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
        beats = context.RawArray("d", 2 * n_slots)
        for slot in range(n_slots):
            beats[2 * slot] = math.inf  # not started
        return beats

    def _stalled(self, beats: Any, slot: int) -> bool:
        return time.monotonic() - beats[2 * slot] > self.timeout_s

    def _collect_progress(self, beats: Any, seen: list[float]) -> None:
        """Hand the progress units reported since the last look to `self.progress` (the
        workers only add to their slot's counter; the parent remembers what it has seen)."""
        if self.progress is None:
            return
        done = 0.0
        for slot in range(len(seen)):
            total = beats[2 * slot + 1]
            done, seen[slot] = done + total - seen[slot], total
        if done:
            self.progress(done)

    def _pool(self, chunks: deque[list[T]], n_procs: int) -> list[T]:
        """Run chunks off the queue, two per worker in flight, until it is empty or a worker is
        lost; return the items of the chunks held when a worker crashed or stalled (the chunks
        still queued stay in `chunks`)."""
        n_slots = 2 * n_procs
        beats, seen = self._beats(n_slots), [0.0] * n_slots
        free = list(range(n_slots))
        running: dict[Future, tuple[int, list[T]]] = {}  # future -> (slot, chunk), in order
        with self._executor(n_procs, beats) as pool:
            while running or chunks:
                try:
                    while chunks and free:
                        slot = free.pop()
                        beats[2 * slot] = math.inf
                        future = pool.submit(_run_task, self.fn, slot, chunks[0])
                        running[future] = (slot, chunks.popleft())
                except BrokenProcessPool:  # a crash shows in the futures below
                    if not running:  # a worker that died before any item: no item to blame
                        raise
                done, _ = wait(running, min(POLL_S, self.timeout_s), return_when=FIRST_COMPLETED)
                self._collect_progress(beats, seen)
                lost: list[T] = []
                for future in [f for f in running if f in done]:  # in order submitted
                    slot, chunk = running.pop(future)
                    free.append(slot)
                    try:
                        self.on_done(chunk, future.result())
                    except BrokenProcessPool:
                        lost.extend(chunk)
                if lost:  # the pool is broken: every chunk still held fails or has finished
                    for future, (_, chunk) in running.items():
                        try:
                            self.on_done(chunk, future.result())
                        except BrokenProcessPool:
                            lost.extend(chunk)
                    return lost
                stalled = [f for f, (slot, _) in running.items() if self._stalled(beats, slot)]
                if stalled:
                    _stop(pool)
                    held = [(f, chunk) for f, (_, chunk) in running.items()]
                    for future, chunk in reversed(held):
                        if future not in stalled:  # killed with the pool, innocent: again
                            chunks.appendleft(chunk)
                    culprits = [item for f, chunk in held if f in stalled for item in chunk]
                    if len(culprits) == 1:  # nothing to isolate: it stalled on its own
                        self._fail(culprits[0], Failure("hang", self.timeout_s))
                        return []
                    return culprits
        return []

    def _isolate(self, suspects: list[T]) -> list[T]:
        """One worker, one item per task, one task at a time: the first item that crashes the
        worker or stalls is the culprit; the items after it are returned to try again."""
        beats, seen = self._beats(1), [0.0]
        with self._executor(1, beats) as pool:
            for i, item in enumerate(suspects):
                beats[0] = math.inf
                future = pool.submit(_run_task, self.fn, 0, [item])
                failure = None
                while failure is None:
                    done, _ = wait([future], min(POLL_S, self.timeout_s))
                    self._collect_progress(beats, seen)
                    if done:
                        try:
                            self.on_done([item], future.result())
                        except BrokenProcessPool:
                            failure = Failure("crash", self.timeout_s)
                        break
                    if self._stalled(beats, 0):
                        _stop(pool)
                        failure = Failure("hang", self.timeout_s)
                if failure is not None:
                    self._fail(item, failure)
                    return suspects[i + 1 :]
        return []

    def _fail(self, item: T, failure: Failure) -> None:
        log.debug("giving up %r: %s", item, failure.kind)
        self.on_failed(item, failure)


def _stop(pool: ProcessPoolExecutor) -> None:
    """Kill the pool's workers: one is stuck in a library call that may never return."""
    for process in list(pool._processes.values()):  # no public way before Python 3.14
        process.kill()
