"""Per-capsule state statistics (`index/<capsule>/stats.json`) and the pass that makes them.

The pass reads every usable file of a capsule chunk by chunk through its extractor, a file per
task in worker processes (`ebm_vae.data.filepass`: a file that crashes or hangs its reader is
quarantined, not fatal; several ranks under torchrun/SLURM share the files). Each file's
statistics are a `PartialStats` whose parts all merge exactly: moments (Chan's update in
float64), the principal accumulator, the quantile reservoir, the support counts. Files are
merged in file order, so the result does not depend on the number of processes; the ranks'
totals merge the same way (equal to float64 rounding: the reservoirs keep the states of
smallest random key, drawn per file, so no merge order changes them). A sample with any
NaN/Inf component is excluded (the stream drops it too, so the normalisation describes exactly
what is trained on); NaN and Inf are counted per component. For field states a principal basis
is kept (`ebm_vae.data.principal`): the spectrum of the exact covariance for moderate sizes, of
a bounded reservoir sample above them, in physical units centred at the mean, with the rank the
field density uses. Robust quantiles (for the default limits of energy maps) come from a
bounded reservoir of states: of the components of vector states, of the principal coefficients
of field states. The running total is saved every `crawl.checkpoint_s` seconds, so a killed
pass resumes where it stopped.
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
)
from ebm_vae.data.filepass import share as share_files
from ebm_vae.data.moments import Moments, floored_std
from ebm_vae.data.principal import (
    Accumulator,
    Covariance,
    Reservoir,
    choose_rank,
    noise_floor,
    principal_accumulator,
    principal_summary,
)
from ebm_vae.data.support import PointMasses, Support, component_bounds
from ebm_vae.data.units import WorkUnit, chunk_samples, majority_state, path_seed
from ebm_vae.io import atomic_path, atomic_write_json
from ebm_vae.locks import output_lock

log = logging.getLogger(__name__)

QUANTILE_LEVELS = (0.001, 0.005, 0.01, 0.5, 0.99, 0.995, 0.999)
QUANTILE_RESERVOIR_STATES = 65536  # states kept for the quantiles (at most ...
QUANTILE_RESERVOIR_BYTES = 64 * 2**20  # ... and this many bytes of them)


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
    # fields: {"components": (k, D), "std": (k,), "eigenvalues", "total_variance", "samples",
    # "rank", "noise_variance", "noise_floor"} (see ebm_vae.data.principal.principal_summary)
    pca: dict[str, np.ndarray] | None = None
    # {"levels": (L,), "values": (L, D) vector states | "pc_values": (L, k) field states}
    quantiles: dict[str, np.ndarray] | None = None
    files: list[dict[str, Any]] = field(default_factory=list)  # [{path, size, mtime_ns, n_read, ...}]
    created: str = ""
    skipped: list[dict[str, Any]] = field(default_factory=list)  # [{path, size, mtime_ns, reason}]
    support: Support | None = None  # vector states with declared bounds
    point_masses: PointMasses | None = None  # vector states: values holding a large share

    @property
    def state_info(self) -> StateInfo:
        return StateInfo.from_dict(self.state)

    @property
    def log_jacobian(self) -> float:
        """sum(log std): add it to an energy of z-scored states to get physical units."""
        return float(np.sum(np.log(self.std)))

    @property
    def field_rank(self) -> int | None:
        """The number of principal coefficients the field density models (None: not a field).

        Statistics written before the rank was stored get it from their stored spectrum.
        """
        if not self.pca:
            return None
        if "rank" in self.pca:
            return int(self.pca["rank"])
        eigenvalues = np.square(np.asarray(self.pca["std"], dtype=np.float64))
        total = float(np.sum(np.square(self.raw_std)))
        return choose_rank(eigenvalues, total, len(self.mean), self.count, len(eigenvalues),
                           noise_floor(self.mean, total))

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
        quantiles = None if self.quantiles is None else {k: np.asarray(v).tolist() for k, v in self.quantiles.items()}
        return {"capsule": self.capsule, "state": self.state, "count": self.count, **arrays,
                "floored": self.floored, "pca": pca, "quantiles": quantiles, "files": self.files,
                "created": self.created, "skipped": self.skipped, "log_jacobian": self.log_jacobian,
                "support": None if self.support is None else self.support.to_dict(),
                "point_masses": None if self.point_masses is None else self.point_masses.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Stats:
        floats = {k: np.asarray(d[k], dtype=np.float64) for k in ("mean", "std", "raw_std", "min", "max")}
        ints = {k: np.asarray(d[k], dtype=np.int64) for k in ("nan_count", "inf_count")}
        pca = None if d.get("pca") is None else {k: np.asarray(v, dtype=np.float64) for k, v in d["pca"].items()}
        quantiles = None if d.get("quantiles") is None else \
            {k: np.asarray(v, dtype=np.float64) for k, v in d["quantiles"].items()}
        return cls(capsule=d["capsule"], state=d["state"], count=int(d["count"]), **floats, **ints,
                   floored=list(d.get("floored", [])), pca=pca, quantiles=quantiles,
                   files=list(d.get("files", [])), created=d.get("created", ""),
                   skipped=list(d.get("skipped", [])),
                   support=None if d.get("support") is None else Support.from_dict(d["support"]),
                   point_masses=None if d.get("point_masses") is None else PointMasses.from_dict(d["point_masses"]))

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
    merged = Stats.from_moments(a.capsule, a.state, a.moments.merge(b.moments), pca=pca,
                                files=sorted(files.values(), key=lambda f: f["path"]),
                                skipped=sorted(skipped.values(), key=lambda f: f["path"]))
    merged.quantiles = (a if a.count >= b.count else b).quantiles  # like the basis: the larger part's
    if a.support is not None and b.support is not None:
        merged.support = a.support.merge(b.support)
    if a.point_masses is not None and b.point_masses is not None:
        merged.point_masses = a.point_masses.merge(b.point_masses)
    return merged


def quantile_reservoir(dim: int, seed: int) -> Reservoir:
    """The bounded reservoir of states that the quantiles are taken from."""
    return Reservoir(max(1, min(QUANTILE_RESERVOIR_STATES, QUANTILE_RESERVOIR_BYTES // (4 * dim))), dim, seed=seed)


def reservoir_quantiles(sample: np.ndarray, mean: np.ndarray, pca: dict[str, np.ndarray] | None,
                        block_rows: int = 256) -> dict[str, np.ndarray] | None:
    """Quantiles at QUANTILE_LEVELS of a reservoir sample: per component, or per principal
    coefficient when a basis is given (field states; computed block by block)."""
    if len(sample) == 0:
        return None
    levels = np.asarray(QUANTILE_LEVELS)
    if pca is None:
        return {"levels": levels, "values": np.quantile(sample.astype(np.float64), levels, axis=0)}
    components = np.asarray(pca["components"], dtype=np.float64)
    coefficients = np.concatenate([(sample[i:i + block_rows].astype(np.float64) - mean) @ components.T
                                   for i in range(0, len(sample), block_rows)])
    return {"levels": levels, "pc_values": np.quantile(coefficients, levels, axis=0)}


@dataclass
class PartialStats:
    """Every partial result of the statistics pass over some of a capsule's states, with an
    exact `merge`: files, workers and ranks each hold one, and their merge is the whole's."""

    state: StateInfo
    moments: Moments
    principal: Accumulator | None  # field states: exact covariance or reservoir
    quantiles: Reservoir
    support: Support | None  # vector states with declared bounds
    point_masses: PointMasses | None  # vector states

    @classmethod
    def empty(cls, state: StateInfo, capsule: CapsuleConfig, cfg: Any, seed: int) -> PartialStats:
        field_state = state.kind == "field"
        lower, upper = component_bounds(state, capsule.bounds)
        bounded = not (np.isnan(lower).all() and np.isnan(upper).all())
        return cls(state, Moments.empty(state.dim),
                   principal_accumulator(state.dim, cfg.crawl.exact_covariance_max_dim,
                                         cfg.crawl.stats_reservoir, seed=seed) if field_state else None,
                   quantile_reservoir(state.dim, seed=seed),
                   Support.empty(lower, upper) if bounded else None,
                   None if field_state else PointMasses())

    def add(self, states: np.ndarray) -> None:
        self.moments = self.moments.merge(Moments.of(states))
        for part in (self.principal, self.quantiles, self.support):
            if part is not None:
                part.add(states)
        if self.point_masses is not None:
            self.point_masses = self.point_masses.merge(PointMasses.of(states[np.isfinite(states).all(axis=1)]))

    def merge(self, other: PartialStats) -> PartialStats:
        def both(a, b):
            return None if a is None else a.merge(b)

        return PartialStats(self.state, self.moments.merge(other.moments),
                            both(self.principal, other.principal), self.quantiles.merge(other.quantiles),
                            both(self.support, other.support), both(self.point_masses, other.point_masses))

    def finish(self, capsule: str, n_components: int, files: list[dict[str, Any]],
               skipped: list[dict[str, Any]] | None = None) -> Stats:
        """The statistics of the merged whole, with warnings about bounds and point masses."""
        total = self.moments
        pca = None if self.principal is None else principal_summary(
            self.principal, total.mean, np.square(total.raw_std), n_components)
        stats = Stats.from_moments(capsule, self.state, total, pca=pca, files=files, skipped=skipped)
        if self.state.kind != "field" or pca is not None:  # fields: of the principal coefficients only
            stats.quantiles = reservoir_quantiles(self.quantiles.sample, total.mean, pca)
        stats.support, stats.point_masses = self.support, self.point_masses
        if self.support is not None:
            self.support.report(capsule, self.state.names)
        for i, value, share in (self.point_masses.large() if self.point_masses else []):
            log.warning("%s: %.3g%% or more of the %s values are exactly %g: a point mass, which a density "
                        "smears (declare it as a bound, bounds: {%s: [%g, null]}, if it is one)",
                        capsule, 100.0 * share, self.state.names[i], value, self.state.names[i], value)
        return stats


