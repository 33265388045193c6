"""Per-capsule state statistics (`index/<capsule>/stats.json`) and the pass that makes them.

The pass reads every usable file of a capsule chunk by chunk through its extractor, a file per
task in worker processes (`ebm_vae.data.filepass`: a file that crashes or hangs its reader is
quarantined, not fatal; several ranks under torchrun/SLURM share the files). Each chunk's
moments are computed in float64 and merged with Chan's parallel update, which is exact for any
split of the data; files are merged in path order, so the result does not depend on the number
of processes, and the ranks' totals merge the same way (equal to float64 rounding). A sample
with any NaN/Inf component is excluded (the stream drops it too, so the normalisation describes
exactly what is trained on); NaN and Inf are counted per component. For field states a
principal basis is kept: the top components of a uniform sample of bounded size (`Sample`,
mergeable), in physical units centred at the mean. The running total is saved every
`crawl.checkpoint_s` seconds, so a killed pass resumes where it stopped.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ebm_vae.config import CapsuleConfig
from ebm_vae.data.cache import StateCache, state_cache
from ebm_vae.data.extractors import EXTRACTORS, StateInfo
from ebm_vae.data.filepass import (
    Distributed,
    FilePass,
    FileResult,
    FileTask,
    default_workers,
    file_tasks,
    quarantine,
    share,
)
from ebm_vae.data.units import WorkUnit, chunk_samples, majority_state, path_seed
from ebm_vae.io import atomic_path, atomic_write_json
from ebm_vae.locks import output_lock

log = logging.getLogger(__name__)

STD_FLOOR_RELATIVE = 1e-6  # a std below this fraction of the component's scale is "constant"
STD_FLOOR_ABSOLUTE = 1e-12


@dataclass
class Moments:
    """Count, mean, sum of squared deviations (m2), min, max over finite samples; NaN/Inf counts."""

    count: int
    mean: np.ndarray
    m2: np.ndarray
    min: np.ndarray
    max: np.ndarray
    nan_count: np.ndarray
    inf_count: np.ndarray

    @classmethod
    def empty(cls, dim: int) -> Moments:
        return cls(0, np.zeros(dim), np.zeros(dim), np.full(dim, np.inf), np.full(dim, -np.inf),
                   np.zeros(dim, np.int64), np.zeros(dim, np.int64))

    @classmethod
    def of(cls, states: np.ndarray) -> Moments:
        """Moments of one chunk (n, D); rows with a non-finite component are counted, not used."""
        nan = np.isnan(states)
        inf = np.isinf(states)
        finite_rows = ~(nan | inf).any(axis=1)
        x = states[finite_rows].astype(np.float64) if not finite_rows.all() else states.astype(np.float64)
        out = cls.empty(states.shape[1])
        out.nan_count, out.inf_count = nan.sum(axis=0), inf.sum(axis=0)
        if len(x):
            out.count = len(x)
            out.mean = x.mean(axis=0)
            out.m2 = np.square(x - out.mean).sum(axis=0)
            out.min, out.max = x.min(axis=0), x.max(axis=0)
        return out

    def merge(self, other: Moments) -> Moments:
        """Chan et al.'s parallel update: exact for any split of the samples."""
        n = self.count + other.count
        if n == 0:
            mean, m2 = self.mean, self.m2
        else:
            delta = other.mean - self.mean
            mean = self.mean + delta * (other.count / n)
            m2 = self.m2 + other.m2 + np.square(delta) * (self.count * other.count / n)
        return Moments(n, mean, m2, np.minimum(self.min, other.min), np.maximum(self.max, other.max),
                       self.nan_count + other.nan_count, self.inf_count + other.inf_count)

    @property
    def raw_std(self) -> np.ndarray:
        return np.sqrt(self.m2 / self.count) if self.count else np.zeros_like(self.m2)


