"""Crawl a data tree into `index/manifest.parquet`: formats, capsules, variables, sample counts.

Per file, metadata only: the first bytes give the format, the name and then the metadata
(global attributes, key-value metadata, a table's header) give the capsule, and the capsule's
extractor plans the file from the reader's `FileInfo`. Text logs are the exception: their
lines are parsed (that is how their records and unparseable lines are counted), and a log
that no capsule's name matches is assigned by which capsule's log rule parses its first
lines. A file that cannot be read gets a one-line `error`; nothing raises out of the crawl
for a bad file.

Re-crawls reuse the rows of files whose size and mtime are unchanged without opening them
(unless the capsule definitions changed since the manifest was written).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import multiprocessing
import os
import re
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from omegaconf import DictConfig
from rich.console import Console
from rich.filesize import decimal
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ebm_vae import __version__
from ebm_vae.capsules import visible_capsules
from ebm_vae.config import CapsuleConfig
from ebm_vae.crawl.manifest import SCHEMA, Manifest, ManifestEntry, read_manifest, write_manifest
from ebm_vae.crawl.scan import FoundFile, scan
from ebm_vae.data.extractors import EXTRACTORS, ExtractError
from ebm_vae.data.extractors.base import read_options
from ebm_vae.data.readers import (
    DEFAULT_OPTIONS,
    READERS,
    FileInfo,
    ReadError,
    ReadOptions,
    read_head,
    sniff_format,
)
from ebm_vae.data.readers.base import one_line
from ebm_vae.errors import ConfigError
from ebm_vae.locks import output_lock

log = logging.getLogger(__name__)
ERRORS_SHOWN = 10
CHUNK_FILES = 64  # files per task sent to a worker process (amortises the round trip)
LOG = "log"
LOG_READER = READERS[LOG]
CONTENT_MATCH = 0.5  # a log goes to a capsule whose rule parses at least this share of its first lines


@dataclass(frozen=True)
class _Rules:
    """A capsule's match rules and read options, compiled once per crawl."""

    capsule: CapsuleConfig
    names: tuple[tuple[str, re.Pattern], ...]
    attrs: dict[str, str]
    columns: tuple[str, ...]
    formats: tuple[str, ...]  # the formats it reads
    options: ReadOptions

    @classmethod
    def of(cls, capsule: CapsuleConfig) -> _Rules:
        names = tuple((p, re.compile(fnmatch.translate(p.lower()))) for p in capsule.match.name)
        attrs = {str(k): str(v).strip().lower() for k, v in capsule.match.attrs.items()}
        return cls(capsule, names, attrs, tuple(capsule.match.columns), _formats(capsule), read_options(capsule))

    def match_name(self, lower_name: str) -> str | None:
        """`name`: any pattern, case-insensitive (the file name given in lower case)."""
        for pattern, regex in self.names:
            if regex.match(lower_name):
                return f"name:{pattern}"
        return None

    def match_info(self, info: FileInfo | None) -> str | None:
        """`attrs`: every key present with an equal value (compared case-insensitively).
        `columns`: every column in a table's header."""
        if info is None:
            return None
        if self.attrs and all(info.attrs.get(k, "").strip().lower() == v for k, v in self.attrs.items()):
            return "attrs:" + ",".join(f"{k}={v}" for k, v in self.capsule.match.attrs.items())
        if self.columns and info.n_rows is not None:
            names = {v.name for v in info.variables}
            if all(c in names for c in self.columns):
                return "columns:" + ",".join(self.columns)
        return None

    def log_rule(self) -> str:
        return "lines:" + ("log.pattern" if self.options.log_pattern else "key=value")


def capsules_fingerprint(capsules: Iterable[CapsuleConfig]) -> str:
    """Changes when a capsule definition (or this package's version) changes: rows assigned
    under other definitions must be re-assigned, even for unchanged files."""
    payload = json.dumps([__version__, *(asdict(c) for c in capsules)], sort_keys=True, default=str)
    return hashlib.sha1(payload.encode()).hexdigest()


