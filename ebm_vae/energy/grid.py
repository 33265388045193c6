"""State grids: which states an energy map covers, produced lazily chunk by chunk.

A map has 1 to 3 axes. An axis is either a state component by name (vector states; the
default is the first two) or a principal component `pc1`, `pc2`, ... (field states; the
default is pc1, pc2). Components off the grid are held at the reference state: the mean,
unless `export.reference` sets them by name; on pc axes the held values are the coefficients
of the other principal components (0 = the mean). A 1024 x 1024 grid of 3 x 64 x 64 fields
would be 1e6 x 12288 numbers, so states are only ever built for a slice of grid points.

Default limits come from the data: the 0.1 % and 99.9 % quantiles of the statistics pass
widened by `QUANTILE_MARGIN` of their span on each side, within the observed range (no map
reaches where no state was ever seen) and within the capsule's physical `bounds`. Statistics
without quantiles (older indexes, or a checkpoint alone) fall back to mean +/- 4 std.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ebm_vae.data.extractors.base import StateInfo

log = logging.getLogger(__name__)

LIMIT_STDS = 4.0  # default half-width of an axis without quantiles, in standard deviations
RANGE_MARGIN = 0.1  # ... within the observed range widened by this fraction
LIMIT_QUANTILES = (0.001, 0.999)  # default limits: these quantiles ...
QUANTILE_MARGIN = 0.1  # ... widened by this fraction of their span on each side
_PC = re.compile(r"pc([1-9][0-9]*)$")


class GridError(ValueError):
    """An export grid that cannot be built; the message names the `export.*` key at fault."""


@dataclass(frozen=True)
class GridStats:
    """What a grid needs to know of the data, per flat component, in physical units.

    `lo`/`hi` are the observed range (None when unknown: no clipping, no range warning);
    `pca_components` (k x D, orthonormal rows) and `pca_std` (k) exist for field states;
    `quantiles` is the statistics pass's {"levels", "values" (L x D) or "pc_values" (L x k)}.
    """

    mean: np.ndarray
    std: np.ndarray
    lo: np.ndarray | None = None
    hi: np.ndarray | None = None
    pca_components: np.ndarray | None = None
    pca_std: np.ndarray | None = None
    quantiles: dict | None = None

    @classmethod
    def from_stats(cls, stats) -> GridStats:
        """From the crawl's `ebm_vae.data.stats.Stats` (index/<capsule>/stats.json)."""
        pca = stats.pca or {}
        return cls(mean=np.asarray(stats.mean, dtype=np.float64), std=np.asarray(stats.std, dtype=np.float64),
                   lo=np.asarray(stats.min, dtype=np.float64), hi=np.asarray(stats.max, dtype=np.float64),
                   pca_components=pca.get("components"), pca_std=pca.get("std"),
                   quantiles=getattr(stats, "quantiles", None))

    def quantile_range(self, key: str, index: int) -> tuple[float, float] | None:
        """The LIMIT_QUANTILES of component (key "values") or principal coefficient ("pc_values")
        `index`, when the statistics have them."""
        if not self.quantiles or key not in self.quantiles:
            return None
        levels = list(np.asarray(self.quantiles["levels"], dtype=np.float64))
        if not all(q in levels for q in LIMIT_QUANTILES):
            return None
        values = np.asarray(self.quantiles[key], dtype=np.float64)
        lo, hi = (float(values[levels.index(q), index]) for q in LIMIT_QUANTILES)
        return lo, hi


@dataclass(frozen=True)
class GridAxis:
    name: str  # a state component name, or pcN
    unit: str
    values: np.ndarray  # float64 grid coordinates, physical units
    index: int  # the state component, or the principal component (0-based)


