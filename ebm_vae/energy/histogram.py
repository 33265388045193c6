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
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ebm_vae.config import CapsuleConfig
from ebm_vae.data.extractors import EXTRACTORS
from ebm_vae.data.readers import READERS
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
    files: list[dict]  # {path, size, mtime_ns} of every file counted
    skipped: list[dict]  # {path, reason} of every file that failed


def histogram_energy(grid: StateGrid, capsule: CapsuleConfig, manifest, chunk: int = 65536,
                     progress: bool = True) -> HistogramResult:
    """Count the states of every usable manifest file of `capsule` on `grid`.

    A file that fails (unreadable, changed layout, other state shape) is skipped whole with a
    one-line reason naming it: its partial counts are discarded, so the histogram stays exact
    for the files it lists.
    """
    extractor = EXTRACTORS[capsule.extractor](capsule)
    entries = manifest.usable(capsule.name)
    total = HistogramCounts(grid)
    files, skipped = [], []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task(f"histogram {capsule.name}", total=sum(int(e.n_samples) for e in entries))
        for entry in entries:
            path = Path(manifest.root) / entry.path
            try:
                counts = _count_file(grid, extractor, entry.format, path, chunk,
                                     lambda n: bar.advance(task, n))
                stat = os.stat(path)
            except Exception as exc:  # any failure of one file: record it and go on
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                log.warning("%s: skipped: %s", path, reason)
                skipped.append({"path": entry.path, "reason": reason})
                continue
            total.merge(counts)
            files.append({"path": entry.path, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    return HistogramResult(total, files, skipped)


def _count_file(grid, extractor, fmt, path, chunk, advance) -> HistogramCounts:
    reader = READERS[fmt]
    plan = extractor.plan(reader.inspect(path))
    if tuple(plan.state.shape) != tuple(grid.state.shape):
        raise ValueError(f"state shape {tuple(plan.state.shape)} differs from the capsule's "
                         f"{tuple(grid.state.shape)}")
    counts = HistogramCounts(grid)
    with reader.open(path) as handle:
        for states in extractor.iter_states(handle, plan, 0, plan.extent, chunk):
            counts.add(np.asarray(states).reshape(len(states), -1))
            advance(len(states))
    return counts