def _formats(capsule: CapsuleConfig) -> tuple[str, ...]:
    return tuple(capsule.formats) or EXTRACTORS[capsule.extractor].formats


def _by_content(path: Path, rules: list[_Rules]) -> tuple[list[tuple[_Rules, str]], str | None]:
    """The capsules whose log rule parses most of a log's first lines, or the reason none does."""
    readers = [r for r in rules if LOG in r.formats]
    if not readers:
        return [], "no capsule reads text logs"
    fractions = LOG_READER.sample_fractions(path, [r.options for r in readers])
    hits = [(r, r.log_rule()) for r, f in zip(readers, fractions, strict=True) if f >= CONTENT_MATCH]
    return hits, None if hits else "no capsule's log rule parses its lines"


def identify(root: str, found: FoundFile, rules: list[_Rules]) -> ManifestEntry:
    """The manifest row of one file; every failure becomes the row's one-line `error`.

    A file is read with the options of the one capsule its name matches (CSV lines above the
    header, a log's line rule); a text log that no name matches goes to the capsule whose log
    rule parses most of its first lines (rule `lines:...`), or is indexed with the reason.
    """
    entry = ManifestEntry(found.relpath, found.size, found.mtime_ns)
    path = Path(root, found.relpath)
    info, read_error = None, None
    try:
        entry.format = sniff_format(path, read_head(path))
    except OSError as exc:
        read_error = f"cannot read: {exc.strerror or one_line(exc)}"
    lower = path.name.lower()
    by_name = {id(r): rule for r in rules if (rule := r.match_name(lower)) is not None}
    named = [r for r in rules if id(r) in by_name]
    if found.size == 0:
        read_error = "empty file"
    elif entry.format == LOG and read_error is None:
        try:
            if not named:
                hits, read_error = _by_content(path, rules)
                by_name.update((id(r), rule) for r, rule in hits)
                named = [r for r, _ in hits]
            if len(named) == 1 and LOG in named[0].formats:
                info = LOG_READER.inspect(path, named[0].options)
        except ReadError as exc:
            read_error = str(exc)
        except Exception as exc:  # a library failing on a damaged file in a way we did not foresee
            read_error = f"unreadable {entry.format}: {type(exc).__name__}: {one_line(exc)}"
    elif entry.format is not None and read_error is None:
        options = named[0].options if len(named) == 1 else DEFAULT_OPTIONS
        try:
            info = READERS[entry.format].inspect(path, options)
        except ReadError as exc:
            read_error = str(exc)
        except Exception as exc:  # a library failing on a damaged file in a way we did not foresee
            read_error = f"unreadable {entry.format}: {type(exc).__name__}: {one_line(exc)}"
    if info is not None:
        entry.variables = info.variables
        entry.skipped_rows = info.skipped_rows
    matches = [(r.capsule, rule) for r in rules if (rule := by_name.get(id(r)) or r.match_info(info)) is not None]
    if not matches:
        entry.error = read_error if entry.format is not None or found.size == 0 else None
        return entry
    capsule, entry.rule = matches[0]
    entry.capsule = capsule.name
    formats = _formats(capsule)
    if len(matches) > 1:
        names = [c.name for c, _ in matches]
        entry.error = f"ambiguous: matches {', '.join(names[:-1])} and {names[-1]}"
    elif entry.format is None and read_error is not None:  # not even its first bytes could be read
        entry.error = read_error
    elif entry.format not in formats and found.size > 0:
        entry.error = (f"format not supported: {entry.format or 'unrecognised'} "
                       f"({capsule.name} reads {', '.join(formats)})")
    elif read_error is not None:
        entry.error = read_error
    else:
        try:
            plan = EXTRACTORS[capsule.extractor](capsule).plan(info)
            entry.n_samples, entry.extent = int(plan.n_samples), int(plan.extent)
            if entry.n_samples == 0:  # a header only, an empty record dimension: nothing to learn
                entry.error = "no samples"
        except ExtractError as exc:
            entry.error = str(exc)
        except Exception as exc:  # an extractor bug must not stop the crawl either
            entry.error = f"cannot plan: {type(exc).__name__}: {one_line(exc)}"
    return entry


