"""The exact energy of small domains: a streaming histogram over every usable file of a capsule.

The map is the marginal of the map axes, as PyEMMA and deeptime define it: every state
counts in the bin of its coordinates on the axes (its principal-component coefficients for pc
axes), whatever its other components. Bins are centred on the grid points with edges
halfway between them, and the density is count / (N_total * bin volume) in the physical
units of the axes, so E = -log density is independent of the bin size up to discretisation,
and comparable with the VAE's energies on a 1-D/2-D state. N_total counts every finite
state, inside the grid or not; empty bins are +inf and, with the states outside the grid,
reported. States with a NaN/Inf component are dropped, as the training stream drops them.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ebm_vae.config import CapsuleConfig
from ebm_vae.crawl.manifest import Manifest
from ebm_vae.data.extractors import EXTRACTORS
from ebm_vae.data.readers.base import one_line
from ebm_vae.data.units import WorkUnit, chunk_samples, entry_plan, read_unit
from ebm_vae.energy.grid import StateGrid

log = logging.getLogger(__name__)


@dataclass
class HistogramCounts:
    """Bin counts on a grid, accumulated chunk by chunk."""

    grid: StateGrid
    counts: np.ndarray = field(init=False)
    n_total: int = 0  # finite states seen, inside the grid or not
    n_outside: int = 0  # finite states outside every bin
    n_nonfinite: int = 0  # states dropped for a NaN/Inf component

    def __post_init__(self):
        self.counts = np.zeros(self.grid.n_points, dtype=np.int64)
        self._lower = np.array([a.values[0] - 0.5 * self.spacing[d] for d, a in enumerate(self.grid.axes)])

    @property
    def spacing(self) -> np.ndarray:
        return np.array([a.values[1] - a.values[0] for a in self.grid.axes])

    @property
    def bin_volume(self) -> float:
        return float(np.prod(self.spacing))

    def add(self, states: np.ndarray) -> None:
        """Count flat physical states (n, D)."""
        finite = np.all(np.isfinite(states), axis=1)
        self.n_nonfinite += int(np.count_nonzero(~finite))
        coords = self.grid.project(states[finite])
        self.n_total += len(coords)
        bins = np.floor((coords - self._lower) / self.spacing)
        inside = np.all((bins >= 0) & (bins < np.array(self.grid.shape)), axis=1)
        self.n_outside += int(np.count_nonzero(~inside))
        flat = np.ravel_multi_index(tuple(bins[inside].astype(np.int64).T), self.grid.shape)
        self.counts += np.bincount(flat, minlength=self.grid.n_points)

    def merge(self, other: HistogramCounts) -> None:
        self.counts += other.counts
        self.n_total += other.n_total
        self.n_outside += other.n_outside
        self.n_nonfinite += other.n_nonfinite

    def energy(self) -> np.ndarray:
        """E = -log(count / (N_total * bin volume)) in nats on the grid's shape; empty bins +inf."""
        if self.n_total == 0:
            raise ValueError("no finite states were counted; the histogram is empty")
        with np.errstate(divide="ignore"):
            log_density = np.log(self.counts) - np.log(self.n_total * self.bin_volume)
        return (-log_density).reshape(self.grid.shape)

    def report(self) -> dict:
        return {"n_total": self.n_total, "n_outside_grid": self.n_outside,
                "n_nonfinite_dropped": self.n_nonfinite,
                "empty_bins": int(np.count_nonzero(self.counts == 0)), "bins": self.grid.n_points,
                "bin_volume": self.bin_volume}


@dataclass
class HistogramResult:
    counts: HistogramCounts
    files: list[dict]  # {path, size, mtime_ns, skipped_rows} of every file counted
    skipped: list[dict]  # {path, reason} of every file that failed


def histogram_energy(grid: StateGrid, capsule: CapsuleConfig, manifest: Manifest,
                     chunk_bytes: int = 8 * 2**20, progress: bool = True) -> HistogramResult:
    """Count the states of every usable manifest file of `capsule` on `grid`.

    Files are read as the training stream reads them (`read_unit`: a changed file is refused).
    A file that fails, or whose state shape differs from the grid's, is skipped whole with a
    one-line reason naming it: its partial counts are discarded, so the histogram stays exact
    for the files it lists.
    """
    extractor = EXTRACTORS[capsule.extractor](capsule)
    chunk = chunk_samples(grid.state, chunk_bytes)
    total = HistogramCounts(grid)
    files, skipped = [], []
    entries = manifest.usable(capsule.name)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task(f"histogram {capsule.name}", total=sum(e.n_samples for e in entries))
        for entry in entries:
            part = HistogramCounts(grid)
            bad_rows: Counter[str] = Counter()  # rows or log lines of this file that do not parse
            try:
                plan = entry_plan(extractor, entry)
                if plan.state.shape != grid.state.shape:
                    raise ValueError(f"state shape {plan.state.shape} differs from the map's {grid.state.shape}")
                for states in read_unit(extractor, manifest.root, WorkUnit.whole(entry, plan), chunk,
                                        skipped=bad_rows):
                    part.add(states)
                    bar.advance(task, len(states))
            except Exception as exc:  # a bad file never stops the pass; its partial counts are dropped
                log.warning("skipping %s: %s", entry.path, one_line(exc))
                skipped.append({"path": entry.path, "reason": one_line(exc)})
                continue
            total.merge(part)
            files.append({"path": entry.path, "size": entry.size, "mtime_ns": entry.mtime_ns,
                          "skipped_rows": bad_rows[entry.path]})
    return HistogramResult(total, files, skipped)
