"""One pass over every file of a capsule: in worker processes, per file, in order, across ranks.

The statistics pass and the state cache's fill pass read whole files. A read of HDF5/NetCDF data
can crash or hang the process (damaged chunks pass the crawl, which reads metadata only), so
files are read in an `IsolatedPool`: a file that crashes its worker or makes no progress for
`crawl.file_timeout_s` is **quarantined**, its reason written to the manifest's `error` column
(the next crawl keeps the row while the file is unchanged, so the statistics, the stream and
exports skip it too), and the pass goes on. A file that fails with an ordinary error (changed
since the crawl, unreadable) is skipped with its reason.

Per file a worker returns a `FileResult`: the caller's accumulator of the file's states (any
object with `add(states)`, e.g. moments), the samples read per block (byte-extent formats),
and whether the file's states were written to the cache. Results reach the caller in file
order whatever the number of processes, so merges are deterministic.

Across nodes the pass runs under the training's launcher (torchrun, SLURM): each rank reads a
disjoint share of the files (`share`) and the results meet by `all_gather` (`Distributed`).
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from ebm_vae.data.cache import StateCache
from ebm_vae.data.extractors import Extractor, StateInfo
from ebm_vae.data.extractors.base import flat_states
from ebm_vae.data.readers.base import one_line
from ebm_vae.data.units import (
    BlockGrid,
    WorkUnit,
    block_grid,
    byte_extent,
    check_unchanged,
    deal,
    entry_plan,
)
from ebm_vae.isolation import Failure, IsolatedPool, heartbeat

log = logging.getLogger(__name__)

QUARANTINE = "quarantined: "  # the prefix of a manifest error set by a pass, not by the crawl


@dataclass(frozen=True)
class FileTask:
    index: int  # position in the pass (results come back in this order)
    unit: WorkUnit  # the whole file
    grid: BlockGrid
    write_cache: bool = False


@dataclass
class FileResult:
    index: int
    path: str
    accumulator: Any = None
    n_read: int = 0  # states read, NaN/Inf ones included
    n_finite: int = 0
    skipped_rows: int = 0  # rows or lines the reader could not parse (ragged CSV rows, log lines)
    block_counts: list[int] | None = None  # byte-extent formats: states read per block ...
    block_length: int = 0  # ... of this many bytes
    cached: bool = False
    cache_error: str | None = None  # why the states could not be cached (the file still counts)
    error: str | None = None  # an ordinary failure: skipped
    failure: Failure | None = None  # a crash or a hang: quarantined

    def record(self) -> dict[str, Any]:
        """The file's entry in `stats.json`."""
        out: dict[str, Any] = {"path": self.path, "n_read": self.n_read, "n_finite": self.n_finite,
                               "skipped_rows": self.skipped_rows}
        if self.block_counts is not None:
            out["blocks"] = {"length": self.block_length, "counts": self.block_counts}
        return out