# Inspection runs in a pool of processes, not threads. Identifying a small file is CPU work in
# the libraries (HDF5 object headers and attribute conversion, netCDF-C metadata, Arrow
# footers, the CSV sample), not waiting on I/O, and a thread holds the GIL or a library lock
# for most of it: h5py serialises every call behind one global lock, and our NetCDF reader
# another (netCDF-C is not thread-safe). So threads stay at about one core. Measured on the
# 10k-small-file bench tree: ~1,450-1,900 files per CPU second (about half of it in HDF5), so
# 2,000 files/s on 2 cores needs both cores: two processes. Even one worker is a process of its
# own (forking costs milliseconds): a reader crashing or hanging on a file then costs that file
# an error row, not the crawl (see `_Inspection._isolate`).
# The progress bar refreshes from this thread rather than its own, so that workers are never
# forked while a thread of ours holds a lock (stdout's, say) the child would inherit held.
_worker_rules: list[_Rules] = []


def _init_worker(rules: list[_Rules]) -> None:
    global _worker_rules
    _worker_rules = rules


def _identify_chunk(root: str, chunk: list[FoundFile]) -> list[ManifestEntry]:
    return [identify(root, found, _worker_rules) for found in chunk]


def cpu_count() -> int:
    """CPUs this process may run on (a container's share, not the host's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class _Inspection:
    """Rows for the files to (re-)inspect, with progress and periodic checkpoints."""

    def __init__(self, root: str, todo: list[FoundFile], rules: list[_Rules], progress: Progress,
                 checkpoint: Callable[[list[ManifestEntry]], object], checkpoint_s: float, file_timeout_s: float):
        self.root, self.todo, self.rules, self.timeout_s = root, todo, rules, file_timeout_s
        self.progress, self.checkpoint, self.checkpoint_s = progress, checkpoint, checkpoint_s
        self.task = progress.add_task("crawl", total=len(todo), rate=0.0, size=decimal(0))
        self.entries: list[ManifestEntry] = []
        self.done_bytes = 0
        self.start = self.last_checkpoint = self.last_refresh = time.perf_counter()

    def advance(self, batch: list[ManifestEntry]) -> None:
        self.entries.extend(batch)
        self.done_bytes += sum(e.size for e in batch)
        now = time.perf_counter()
        refresh = now - self.last_refresh >= 0.1 or len(self.entries) == len(self.todo)
        self.progress.update(self.task, advance=len(batch), size=decimal(self.done_bytes),
                             rate=len(self.entries) / max(now - self.start, 1e-9), refresh=refresh)
        self.last_refresh = now if refresh else self.last_refresh
        if now - self.last_checkpoint >= self.checkpoint_s and len(self.entries) < len(self.todo):
            self.checkpoint(self.entries)
            self.last_checkpoint = time.perf_counter()

    def run(self, workers: int | None) -> list[ManifestEntry]:
        """In `workers` processes (default: one per CPU; fewer for few files)."""
        chunks = deque(self.todo[i : i + CHUNK_FILES] for i in range(0, len(self.todo), CHUNK_FILES))
        n_procs = max(1, min(workers or cpu_count(), len(chunks)))
        while chunks:
            suspects = self._pool(chunks, n_procs)
            while suspects:  # a file crashed a worker (a reader's segfault) or hung it: isolate it
                suspects = self._isolate(suspects)
        return self.entries

    def _executor(self, n_procs: int) -> ProcessPoolExecutor:
        context = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
        return ProcessPoolExecutor(n_procs, mp_context=context, initializer=_init_worker,
                                   initargs=(self.rules,))

    def _pool(self, chunks: deque[list[FoundFile]], n_procs: int) -> list[FoundFile]:
        """Run chunks off the queue, two per worker in flight, until it is empty or a worker is
        lost; return the files of the chunks in flight when a worker crashed, or when none of
        them finished within the time limit (a hung reader, or 64 very slow files: the
        isolation then gives each file the limit of its own)."""
        running: dict = {}  # future -> chunk, in the order submitted
        with self._executor(n_procs) as pool:
            while running or chunks:
                try:
                    while chunks and len(running) < 2 * n_procs:
                        future = pool.submit(_identify_chunk, self.root, chunks[0])
                        running[future] = chunks.popleft()
                except BrokenProcessPool:  # a crash shows in the futures below
                    if not running:  # a worker that died before any file: no file to blame
                        raise
                done, _ = wait(running, self.timeout_s, return_when=FIRST_COMPLETED)
                if not done:
                    _stop(pool)
                    return [found for chunk in running.values() for found in chunk]
                lost = []
                for future in [f for f in running if f in done]:  # in order: checkpoints stay a prefix
                    try:
                        self.advance(future.result())
                    except BrokenProcessPool:
                        lost.extend(running[future])
                    del running[future]
                if lost:  # the pool is broken: every chunk still in flight fails or has finished
                    for future, chunk in running.items():
                        try:
                            self.advance(future.result())
                        except BrokenProcessPool:
                            lost.extend(chunk)
                    return lost
        return []

    def _isolate(self, suspects: list[FoundFile]) -> list[FoundFile]:
        """One worker, one file per task, one task at a time, each within the time limit: the
        first file that crashes the worker or outlasts the limit is the culprit (the files after
        it are returned to try again in a fresh worker)."""
        with self._executor(1) as pool:
            for i, found in enumerate(suspects):
                try:
                    self.advance(pool.submit(_identify_chunk, self.root, [found]).result(self.timeout_s))
                    continue
                except BrokenProcessPool:
                    reason = "the reader crashed on this file"
                except TimeoutError:
                    _stop(pool)
                    reason = f"the reader did not finish within {self.timeout_s:g} s"
                log.warning("%s: %s", found.relpath, reason)
                self.advance([ManifestEntry(found.relpath, found.size, found.mtime_ns, error=f"unreadable: {reason}")])
                return suspects[i + 1 :]
        return []


def _stop(pool: ProcessPoolExecutor) -> None:
    """Kill the pool's workers: one is stuck in a library call that may never return."""
    for process in list(pool._processes.values()):  # no public way before Python 3.14
        process.kill()