@dataclass(frozen=True)
class PartialFactory:
    """A fresh `PartialStats` per file task (picklable: it travels to worker processes), its
    reservoirs seeded by the file's path, so a file's keys do not depend on where it is read."""

    state: StateInfo
    capsule: CapsuleConfig
    cfg: Any  # the composed config (crawl.exact_covariance_max_dim, crawl.stats_reservoir)

    def __call__(self, task: FileTask) -> PartialStats:
        return PartialStats.empty(self.state, self.capsule, self.cfg, seed=path_seed(task.unit.path))


@dataclass
class PassTotal:
    """The pass so far on one rank (merged in file order), or of all ranks (merged in rank order)."""

    partial: PartialStats
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
            self.partial = self.partial.merge(result.accumulator)
            self.files.append({**identity, **result.record()})
        self.done += 1

    def merge(self, other: PassTotal) -> PassTotal:
        return PassTotal(self.partial.merge(other.partial), self.files + other.files,
                         self.skipped + other.skipped, {**self.quarantined, **other.quarantined},
                         self.done + other.done)

    def save(self, path: Path, identity: str) -> None:
        """A resumable checkpoint (no pickles: arrays and a JSON string)."""
        arrays, meta = _partial_to_arrays(self.partial)
        meta.update(identity=identity, done=self.done, files=self.files, skipped=self.skipped,
                    quarantined=self.quarantined)
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **arrays, meta=np.array(json.dumps(meta)))

    @classmethod
    def resume(cls, path: Path, identity: str, empty: PassTotal) -> PassTotal:
        """The checkpoint at `path` if it was written by this very pass (same files, capsule,
        ranks), else `empty`."""
        try:
            with np.load(path, allow_pickle=False) as saved:
                meta = json.loads(str(saved["meta"]))
                if meta["identity"] != identity:
                    return empty
                partial = _partial_from_arrays(empty.partial, dict(saved), meta)
        except (OSError, ValueError, KeyError):
            return empty
        log.info("resuming the statistics pass after %d files (%s)", meta["done"], path.name)
        return cls(partial, meta["files"], meta["skipped"], meta["quarantined"], meta["done"])