def _chunks(extractor: Extractor, handle: Any, task: FileTask, chunk: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(states, block of each state) over the whole file, in file order. Byte-extent files
    are read block by block (a block's sample count is only known by reading it)."""
    plan, grid = task.unit.plan, task.grid
    if byte_extent(task.unit.format) and not grid.by_sample:
        for block in range(grid.n_blocks):
            start, stop = grid.bounds(block, block + 1)
            for states in map(flat_states, extractor.iter_states(handle, plan, start, stop, chunk)):
                yield states, np.full(len(states), block)
        return
    # a block of the grid holds `per_block` consecutive samples
    per_block = grid.length if grid.by_sample else grid.length * (plan.n_samples // max(1, plan.extent))
    position = 0
    for states in map(flat_states, extractor.iter_states(handle, plan, 0, plan.extent, chunk)):
        yield states, (position + np.arange(len(states))) // max(1, per_block)
        position += len(states)


def read_file(task: FileTask, extractor: Extractor, root: Path, chunk: int, accumulator: Any,
              cache: StateCache | None) -> FileResult:
    """One file's pass (in a worker): every state goes to `accumulator.add`, and its finite
    states to a cache shard when the task says so. A failing shard write (a full disk) only
    leaves the file uncached: `cache_error` says why."""
    unit, grid = task.unit, task.grid
    result = FileResult(task.index, unit.path, accumulator)
    counts = np.zeros(grid.n_blocks, dtype=np.int64)
    writer = _ShardWrite(cache, unit, grid) if cache is not None and task.write_cache else None
    try:
        path = check_unchanged(root, unit)
        with extractor.open(path, unit.format) as handle:
            for states, blocks in _chunks(extractor, handle, task, chunk):
                accumulator.add(states)
                finite = np.isfinite(states).all(axis=1)
                all_finite = bool(finite.all())
                result.n_read += len(states)
                result.n_finite += len(states) if all_finite else int(finite.sum())
                raw = np.bincount(blocks, minlength=grid.n_blocks)
                counts += raw
                if writer is not None:
                    kept = states if all_finite else states[finite]
                    writer.add(kept, raw if all_finite else np.bincount(blocks[finite], minlength=grid.n_blocks),
                               raw)
                heartbeat(len(states))
            result.skipped_rows = handle.skipped_rows
    except Exception as exc:  # a bad file never stops the pass: skipped, with its reason
        if writer is not None:
            writer.abort()
        return FileResult(task.index, unit.path, error=one_line(exc))
    if writer is not None:
        result.cached, result.cache_error = writer.commit()
    if byte_extent(unit.format) and not grid.by_sample:
        result.block_counts, result.block_length = counts.tolist(), grid.length
    return result


class _ShardWrite:
    """A shard being written, whose failure (a full disk, a cache folder that vanished) stops
    the shard, not the pass that feeds it."""

    def __init__(self, cache: StateCache, unit: WorkUnit, grid: BlockGrid):
        self.writer, self.error = None, None
        try:
            self.writer = cache.writer(unit, grid)
        except Exception as exc:
            self.error = one_line(exc)

    def add(self, *args: Any) -> None:
        if self.writer is None:
            return
        try:
            self.writer.add(*args)
        except Exception as exc:
            self.abort()
            self.error = one_line(exc)

    def commit(self) -> tuple[bool, str | None]:
        if self.writer is None:
            return False, self.error
        try:
            self.writer.commit()
        except Exception as exc:
            return False, one_line(exc)
        return True, None

    def abort(self) -> None:
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.abort()
            self.writer = None


# The worker side: what every task of one pass shares, set once per worker process.
_context: dict[str, Any] = {}


def _init_worker(context: dict[str, Any]) -> None:
    _context.clear()
    _context.update(context)


def _read_chunk(tasks: list[FileTask]) -> list[FileResult]:
    c = _context
    return [read_file(t, c["extractor"], c["root"], c["chunk"], c["accumulator"](t), c["cache"]) for t in tasks]


@dataclass
class FilePass:
    """Runs `read_file` over tasks in `workers` isolated processes (0: in this process, without
    isolation) and hands the results to `on_result` in task order."""

    extractor: Extractor
    root: Path
    chunk: int
    accumulator: Callable[[FileTask], Any]  # a fresh accumulator per file (module-level: pickled)
    cache: StateCache | None
    workers: int
    timeout_s: float
    on_result: Callable[[FileResult], None]
    progress: bool = False
    description: str = ""
    _pending: list = field(default_factory=list)
    _next: int = 0

    def run(self, tasks: Sequence[FileTask]) -> None:
        self._pending, self._next = [], tasks[0].index if tasks else 0
        context = {"extractor": self.extractor, "root": self.root, "chunk": self.chunk,
                   "accumulator": self.accumulator, "cache": self.cache}
        columns = (TextColumn("[bold]{task.description}"), BarColumn(),
                   TextColumn("{task.completed:,.0f}/{task.total:,.0f} samples"), TimeRemainingColumn())
        # no auto-refresh thread: workers fork from this process
        with Progress(*columns, disable=not self.progress, auto_refresh=False) as bar:
            task_id = bar.add_task(self.description, total=sum(t.unit.plan.n_samples for t in tasks))

            def advance(samples: float) -> None:
                bar.update(task_id, advance=samples, refresh=True)

            if self.workers == 0:
                _init_worker(context)
                for task in tasks:
                    (result,) = _read_chunk([task])
                    advance(result.n_read)
                    self._deliver(result)
                return
            pool = IsolatedPool(_read_chunk, workers=self.workers, timeout_s=self.timeout_s,
                                on_done=lambda _, results: [self._deliver(r) for r in results],
                                on_failed=self._failed, initializer=_init_worker, initargs=(context,),
                                progress=advance)
            pool.run(list(tasks), chunk_size=1)

    def _failed(self, task: FileTask, failure: Failure) -> None:
        reason = failure.describe("the reader") + " (reading its data)"
        log.warning("%s: %s; quarantined (recorded in the manifest)", task.unit.path, reason)
        self._deliver(FileResult(task.index, task.unit.path, failure=failure, error=reason))

    def _deliver(self, result: FileResult) -> None:
        heapq.heappush(self._pending, (result.index, id(result), result))
        while self._pending and self._pending[0][0] == self._next:
            self.on_result(heapq.heappop(self._pending)[2])
            self._next += 1


def file_tasks(extractor: Any, entries: list, state: StateInfo, val_block: int,
               cache: StateCache | None, skipped: list[dict[str, Any]]) -> list[tuple[WorkUnit, Any, bool]]:
    """(whole-file unit, block grid, write to the cache) of every entry whose state is `state`;
    the others are appended to `skipped` with a warning."""
    out = []
    for entry in entries:
        plan = entry_plan(extractor, entry)
        if plan.state != state:
            reason = f"state shape {plan.state.shape} differs from the capsule's {state.shape}"
            log.warning("skipping %s: %s", entry.path, reason)
            skipped.append({"path": entry.path, "size": entry.size, "mtime_ns": entry.mtime_ns, "reason": reason})
            continue
        unit, grid = WorkUnit.whole(entry, plan), block_grid(plan, val_block)
        out.append((unit, grid, cache is not None and cache.lookup(cache.key(unit, grid)) is None))
    return out


def default_workers(configured: int | None, n_files: int) -> int:
    """`crawl.stats_workers`, or one per CPU this process may use, shared by the ranks of a node."""
    if configured is not None:
        return max(0, int(configured))
    from ebm_vae.crawl.crawl import cpu_count

    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, min(n_files, cpu_count() // max(1, local)))


def share(tasks: Sequence[FileTask], rank: int, world: int) -> list[FileTask]:
    """The tasks of one rank: dealt in order to the rank holding the fewest bytes so far."""
    return deal(tasks, lambda task: task.unit.size, world, rank)


class Distributed:
    """The ranks of the training's launcher, for a pass that runs before training starts.

    Inside a running process group, that group; else, when the environment of torchrun
    (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) or of SLURM (through Lightning's cluster
    environment) says there are several ranks, a gloo group made for the pass and destroyed
    after it; else a world of one."""

    def __init__(self) -> None:
        self.rank, self.world, self.owned = 0, 1, False

    def __enter__(self) -> Distributed:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            return self
        rank, world = _launcher_ranks()
        if world > 1 and dist.is_available():
            dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world)
            self.rank, self.world, self.owned = rank, world, True
        return self

    def __exit__(self, *exc: object) -> None:
        if self.owned:
            import torch.distributed as dist

            with contextlib.suppress(Exception):
                dist.destroy_process_group()

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order (pickled; the group's backend carries them)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def launched_ranks() -> int:
    """How many ranks this process is one of (a running process group's, or the launcher's)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return _launcher_ranks()[1]


def _launcher_ranks() -> tuple[int, int]:
    """(rank, world) from torchrun's or SLURM's environment; (0, 1) without one."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    from lightning.fabric.plugins.environments import SLURMEnvironment

    if SLURMEnvironment.detect():
        slurm = SLURMEnvironment()
        os.environ.setdefault("MASTER_ADDR", slurm.main_address)
        os.environ.setdefault("MASTER_PORT", str(slurm.main_port))
        return slurm.global_rank(), slurm.world_size()
    return 0, 1


def quarantine(index_dir: str | Path | None, manifest: Any, failed: dict[str, str]) -> None:
    """Record `failed` ({path: reason}) in the manifest's `error` column: in `manifest` (memory),
    and with `index_dir` on disk too.

    The file on disk is read again just before writing, so rows a concurrent crawl wrote since
    are kept; only rows whose size and mtime still match the failed files change."""
    if not failed:
        return
    errors = {p: QUARANTINE + r for p, r in failed.items()}
    manifest.set_errors(errors)
    if index_dir is None:
        return
    from ebm_vae.crawl.manifest import read_manifest, write_manifest
    from ebm_vae.locks import output_lock

    with output_lock(index_dir, "recording quarantined files"):  # re-entrant: the crawl holds it
        try:
            on_disk = read_manifest(index_dir)
        except FileNotFoundError:
            return
        on_disk.set_errors(errors, only_like={e.path: (e.size, e.mtime_ns) for e in manifest.entries()
                                              if e.path in failed})
        write_manifest(on_disk, index_dir)


class _Nothing:
    """The accumulator of a pass that only fills the cache."""

    def add(self, states: np.ndarray) -> None:
        pass


def _nothing(task: FileTask) -> _Nothing:
    return _Nothing()


def fill_cache(manifest: Any, capsule: Any, cfg: Any, cache: StateCache, index_dir: str | Path) -> int:
    """Write the shards that `cache` lacks for `capsule`'s usable files (statistics already
    exist): the same isolated pass, quarantining the same way. Returns the files read."""
    from ebm_vae.data.extractors import EXTRACTORS
    from ebm_vae.data.units import chunk_samples

    extractor = EXTRACTORS[capsule.extractor](capsule)
    todo = [FileTask(0, u, g, w) for u, g, w in file_tasks(extractor, manifest.usable(capsule.name), cache.state,
                                                            cfg.data.val_block, cache, []) if w]
    if not todo:
        return 0
    failed: dict[str, str] = {}

    def collect(result: FileResult) -> None:
        if result.failure is not None:
            failed[result.path] = result.error
        elif result.error is not None or result.cache_error is not None:
            log.warning("not caching %s: %s", result.path, result.error or result.cache_error)

    with Distributed() as ranks:
        mine = [FileTask(i, t.unit, t.grid, True) for i, t in enumerate(share(todo, ranks.rank, ranks.world))]
        FilePass(extractor, Path(manifest.root), chunk_samples(cache.state, cfg.data.chunk_bytes), _nothing,
                 cache, default_workers(cfg.crawl.get("stats_workers"), len(mine)), cfg.crawl.file_timeout_s,
                 collect, progress=cfg.crawl.progress, description=f"cache {capsule.name}").run(mine)
        failures = {p: r for part in ranks.all_gather(failed) for p, r in part.items()}
        quarantine(index_dir if ranks.rank == 0 else None, manifest, failures)
        ranks.barrier()
    return len(todo)