def _previous(index_dir: Path, root: Path, fingerprint: str, replace_index: bool) -> Manifest | None:
    """The last manifest of this root written under the same capsule definitions, if any.

    An index holds one data tree: the manifest of another root is refused, or with
    `replace_index` removed together with the statistics that describe it.
    """
    try:
        previous = read_manifest(index_dir)
    except (FileNotFoundError, ValueError, OSError, pa.ArrowException) as exc:
        if not isinstance(exc, FileNotFoundError):
            log.warning("ignoring the previous manifest in %s: %s", index_dir, one_line(exc))
        return None
    if previous.root != root:
        if not replace_index:
            raise ConfigError(
                f"{index_dir} is the index of data.root={previous.root} ({len(previous)} files; the "
                f"checkpoints and maps under this paths.root describe that tree), not of {root}: give "
                f"{root} its own paths.root=DIR, or replace that index with crawl.replace_index=true")
        stale = sorted(index_dir.glob("*/stats.json"))
        for path in stale:
            path.unlink()
        log.warning("replacing the index of %s (%d files) in %s with one of %s (crawl.replace_index=true); "
                    "removed its statistics (%s); checkpoints and maps under this paths.root still "
                    "describe the old tree", previous.root, len(previous), index_dir, root,
                    ", ".join(p.parent.name for p in stale) or "none")
        return None
    if previous.capsules_fingerprint != fingerprint:
        log.info("capsule definitions changed since the last crawl: re-assigning every file")
        return None
    return previous