class StateGrid:
    """A regular grid over 1-3 axes through a reference state; see the module docstring."""

    def __init__(self, state: StateInfo, stats: GridStats, axes: Sequence[GridAxis],
                 reference: np.ndarray):
        self.state = state
        self.stats = stats
        self.axes = tuple(axes)
        self.on_pcs = _PC.match(self.axes[0].name) is not None
        # Held values: a full physical state (component axes) or k coefficients (pc axes).
        self.reference = np.asarray(reference, dtype=np.float64)

    @classmethod
    def build(cls, state: StateInfo, stats: GridStats, axes: Sequence[str] | None = None,
              limits: Sequence[Sequence[float]] | None = None, resolution: int = 128,
              reference: Mapping[str, float] | None = None, counted: bool = False,
              bounds: Mapping[str, Sequence[float | None]] | None = None) -> StateGrid:
        """`counted`: the map is a histogram (what limits beyond the data mean differs);
        `bounds`: the capsule's physical bounds by variable name (default limits stay inside)."""
        axes = list(axes) if axes else default_axes(state, stats)
        if not 1 <= len(axes) <= 3:
            raise GridError(f"export.axes: a map has 1 to 3 axes, got {axes}")
        if len(set(axes)) != len(axes):
            raise GridError(f"export.axes: repeated axis in {axes}")
        if resolution < 2:
            raise GridError(f"export.resolution must be >= 2, got {resolution}")
        if limits is not None:
            limits = _parse_limits(limits, axes)
        on_pcs = [_PC.match(a) is not None for a in axes]
        if any(on_pcs) and not all(on_pcs):
            raise GridError(f"export.axes: mix of principal components and state components in {axes}")
        if all(on_pcs):
            indices, units, default_lims = _pc_axes(state, stats, axes)
        else:
            indices, units, default_lims = _component_axes(state, stats, axes, dict(bounds or {}))
        grid_axes = []
        for d, name in enumerate(axes):
            lo, hi = limits[d] if limits is not None else default_lims[d]
            if limits is not None:
                _check_limits(name, lo, hi, stats, None if all(on_pcs) else indices[d], counted)
                _check_bounds(name, lo, hi, dict(bounds or {}).get(name))
            grid_axes.append(GridAxis(name, units[d], np.linspace(lo, hi, resolution), indices[d]))
        held = _reference(state, stats, axes, all(on_pcs), dict(reference or {}))
        return cls(state, stats, grid_axes, held)

    # -- geometry -------------------------------------------------------------------------

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(len(a.values) for a in self.axes)

    @property
    def n_points(self) -> int:
        return int(np.prod(self.shape))

    def points(self, start: int, stop: int) -> np.ndarray:
        """Coordinates (n, n_axes) of the flat grid points [start, stop), C order (ij indexing)."""
        idx = np.unravel_index(np.arange(start, stop), self.shape)
        return np.stack([a.values[i] for a, i in zip(self.axes, idx, strict=True)], axis=1)

    def states(self, start: int, stop: int) -> np.ndarray:
        """Full flat physical states (n, D) float64 of the grid points [start, stop)."""
        coords = self.points(start, stop)
        cols = [a.index for a in self.axes]
        if self.on_pcs:
            coeffs = np.repeat(self.reference[None, :], len(coords), axis=0)
            coeffs[:, cols] = coords
            return self.stats.mean[None, :] + coeffs @ self.stats.pca_components
        states = np.repeat(self.reference[None, :], len(coords), axis=0)
        states[:, cols] = coords
        return states

    def project(self, states: np.ndarray) -> np.ndarray:
        """Map coordinates (n, n_axes) of flat physical states: the inverse of `states` on the grid."""
        cols = [a.index for a in self.axes]
        if self.on_pcs:
            centred = np.asarray(states, dtype=np.float64) - self.stats.mean[None, :]
            return centred @ self.stats.pca_components[cols].T
        return np.asarray(states, dtype=np.float64)[:, cols]

    def pc_frame(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(pc_vectors (n_axes, D), pc_origin (D,)) of a map on pc axes, physical units: the
        axes' principal vectors and the state at coefficient 0 (the mean plus the held
        coefficients), so that coordinates = (x - pc_origin) @ pc_vectors.T; None otherwise."""
        if not self.on_pcs:
            return None
        cols = [a.index for a in self.axes]
        origin = self.stats.mean + np.delete(self.reference, cols) @ np.delete(self.stats.pca_components, cols, axis=0)
        return np.asarray(self.stats.pca_components[cols], dtype=np.float64), origin

    def reference_metadata(self) -> dict[str, float]:
        """The held values: off-grid components (vector states) or pc coefficients (pc axes).

        For field states with pixel axes only the components set by name are listed; every
        other pixel is at the mean.
        """
        on_grid = {a.index for a in self.axes}
        if self.on_pcs:
            return {f"pc{i + 1}": float(c) for i, c in enumerate(self.reference) if i not in on_grid}
        names = self.state.names
        if self.state.kind == "field":
            return {names[i]: float(v) for i, v in enumerate(self.reference)
                    if i not in on_grid and v != self.stats.mean[i]}
        return {names[i]: float(v) for i, v in enumerate(self.reference) if i not in on_grid}


def default_axes(state: StateInfo, stats: GridStats) -> list[str]:
    """pc1, pc2 for field states (with a principal basis); else the first two components."""
    if state.kind == "field" and stats.pca_components is not None:
        return [f"pc{i + 1}" for i in range(min(2, len(stats.pca_components)))]
    return list(state.names[: min(2, state.dim)])


def _component_axes(state, stats, axes, bounds):
    position = {name: i for i, name in enumerate(state.names)}
    unknown = [a for a in axes if a not in position]
    if unknown:
        shown = list(state.names[:8]) + (["..."] if state.dim > 8 else [])
        hint = ", or pc1, pc2, ..." if stats.pca_components is not None else ""
        raise GridError(f"export.axes: unknown state component(s) {unknown}; known: {shown}{hint}")
    indices = [position[a] for a in axes]
    limits = [_within_bounds(_default_limits(stats, i), bounds.get(name)) for name, i in zip(axes, indices, strict=True)]
    return indices, [state.units[i] for i in indices], limits


def _default_limits(stats: GridStats, i: int) -> tuple[float, float]:
    """Quantiles plus a margin within the observed range; or mean +/- 4 std within it (+10 %)."""
    observed = stats.lo is not None and stats.hi is not None
    quantiles = stats.quantile_range("values", i)
    if quantiles is not None:
        margin = QUANTILE_MARGIN * (quantiles[1] - quantiles[0])
        lo, hi = quantiles[0] - margin, quantiles[1] + margin
        span = (stats.lo[i], stats.hi[i]) if observed else (lo, hi)
    else:
        lo, hi = stats.mean[i] - LIMIT_STDS * stats.std[i], stats.mean[i] + LIMIT_STDS * stats.std[i]
        margin = RANGE_MARGIN * (stats.hi[i] - stats.lo[i]) if observed else 0.0
        span = (stats.lo[i] - margin, stats.hi[i] + margin) if observed else (lo, hi)
    clipped = max(lo, span[0]), min(hi, span[1])
    return (float(clipped[0]), float(clipped[1])) if clipped[1] > clipped[0] else (float(lo), float(hi))


def _within_bounds(limits: tuple[float, float], bound) -> tuple[float, float]:
    """Default limits clipped to a physical bound [lo|None, hi|None] (None: unbounded)."""
    if not bound:
        return limits
    lo = limits[0] if bound[0] is None else max(limits[0], float(bound[0]))
    hi = limits[1] if bound[1] is None else min(limits[1], float(bound[1]))
    return (lo, hi) if hi > lo else limits  # data wholly outside its bounds: leave it to the warning


def _check_bounds(name, lo, hi, bound):
    below = bool(bound) and bound[0] is not None and lo < float(bound[0])
    above = bool(bound) and bound[1] is not None and hi > float(bound[1])
    if below or above:
        log.warning("export.limits for %s: [%g, %g] crosses its physical bounds %s; no state lies "
                    "beyond them (E = +inf there)", name, lo, hi, list(bound))


def _pc_axes(state, stats, axes):
    if stats.pca_components is None:
        raise GridError(f"export.axes: {axes} need a principal basis, which the statistics of this "
                        f"{state.kind} state lack; name state components instead")
    k = len(stats.pca_components)
    indices = [int(_PC.match(a).group(1)) - 1 for a in axes]
    beyond = [a for a, i in zip(axes, indices, strict=True) if i >= k]
    if beyond:
        raise GridError(f"export.axes: {beyond} beyond the {k} principal components stored")
    units = sorted(set(state.units))
    unit = units[0] if len(units) == 1 else "mixed"
    limits = []
    for i in indices:
        quantiles = stats.quantile_range("pc_values", i)
        if quantiles is None:
            limits.append((-LIMIT_STDS * float(stats.pca_std[i]), LIMIT_STDS * float(stats.pca_std[i])))
        else:
            margin = QUANTILE_MARGIN * (quantiles[1] - quantiles[0])
            limits.append((quantiles[0] - margin, quantiles[1] + margin))
    return indices, [unit] * len(axes), limits


def _parse_limits(limits, axes) -> list[tuple[float, float]]:
    if len(limits) != len(axes):
        raise GridError(f"export.limits: {len(limits)} pairs for {len(axes)} axes {axes}")
    try:
        pairs = [(float(lo), float(hi)) for lo, hi in limits]
    except (TypeError, ValueError):
        raise GridError(f"export.limits: expected [[lo, hi], ...] numbers, got {limits}") from None
    if not all(np.isfinite(pairs).all(axis=1)):
        raise GridError(f"export.limits: not finite: {limits}")
    return pairs


def _check_limits(name, lo, hi, stats, component, counted):
    if not hi > lo:
        raise GridError(f"export.limits for {name}: [{lo}, {hi}] is empty (need lo < hi)")
    if component is None or stats.lo is None or stats.hi is None:
        return
    seen_lo, seen_hi = float(stats.lo[component]), float(stats.hi[component])
    if hi < seen_lo or lo > seen_hi:
        raise GridError(f"export.limits for {name}: [{lo}, {hi}] lies outside the data "
                        f"(observed [{seen_lo}, {seen_hi}])")
    margin = RANGE_MARGIN * (seen_hi - seen_lo)
    if lo < seen_lo - margin or hi > seen_hi + margin:
        log.warning("export.limits for %s: [%g, %g] extends beyond the data (observed [%g, %g]); %s",
                    name, lo, hi, seen_lo, seen_hi,
                    "the histogram's bins there are empty" if counted
                    else "energies there are extrapolations of the model")


def _reference(state, stats, axes, on_pcs, reference):
    if on_pcs:
        held = np.zeros(len(stats.pca_components))
        position = {f"pc{i + 1}": i for i in range(len(held))}
    else:
        held = np.asarray(stats.mean, dtype=np.float64).copy()
        position = {name: i for i, name in enumerate(state.names)}
    for name, value in reference.items():
        if name not in position:
            kind = "principal components pc1.." if on_pcs else "state components"
            raise GridError(f"export.reference: '{name}' is not one of the {kind} of this map")
        if name in axes:
            raise GridError(f"export.reference: '{name}' is a map axis, not a held component")
        held[position[name]] = float(value)
    return held
