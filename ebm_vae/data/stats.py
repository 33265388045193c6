"""Per-capsule state statistics (`index/<capsule>/stats.json`) and the streaming pass that makes them.

The pass reads every usable file of a capsule chunk by chunk through its extractor. Each
chunk's moments are computed in float64 and merged into the running ones with Chan's parallel
update, which is exact for any split of the data, so partial statistics of workers or ranks
merge the same way (`merge_stats`). A sample with any NaN/Inf component is excluded (the
stream drops it too, so the normalisation describes exactly what is trained on); NaN and Inf
are counted per component. For field states a principal basis is kept (`ebm_vae.data.principal`):
the spectrum of the exact covariance for moderate sizes, of a bounded reservoir sample above
them, in physical units centred at the mean, with the rank the field density uses. Robust
quantiles (for the default limits of energy maps) come from a bounded reservoir of states: of
the components of vector states, of the principal coefficients of field states.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from ebm_vae.config import CapsuleConfig
from ebm_vae.data.extractors import EXTRACTORS, StateInfo
from ebm_vae.data.moments import Moments, floored_std
from ebm_vae.data.principal import (
    Accumulator,
    Reservoir,
    choose_rank,
    noise_floor,
    principal_accumulator,
    principal_summary,
)
from ebm_vae.data.readers.base import one_line
from ebm_vae.data.support import PointMasses, Support, component_bounds
from ebm_vae.data.units import WorkUnit, chunk_samples, entry_plan, read_unit
from ebm_vae.io import atomic_write_json

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
    files: list[dict[str, Any]] = field(default_factory=list)  # [{path, size, mtime_ns}]
    created: str = ""
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
                     files: list[dict[str, Any]] | None = None) -> Stats:
        std, floored = floored_std(m.mean, m.raw_std)
        if floored:
            names = [StateInfo.from_dict(state).names[i] if isinstance(state, dict)
                     else state.names[i] for i in floored[:5]]
            log.warning("%s: %d state components have (near-)zero variance, std floored: %s%s",
                        capsule, len(floored), ", ".join(names), " ..." if len(floored) > 5 else "")
        return cls(capsule=capsule, state=state.to_dict() if isinstance(state, StateInfo) else state,
                   count=m.count, mean=m.mean, std=std, raw_std=m.raw_std, min=m.min, max=m.max,
                   nan_count=m.nan_count, inf_count=m.inf_count, floored=floored, pca=pca,
                   files=list(files or []), created=dt.datetime.now(dt.timezone.utc).isoformat())

    def to_dict(self) -> dict[str, Any]:
        arrays = {k: getattr(self, k).tolist() for k in
                  ("mean", "std", "raw_std", "min", "max", "nan_count", "inf_count")}
        pca = None if self.pca is None else {k: np.asarray(v).tolist() for k, v in self.pca.items()}
        quantiles = None if self.quantiles is None else {k: np.asarray(v).tolist() for k, v in self.quantiles.items()}
        return {"capsule": self.capsule, "state": self.state, "count": self.count, **arrays,
                "floored": self.floored, "pca": pca, "quantiles": quantiles, "files": self.files,
                "created": self.created, "log_jacobian": self.log_jacobian,
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
    merged = Stats.from_moments(a.capsule, a.state, a.moments.merge(b.moments), pca=pca,
                                files=sorted(files.values(), key=lambda f: f["path"]))
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


def _progress(enabled: bool) -> Progress:
    return Progress(TextColumn("[bold]stats {task.description}"), BarColumn(),
                    TextColumn("{task.completed:,}/{task.total:,} samples"), TimeRemainingColumn(),
                    disable=not enabled)


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

    def finish(self, capsule: str, n_components: int, files: list[dict[str, Any]]) -> Stats:
        """The statistics of the merged whole, with warnings about bounds and point masses."""
        total = self.moments
        pca = None if self.principal is None else principal_summary(
            self.principal, total.mean, np.square(total.raw_std), n_components)
        stats = Stats.from_moments(capsule, self.state, total, pca=pca, files=files)
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


def run_stats_pass(manifest: Any, capsule: CapsuleConfig, index_dir: str | Path, cfg: Any) -> Stats:
    """Statistics of every usable file of `capsule`, written to `index_dir/<capsule>/stats.json`.

    `cfg` is a composed config with `crawl` (n_components, stats_reservoir,
    exact_covariance_max_dim, progress) and `data` (chunk_bytes). Files whose state shape
    differs from the majority's are skipped with a warning naming them, as are files that fail
    while being read. Each file's statistics are a `PartialStats`, merged when it is read whole.
    """
    extractor = EXTRACTORS[capsule.extractor](capsule)
    entries = manifest.usable(capsule.name)
    if not entries:
        raise ValueError(f"capsule '{capsule.name}' has no usable files under data.root={manifest.root} "
                         f"(see the error column of {Path(index_dir) / 'manifest.parquet'})")
    plans = [entry_plan(extractor, e) for e in entries]
    state = Counter(p.state for p in plans).most_common(1)[0][0]
    chunk = chunk_samples(state, cfg.data.chunk_bytes)
    total = PartialStats.empty(state, capsule, cfg, seed=0)
    files, skipped = [], []
    root = Path(manifest.root)
    with _progress(cfg.crawl.progress) as progress:
        task = progress.add_task(capsule.name, total=sum(p.n_samples for p in plans if p.state == state))
        for index, (entry, plan) in enumerate(zip(entries, plans, strict=True)):
            if plan.state != state:
                log.warning("skipping %s: state shape %s differs from the capsule's %s",
                            entry.path, plan.state.shape, state.shape)
                skipped.append(entry.path)
                continue
            part = PartialStats.empty(state, capsule, cfg, seed=index + 1)
            try:
                for states in read_unit(extractor, root, WorkUnit.whole(entry, plan), chunk):
                    part.add(states)
                    progress.advance(task, len(states))
            except Exception as exc:  # a bad file never stops the pass; its partial statistics are dropped
                log.warning("skipping %s: %s", entry.path, one_line(exc))
                skipped.append(entry.path)
                continue
            total = total.merge(part)
            files.append({"path": entry.path, "size": entry.size, "mtime_ns": entry.mtime_ns})
    if skipped:
        log.warning("statistics of %s: %d of %d usable files skipped (reasons above), %d counted",
                    capsule.name, len(skipped), len(entries), len(files))
    if total.moments.count == 0:
        raise ValueError(f"capsule '{capsule.name}': no finite samples in {len(entries)} usable files")
    stats = total.finish(capsule.name, cfg.crawl.n_components, files)
    stats.save(Path(index_dir) / capsule.name / "stats.json")
    return stats