class _Update:
    """A crawl relative to the previous manifest: rows that still hold, files to (re-)inspect.

    `assemble` gives a consistent manifest at any point of the crawl: previous rows of the
    files not re-inspected yet (their recorded size and mtime still tell a later crawl to
    redo them) plus the fresh rows. So a checkpoint written mid-crawl lets a re-crawl after a
    kill continue where it stopped.
    """

    def __init__(self, previous: Manifest | None, found: list[FoundFile], root: Path, fingerprint: str):
        self.root, self.fingerprint = root, fingerprint
        self.table = previous.table if previous is not None else SCHEMA.empty_table()
        paths = self.table["path"].to_pylist()
        index = {p: (i, s, m) for i, (p, s, m) in enumerate(zip(
            paths, self.table["size"].to_pylist(), self.table["mtime_ns"].to_pylist(), strict=True))}
        self.kept: list[int] = []  # previous rows of unchanged files
        self.stale: dict[str, int] = {}  # previous rows of changed files, by path
        self.todo: list[FoundFile] = []
        for f in found:
            i, size, mtime_ns = index.get(f.relpath, (None, None, None))
            if (size, mtime_ns) == (f.size, f.mtime_ns):
                self.kept.append(i)
                continue
            self.todo.append(f)
            if i is not None:
                self.stale[f.relpath] = i

    def assemble(self, fresh: list[ManifestEntry]) -> Manifest:
        done = {e.path for e in fresh}
        old = self.kept + [i for p, i in self.stale.items() if p not in done]
        new = pa.Table.from_pylist([e.to_row() for e in fresh], schema=SCHEMA)
        table = pa.concat_tables([self.table.take(pa.array(old, pa.int64())), new]).sort_by("path")
        return Manifest(table, self.root, self.fingerprint)

    def replaced(self) -> pa.Table:
        """Previous rows that are gone from the new manifest (files changed or deleted)."""
        mask = np.ones(self.table.num_rows, dtype=bool)
        mask[self.kept] = False
        return self.table.filter(mask)


def _usable_capsules(table: pa.Table) -> set[str]:
    return {c for c, e in zip(table["capsule"].to_pylist(), table["error"].to_pylist(), strict=True)
            if c is not None and e is None}


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:,.0f} files/s"), TextColumn("{task.fields[size]}"),
        TimeElapsedColumn(), disable=not enabled, auto_refresh=False,  # no thread when workers fork
    )


def summarize(manifest: Manifest, capsules: Iterable[str], console: Console) -> None:
    """Per capsule: files, bytes, samples, errors (and rows skipped inside usable files, where
    any: log lines that do not parse); then the first error lines."""
    names = ("path", "size", "capsule", "n_samples", "error", "skipped_rows")
    columns = {k: manifest.table[k].to_pylist() for k in names}
    totals: dict[str, list[int]] = {name: [0, 0, 0, 0, 0] for name in capsules}
    errors = []
    for path, size, capsule, n_samples, error, skipped in zip(*columns.values(), strict=True):
        slot = totals.setdefault(capsule or "(none)", [0, 0, 0, 0, 0])
        slot[0] += 1
        slot[1] += size
        slot[2] += n_samples
        if error is not None:
            slot[3] += 1
            errors.append(f"{path}: {error}")
        else:
            slot[4] += skipped or 0
    table = Table(title=f"{manifest.root}: {len(manifest)} files")
    shown = ("capsule", "files", "bytes", "samples", "errors")
    any_skipped = any(slot[4] for slot in totals.values())
    for name in shown + (("skipped lines",) if any_skipped else ()):
        table.add_column(name, justify="left" if name == "capsule" else "right")
    for name, (files, size, samples, n_errors, skipped) in totals.items():
        row = [name, f"{files:,}", decimal(size), f"{samples:,}", f"{n_errors:,}"]
        table.add_row(*row, *([f"{skipped:,}"] if any_skipped else []))
    console.print(table)
    for line in errors[:ERRORS_SHOWN]:
        console.print(f"  [red]error[/red] {escape(line)}", highlight=False, soft_wrap=True)
    if len(errors) > ERRORS_SHOWN:
        console.print(f"  ... and {len(errors) - ERRORS_SHOWN} more (the `error` column of the manifest)")
    if any_skipped:
        console.print("  skipped lines: lines of usable logs that do not parse (the `skipped_rows` column)")