def floored_std(mean: np.ndarray, raw_std: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Floor near-constant components so z-scoring stays finite; returns (std, floored indices).

    The floor is relative to the component's magnitude (|mean|) or the state's largest std,
    whichever is larger, so it does not depend on the units.
    """
    scale = np.maximum(np.abs(mean), raw_std.max(initial=0.0))
    floor = np.maximum(STD_FLOOR_RELATIVE * scale, STD_FLOOR_ABSOLUTE)
    low = raw_std < floor
    return np.where(low, floor, raw_std), np.flatnonzero(low).tolist()


@dataclass
class Stats:
    capsule: str
    state: dict[str, Any]  # StateInfo.to_dict()
    count: int
    mean: np.ndarray
    std: np.ndarray  # floored; what the stream divides by
    raw_std: np.ndarray
    min: np.ndarray
    max: np.ndarray
    nan_count: np.ndarray
    inf_count: np.ndarray
    floored: list[int] = field(default_factory=list)
    pca: dict[str, np.ndarray] | None = None  # {"components": (k, D), "std": (k,)}
    files: list[dict[str, Any]] = field(default_factory=list)  # [{path, size, mtime_ns, n_read, ...}]
    created: str = ""
    skipped: list[dict[str, Any]] = field(default_factory=list)  # [{path, size, mtime_ns, reason}]

    @property
    def state_info(self) -> StateInfo:
        return StateInfo.from_dict(self.state)

    @property
    def log_jacobian(self) -> float:
        """sum(log std): add it to an energy of z-scored states to get physical units."""
        return float(np.sum(np.log(self.std)))

    @property
    def moments(self) -> Moments:
        return Moments(self.count, self.mean, np.square(self.raw_std) * self.count, self.min,
                       self.max, self.nan_count, self.inf_count)

    @classmethod
    def from_moments(cls, capsule: str, state: StateInfo | dict[str, Any], m: Moments,
                     pca: dict[str, np.ndarray] | None = None,
                     files: list[dict[str, Any]] | None = None,
                     skipped: list[dict[str, Any]] | None = None) -> Stats:
        std, floored = floored_std(m.mean, m.raw_std)
        if floored:
            names = [StateInfo.from_dict(state).names[i] if isinstance(state, dict)
                     else state.names[i] for i in floored[:5]]
            log.warning("%s: %d state components have (near-)zero variance, std floored: %s%s",
                        capsule, len(floored), ", ".join(names), " ..." if len(floored) > 5 else "")
        return cls(capsule=capsule, state=state.to_dict() if isinstance(state, StateInfo) else state,
                   count=m.count, mean=m.mean, std=std, raw_std=m.raw_std, min=m.min, max=m.max,
                   nan_count=m.nan_count, inf_count=m.inf_count, floored=floored, pca=pca,
                   files=list(files or []), created=dt.datetime.now(dt.timezone.utc).isoformat(),
                   skipped=list(skipped or []))

    def to_dict(self) -> dict[str, Any]:
        arrays = {k: getattr(self, k).tolist() for k in
                  ("mean", "std", "raw_std", "min", "max", "nan_count", "inf_count")}
        pca = None if self.pca is None else {k: np.asarray(v).tolist() for k, v in self.pca.items()}
        return {"capsule": self.capsule, "state": self.state, "count": self.count, **arrays,
                "floored": self.floored, "pca": pca, "files": self.files, "created": self.created,
                "skipped": self.skipped, "log_jacobian": self.log_jacobian}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Stats:
        floats = {k: np.asarray(d[k], dtype=np.float64) for k in ("mean", "std", "raw_std", "min", "max")}
        ints = {k: np.asarray(d[k], dtype=np.int64) for k in ("nan_count", "inf_count")}
        pca = None if d.get("pca") is None else {k: np.asarray(v, dtype=np.float64) for k, v in d["pca"].items()}
        return cls(capsule=d["capsule"], state=d["state"], count=int(d["count"]), **floats, **ints,
                   floored=list(d.get("floored", [])), pca=pca, files=list(d.get("files", [])),
                   created=d.get("created", ""), skipped=list(d.get("skipped", [])))

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Stats:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


def merge_stats(a: Stats, b: Stats) -> Stats:
    """Combine partial statistics of disjoint samples (workers, ranks) with Chan's update.

    Moments, counts and file lists merge exactly. Two principal bases cannot be merged; the
    one of the larger part is kept (both estimate the same basis from random samples).
    """
    if a.capsule != b.capsule or a.state != b.state:
        raise ValueError(f"cannot merge statistics of {a.capsule} {a.state['shape']} and "
                         f"{b.capsule} {b.state['shape']}")
    pca = a.pca if a.count >= b.count else b.pca
    pca = pca if pca is not None else (b.pca if a.count >= b.count else a.pca)
    files = {f["path"]: f for f in a.files + b.files}
    skipped = {f["path"]: f for f in a.skipped + b.skipped}
    return Stats.from_moments(a.capsule, a.state, a.moments.merge(b.moments), pca=pca,
                              files=sorted(files.values(), key=lambda f: f["path"]),
                              skipped=sorted(skipped.values(), key=lambda f: f["path"]))


class Sample:
    """A uniform sample, without replacement, of at most `size` finite states of a pass.

    Every state gets a random key, drawn in file order from a generator seeded by its file's
    path, and the sample is the `size` states of smallest key: the same states whatever the
    chunks, workers or ranks, and two samples merge by keeping the smallest keys of both. A
    file offers only its states with a key below `threshold` (the pass sets it so that about
    1.25 x `size` states qualify in all), so workers send little back.
    """

    def __init__(self, size: int, dim: int, threshold: float = 1.0):
        self.size, self.threshold = size, threshold
        self.keys = np.zeros(0)
        self.states = np.zeros((0, dim), dtype=np.float32)

    def offer(self, keys: np.ndarray, states: np.ndarray) -> None:
        """Consider `states` (finite, float32) with their `keys`."""
        keep = keys < self.threshold
        if keep.any():
            self._keep(np.concatenate([self.keys, keys[keep]]), np.concatenate([self.states, states[keep]]))

    def merge(self, other: Sample) -> Sample:
        out = Sample(self.size, self.states.shape[1], self.threshold)
        out._keep(np.concatenate([self.keys, other.keys]), np.concatenate([self.states, other.states]))
        return out

    def _keep(self, keys: np.ndarray, states: np.ndarray) -> None:
        order = np.argsort(keys, kind="stable")[: self.size]
        self.keys, self.states = keys[order], states[order]

    @property
    def sample(self) -> np.ndarray:
        return self.states


@dataclass
class FilePartial:
    """What one file contributes to the statistics (made and filled in a worker)."""

    moments: Moments
    sample: Sample | None
    rng: np.random.Generator | None

    def add(self, states: np.ndarray) -> None:
        self.moments = self.moments.merge(Moments.of(states))
        if self.sample is not None:
            keys = self.rng.random(len(states))  # drawn for every state: independent of chunking
            finite = np.isfinite(states).all(axis=1)
            self.sample.offer(keys[finite], states[finite])


@dataclass(frozen=True)
class PartialFactory:
    """A fresh `FilePartial` per file task (picklable: it travels to worker processes)."""

    dim: int
    sample_size: int  # 0: no sample (vector states)
    threshold: float

    def __call__(self, task: FileTask) -> FilePartial:
        if not self.sample_size:
            return FilePartial(Moments.empty(self.dim), None, None)
        return FilePartial(Moments.empty(self.dim), Sample(self.sample_size, self.dim, self.threshold),
                           np.random.default_rng(path_seed(task.unit.path)))


def principal_basis(sample: np.ndarray, mean: np.ndarray, k: int, seed: int = 0,
                    power_iterations: int = 3, block_rows: int = 256) -> dict[str, np.ndarray] | None:
    """Top-k principal directions (unit rows, physical units, centred at `mean`) and the std
    along each, by a randomised SVD (Halko et al.) of the centred sample.

    The sample is centred block by block in float64, never copied whole: a reservoir of 4096
    states of 3 x 64 x 64 is 200 MB in float32 and a full SVD of it would need gigabytes.
    With k + 10 >= the sample's rank the result is the exact SVD's.
    """
    n, dim = sample.shape
    if n < 2:
        return None
    k = min(k, n, dim)
    rank = min(k + 10, n, dim)
    blocks = [slice(i, min(n, i + block_rows)) for i in range(0, n, block_rows)]

    def centred(rows: slice) -> np.ndarray:
        return sample[rows].astype(np.float64) - mean

    def times(v: np.ndarray) -> np.ndarray:  # X_c v: (n, r)
        return np.concatenate([centred(b) @ v for b in blocks])

    def transposed_times(u: np.ndarray) -> np.ndarray:  # X_c^T u: (dim, r)
        return sum(centred(b).T @ u[b] for b in blocks)

    q = np.linalg.qr(times(np.random.default_rng(seed).normal(size=(dim, rank))))[0]
    for _ in range(power_iterations):
        q = np.linalg.qr(times(np.linalg.qr(transposed_times(q))[0]))[0]
    _, s, vt = np.linalg.svd(transposed_times(q).T, full_matrices=False)
    return {"components": vt[:k], "std": s[:k] / np.sqrt(n)}


@dataclass
class PassTotal:
    """The pass so far on one rank (merged in file order), or of all ranks (merged in rank order)."""

    moments: Moments
    sample: Sample | None
    files: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    quarantined: dict[str, str] = field(default_factory=dict)  # path -> reason
    done: int = 0  # tasks merged

    def add(self, result: FileResult, unit: WorkUnit) -> None:
        identity = {"path": unit.path, "size": unit.size, "mtime_ns": unit.mtime_ns}
        if result.error is not None:
            log.warning("skipping %s: %s", unit.path, result.error)
            self.skipped.append({**identity, "reason": result.error})
            if result.failure is not None:
                self.quarantined[unit.path] = result.error
        else:
            if result.cache_error is not None:
                log.warning("not caching the states of %s: %s", unit.path, result.cache_error)
            self.moments = self.moments.merge(result.accumulator.moments)
            if self.sample is not None:
                self.sample = self.sample.merge(result.accumulator.sample)
            self.files.append({**identity, **result.record()})
        self.done += 1

    def merge(self, other: PassTotal) -> PassTotal:
        sample = None if self.sample is None else self.sample.merge(other.sample)
        return PassTotal(self.moments.merge(other.moments), sample, self.files + other.files,
                         self.skipped + other.skipped, {**self.quarantined, **other.quarantined},
                         self.done + other.done)

    def save(self, path: Path, identity: str) -> None:
        """A resumable checkpoint (no pickles: arrays and a JSON string)."""
        m = self.moments
        sample = self.sample if self.sample is not None else Sample(0, len(m.mean))
        meta = {"identity": identity, "done": self.done, "count": m.count, "files": self.files,
                "skipped": self.skipped, "quarantined": self.quarantined}
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, mean=m.mean, m2=m.m2, min=m.min, max=m.max, nan_count=m.nan_count,
                     inf_count=m.inf_count, sample_keys=sample.keys, sample_states=sample.states,
                     meta=np.array(json.dumps(meta)))

    @classmethod
    def resume(cls, path: Path, identity: str, empty: PassTotal) -> PassTotal:
        """The checkpoint at `path` if it was written by this very pass (same files, capsule,
        ranks), else `empty`."""
        try:
            with np.load(path, allow_pickle=False) as saved:
                meta = json.loads(str(saved["meta"]))
                if meta["identity"] != identity:
                    return empty
                moments = Moments(int(meta["count"]), *(saved[k] for k in
                                  ("mean", "m2", "min", "max", "nan_count", "inf_count")))
                sample = None
                if empty.sample is not None:
                    sample = Sample(empty.sample.size, len(moments.mean), empty.sample.threshold)
                    sample.keys, sample.states = saved["sample_keys"], saved["sample_states"]
        except (OSError, ValueError, KeyError):
            return empty
        log.info("resuming the statistics pass after %d files (%s)", meta["done"], path.name)
        return cls(moments, sample, meta["files"], meta["skipped"], meta["quarantined"], meta["done"])


def _pass_identity(capsule: CapsuleConfig, state: StateInfo, tasks: list[FileTask], rank: int, world: int,
                   sample: Sample | None) -> str:
    payload = json.dumps([capsule.name, list(state.shape), rank, world,
                          None if sample is None else [sample.size, sample.threshold],
                          [[t.unit.path, t.unit.size, t.unit.mtime_ns, t.grid.length, t.write_cache]
                           for t in tasks]])
    return hashlib.sha1(payload.encode()).hexdigest()


CACHE_FROM_CONFIG = "data.cache"  # run_stats_pass: the capsule's state cache as cfg.data.cache says


def run_stats_pass(manifest: Any, capsule: CapsuleConfig, index_dir: str | Path, cfg: Any,
                   cache: StateCache | str | None = CACHE_FROM_CONFIG) -> Stats:
    """Statistics of every usable file of `capsule`, written to `index_dir/<capsule>/stats.json`.

    `cfg` is a composed config with `crawl` (n_components, stats_reservoir, stats_workers,
    file_timeout_s, checkpoint_s, progress) and `data` (chunk_bytes, val_block). Files whose
    state shape differs from the majority's are skipped with a warning naming them, as are
    files that fail while being read; files that crash or hang their reader are quarantined
    in the manifest (and in `manifest`, in memory). Files without a shard in `cache` (by default
    the capsule's state cache if `cfg.data.cache` says so; None: none) get one on the way.
    Under a launcher with several ranks every rank calls this; each reads its share.
    """
    if cache == CACHE_FROM_CONFIG:
        cache = state_cache(cfg, capsule, manifest)
    extractor = EXTRACTORS[capsule.extractor](capsule)
    entries = manifest.usable(capsule.name)
    if not entries:
        raise ValueError(f"capsule '{capsule.name}' has no usable files under data.root={manifest.root} "
                         f"(see the error column of {Path(index_dir) / 'manifest.parquet'})")
    state = majority_state(extractor, entries)
    index_dir = Path(index_dir)
    with Distributed() as ranks:
        total, checkpoint = _run_pass(manifest, capsule, cfg, cache, extractor, entries, state, ranks,
                                      index_dir / capsule.name)
        quarantine(index_dir if ranks.rank == 0 else None, manifest, total.quarantined)
        if total.skipped:
            log.warning("statistics of %s: %d of %d usable files skipped (reasons above), %d counted",
                        capsule.name, len(total.skipped), len(entries), len(total.files))
        if total.moments.count == 0:
            raise ValueError(f"capsule '{capsule.name}': no finite samples in {len(entries)} usable files")
        sample = total.sample.sample if total.sample is not None else None
        pca = principal_basis(sample, total.moments.mean, cfg.crawl.n_components) if sample is not None else None
        stats = Stats.from_moments(capsule.name, state, total.moments, pca=pca,
                                   files=sorted(total.files, key=lambda f: f["path"]),
                                   skipped=sorted(total.skipped, key=lambda f: f["path"]))
        if ranks.rank == 0:
            with output_lock(index_dir, f"the statistics of {capsule.name}"):  # re-entrant
                stats.save(index_dir / capsule.name / "stats.json")
        ranks.barrier()
        checkpoint.unlink(missing_ok=True)
    return stats


def _run_pass(manifest: Any, capsule: CapsuleConfig, cfg: Any, cache: StateCache | None, extractor: Any,
              entries: list, state: StateInfo, ranks: Distributed, folder: Path) -> tuple[PassTotal, Path]:
    """This rank's share of the files, resumed from its checkpoint; then every rank's total,
    merged in rank order (the same on every rank). Returns it and the checkpoint's path."""
    skipped: list[dict[str, Any]] = []
    planned = file_tasks(extractor, entries, state, cfg.data.val_block, cache, skipped)
    size = cfg.crawl.stats_reservoir if state.kind == "field" else 0
    threshold = min(1.0, 1.25 * size / max(1, sum(unit.plan.n_samples for unit, _, _ in planned)))
    shares = share([FileTask(0, u, g, w) for u, g, w in planned], ranks.rank, ranks.world)
    mine = [FileTask(i, t.unit, t.grid, t.write_cache) for i, t in enumerate(shares)]
    empty = PassTotal(Moments.empty(state.dim), Sample(size, state.dim, threshold) if size else None,
                      skipped=skipped if ranks.rank == 0 else [])
    identity = _pass_identity(capsule, state, mine, ranks.rank, ranks.world, empty.sample)
    checkpoint = folder / f"stats.partial-{ranks.rank}-of-{ranks.world}.npz"
    total = PassTotal.resume(checkpoint, identity, empty)
    last_save = time.monotonic()

    def merge(result: FileResult) -> None:
        nonlocal last_save
        total.add(result, mine[result.index].unit)
        if time.monotonic() - last_save >= cfg.crawl.checkpoint_s and total.done < len(mine):
            total.save(checkpoint, identity)
            last_save = time.monotonic()

    FilePass(extractor, Path(manifest.root), chunk_samples(state, cfg.data.chunk_bytes),
             PartialFactory(state.dim, size, threshold), cache,
             default_workers(cfg.crawl.get("stats_workers"), len(mine)), cfg.crawl.file_timeout_s,
             merge, progress=cfg.crawl.progress, description=f"stats {capsule.name}").run(mine[total.done :])
    return functools.reduce(PassTotal.merge, ranks.all_gather(total)), checkpoint