MOMENT_FIELDS = ("mean", "m2", "min", "max", "nan_count", "inf_count")


def _partial_to_arrays(p: PartialStats) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """A `PartialStats` as arrays and JSON (the checkpoint of a pass)."""
    arrays = {f"moments_{k}": getattr(p.moments, k) for k in MOMENT_FIELDS}
    meta: dict[str, Any] = {"count": p.moments.count, "support": p.support and p.support.to_dict(),
                            "point_masses": p.point_masses and p.point_masses.to_dict()}
    for name, part in (("principal", p.principal), ("quantiles", p.quantiles)):
        if isinstance(part, Covariance):
            arrays.update({f"{name}_mean": part.mean, f"{name}_comoment": part.comoment})
            meta[name] = {"count": part.count}
        elif isinstance(part, Reservoir):
            arrays.update({f"{name}_keys": part.keys, f"{name}_data": part.data})
            meta[name] = {"seen": part.seen, "rng": part.rng.bit_generator.state}
    return arrays, meta


def _partial_from_arrays(empty: PartialStats, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> PartialStats:
    """The inverse of `_partial_to_arrays`, onto the empty partial of the same pass."""
    moments = Moments(int(meta["count"]), *(arrays[f"moments_{k}"] for k in MOMENT_FIELDS))
    parts = {}
    for name, part in (("principal", empty.principal), ("quantiles", empty.quantiles)):
        if isinstance(part, Covariance):
            part = Covariance(int(meta[name]["count"]), arrays[f"{name}_mean"], arrays[f"{name}_comoment"])
        elif isinstance(part, Reservoir):
            part.keys, part.data, part.seen = arrays[f"{name}_keys"], arrays[f"{name}_data"], int(meta[name]["seen"])
            part.rng.bit_generator.state = meta[name]["rng"]
        parts[name] = part
    support = None if meta["support"] is None else Support.from_dict(meta["support"])
    masses = None if meta["point_masses"] is None else PointMasses.from_dict(meta["point_masses"])
    return PartialStats(empty.state, moments, parts["principal"], parts["quantiles"], support, masses)


def _pass_identity(capsule: CapsuleConfig, state: StateInfo, tasks: list[FileTask], rank: int,
                   world: int) -> str:
    payload = json.dumps([capsule.name, list(state.shape), rank, world,
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
        if total.partial.moments.count == 0:
            raise ValueError(f"capsule '{capsule.name}': no finite samples in {len(entries)} usable files")
        stats = total.partial.finish(capsule.name, cfg.crawl.n_components,
                                     sorted(total.files, key=lambda f: f["path"]),
                                     sorted(total.skipped, key=lambda f: f["path"]))
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
    shares = share_files([FileTask(0, u, g, w) for u, g, w in planned], ranks.rank, ranks.world)
    mine = [FileTask(i, t.unit, t.grid, t.write_cache) for i, t in enumerate(shares)]
    empty = PassTotal(PartialStats.empty(state, capsule, cfg, seed=0),
                      skipped=skipped if ranks.rank == 0 else [])
    identity = _pass_identity(capsule, state, mine, ranks.rank, ranks.world)
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
             PartialFactory(state, capsule, cfg), cache,
             default_workers(cfg.crawl.get("stats_workers"), len(mine)), cfg.crawl.file_timeout_s,
             merge, progress=cfg.crawl.progress, description=f"stats {capsule.name}").run(mine[total.done :])
    return functools.reduce(PassTotal.merge, ranks.all_gather(total)), checkpoint