def crawl(cfg: DictConfig) -> Manifest:
    """Index `cfg.data.root` into `${paths.index}/manifest.parquet` and return the manifest.

    Then, with `crawl.stats`, run the statistics pass of every capsule whose usable files
    changed (or whose stats.json is missing). The crawl holds the index's lock throughout: a
    second crawl, or a training run or export reading the index, waits until it is done (and
    says so). An index of another data tree is refused (`crawl.replace_index=true` replaces it).
    """
    if not cfg.data.root:
        raise ConfigError("data.root is not set: ebm-vae-crawl data.root=DIR")
    root = Path(cfg.data.root).expanduser().resolve()
    if not root.is_dir():
        raise NotADirectoryError(f"data.root={cfg.data.root}: not a directory")
    index_dir = Path(cfg.paths.index).expanduser().resolve()
    if index_dir == root or root in index_dir.parents:
        raise ConfigError(f"paths.index={index_dir} lies inside data.root={root}: the crawl never "
                          "writes into the data tree; set paths.root elsewhere")
    capsules = dict(sorted(visible_capsules(cfg.capsule_search_path).items()))  # bad ones fail first
    with output_lock(index_dir, f"the crawl of {root}"):
        return _crawl(cfg, root, index_dir, capsules)


def _crawl(cfg: DictConfig, root: Path, index_dir: Path, capsules: dict[str, CapsuleConfig]) -> Manifest:
    fingerprint = capsules_fingerprint(capsules.values())
    previous = _previous(index_dir, root, fingerprint, cfg.crawl.replace_index)

    started = time.perf_counter()
    found = list(scan(root))
    update = _Update(previous, found, root, fingerprint)
    rules = [_Rules.of(c) for c in capsules.values()]
    with _progress(cfg.crawl.progress and bool(update.todo)) as progress:
        inspection = _Inspection(str(root), update.todo, rules, progress, checkpoint_s=cfg.crawl.checkpoint_s,
                                 checkpoint=lambda rows: write_manifest(update.assemble(rows), index_dir),
                                 file_timeout_s=cfg.crawl.file_timeout_s)
        fresh = inspection.run(cfg.crawl.workers)
    manifest = update.assemble(fresh)
    n_dropped = update.table.num_rows - len(update.kept) - len(update.stale)
    if previous is None or update.todo or n_dropped:  # an unchanged tree leaves the index as it is
        write_manifest(manifest, index_dir)
    elapsed = time.perf_counter() - started
    log.info("crawled %d files (%d inspected, %d unchanged, %d gone) in %.2f s -> %s", len(found),
             len(update.todo), len(update.kept), n_dropped, elapsed, index_dir / "manifest.parquet")
    summarize(manifest, capsules, Console())

    if cfg.crawl.stats:  # imported here: the statistics pass pulls in the stream (and torch)
        from ebm_vae.data.stats import run_stats_pass

        gained = {e.capsule for e in fresh if e.capsule is not None and e.error is None}
        changed = gained | _usable_capsules(update.replaced())  # lost usable files: changed too
        usable_now = _usable_capsules(manifest.table)
        for name in sorted(usable_now):
            if name in changed or not (index_dir / name / "stats.json").is_file():
                run_stats_pass(manifest, capsules[name], index_dir, cfg)
    return manifest
