"""`EnergyMap`: the `.npz` contract of DESIGN.md (save atomically, load without pickle, interpolate).

File layout: `energy_map` (float32, ij indexing, E = -log p(x) in nats for the density in the
physical units of the state), `axis_0`, `axis_1`, ... (float64 grid coordinates, physical
units) and `metadata` (a 0-d string holding JSON). Where they apply: `energy_std` (float32, the
map's shape: the uncertainty of E in nats), `support` (float32, the map's shape: training
states per bin around each grid point), `pc_vectors` (float64, n_axes x D) and `pc_origin`
(float64, D) of maps on principal-component axes. Nothing in the file is a Python object, so
`np.load(path, allow_pickle=False)` reads it and loading runs no code.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ebm_vae.io import atomic_path


class EnergyMapError(ValueError):
    """A file that is not a valid energy map; the message names the file."""


@dataclass(frozen=True)
class Minimum:
    """A local minimum of a map: its grid index, its coordinates (physical units) and energy (nats)."""

    index: tuple[int, ...]
    point: np.ndarray
    energy: float


def json_safe(value: Any) -> Any:
    """Plain JSON values: numpy scalars/arrays become lists and numbers, NaN/inf become None.

    Strict JSON has no Infinity; writing one would make the metadata unreadable for other parsers.
    """
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, np.generic):
        return json_safe(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


# Optional arrays of the file: per grid point (float32, the map's shape), and the pc frame (float64).
GRID_ARRAYS = ("energy_std", "support")
PC_ARRAYS = ("pc_vectors", "pc_origin")


class EnergyMap:
    """An energy map on a regular grid, with its axes and provenance.

    `energy(points)` interpolates multilinearly between grid points of a learned map and
    returns the grid value exactly at a grid point; on a histogram map (metadata method
    `histogram`) it returns the energy of the point's own bin (edges halfway between grid
    points), as counting defines it. Outside the grid (outside the outer bins of a histogram)
    it returns +inf: a state never mapped is treated as unseen, i.e. unstable, and never
    extrapolated.
    """

    def __init__(self, energy_map: np.ndarray, axes: Sequence[np.ndarray], metadata: dict[str, Any], *,
                 energy_std: np.ndarray | None = None, support: np.ndarray | None = None,
                 pc_vectors: np.ndarray | None = None, pc_origin: np.ndarray | None = None):
        self.energy_map = np.asarray(energy_map, dtype=np.float32)
        self.axes = tuple(np.asarray(a, dtype=np.float64) for a in axes)
        self.metadata = dict(metadata)
        shape = tuple(len(a) for a in self.axes)
        if self.energy_map.shape != shape:
            raise EnergyMapError(f"energy_map shape {self.energy_map.shape} differs from the axes {shape}")
        for i, axis in enumerate(self.axes):
            if axis.ndim != 1 or len(axis) < 2 or not np.all(np.diff(axis) > 0):
                raise EnergyMapError(f"axis_{i} must be 1-D, strictly increasing, with >= 2 points")
        self.energy_std = None if energy_std is None else np.asarray(energy_std, dtype=np.float32)
        self.support = None if support is None else np.asarray(support, dtype=np.float32)
        for name in GRID_ARRAYS:
            value = getattr(self, name)
            if value is not None and value.shape != shape:
                raise EnergyMapError(f"{name} shape {value.shape} differs from the map's {shape}")
        self.pc_vectors = None if pc_vectors is None else np.asarray(pc_vectors, dtype=np.float64)
        self.pc_origin = None if pc_origin is None else np.asarray(pc_origin, dtype=np.float64)
        if (self.pc_vectors is None) != (self.pc_origin is None):
            raise EnergyMapError("pc_vectors and pc_origin come together")
        if self.pc_vectors is not None and (self.pc_vectors.shape != (self.ndim, self.pc_origin.size)
                                            or self.pc_origin.ndim != 1):
            raise EnergyMapError(f"pc_vectors {self.pc_vectors.shape} must be (n_axes, D) for a pc_origin "
                                 f"of shape (D,), got {self.pc_origin.shape}")

    @property
    def ndim(self) -> int:
        return len(self.axes)

    @property
    def axis_names(self) -> list[str]:
        return [a["name"] for a in self.metadata.get("axes", [])] or [f"axis_{i}" for i in range(self.ndim)]

    @property
    def axis_units(self) -> list[str]:
        return [a.get("unit", "") for a in self.metadata.get("axes", [])] or [""] * self.ndim

    @property
    def is_histogram(self) -> bool:
        """Counted, not learned: energies are per bin, looked up rather than interpolated."""
        return self.metadata.get("method") == "histogram"

    # -- file -----------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write the `.npz` atomically: a killed write leaves any previous file intact."""
        arrays = {f"axis_{i}": axis for i, axis in enumerate(self.axes)}
        arrays.update({name: getattr(self, name) for name in (*GRID_ARRAYS, *PC_ARRAYS)
                       if getattr(self, name) is not None})
        text = json.dumps(json_safe(self.metadata), sort_keys=True, allow_nan=False)
        # A file object, not a name: np.savez appends ".npz" to names lacking it (the temp name).
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, energy_map=self.energy_map, metadata=np.array(text), **arrays)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> EnergyMap:
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                n_axes = sum(1 for key in data.files if key.startswith("axis_"))
                axes = [data[f"axis_{i}"] for i in range(n_axes)]
                energy_map = data["energy_map"]
                metadata = json.loads(str(data["metadata"][()]))
                extra = {name: data[name] for name in (*GRID_ARRAYS, *PC_ARRAYS) if name in data.files}
        except (OSError, ValueError, KeyError, EOFError) as exc:
            raise EnergyMapError(f"{path}: not a readable energy map: {exc}") from None
        try:
            return cls(energy_map, axes, metadata, **extra)
        except EnergyMapError as exc:
            raise EnergyMapError(f"{path}: {exc}") from None

    # -- queries --------------------------------------------------------------------------

    def energy(self, points: Any) -> np.ndarray:
        """E at `points` (N, n_axes) in physical units -> (N,) float64 nats; +inf outside the grid.

        Learned maps interpolate multilinearly; histogram maps return the point's own bin.
        """
        points = np.asarray(points, dtype=np.float64)
        if self.ndim == 1 and points.ndim == 1:
            points = points[:, None]
        if points.ndim != 2 or points.shape[1] != self.ndim:
            raise ValueError(f"points must have shape (N, {self.ndim}), got {points.shape}")
        if self.is_histogram:
            return self._bin_energy(points)
        n = len(points)
        inside = np.all(np.isfinite(points), axis=1)
        lower, frac = [], []
        for d, axis in enumerate(self.axes):
            x = points[:, d]
            inside &= (x >= axis[0]) & (x <= axis[-1])
            i = np.clip(np.searchsorted(axis, x, side="right") - 1, 0, len(axis) - 2)
            lower.append(i)
            frac.append(np.clip((x - axis[i]) / (axis[i + 1] - axis[i]), 0.0, 1.0))
        values = self.energy_map.astype(np.float64)
        result = np.zeros(n)
        for corner in np.ndindex(*(2,) * self.ndim):
            weight = np.ones(n)
            for d, up in enumerate(corner):
                weight *= frac[d] if up else 1.0 - frac[d]
            corner_values = values[tuple(lower[d] + up for d, up in enumerate(corner))]
            # Skip zero weights: a +inf (empty) neighbour must not turn 0 * inf into NaN.
            with np.errstate(invalid="ignore"):
                result += np.where(weight > 0, weight * corner_values, 0.0)
        result[~inside] = np.inf
        return result

    def _bin_energy(self, points: np.ndarray) -> np.ndarray:
        """The energy of each point's bin; +inf outside the outer bin edges (a point on an
        inner edge belongs to the upper bin, as the histogram counted it)."""
        index, inside = [], np.all(np.isfinite(points), axis=1)
        for d, axis in enumerate(self.axes):
            mid = 0.5 * (axis[1:] + axis[:-1])
            edges = np.concatenate([[axis[0] - (mid[0] - axis[0])], mid, [axis[-1] + (axis[-1] - mid[-1])]])
            x = points[:, d]
            inside &= (x >= edges[0]) & (x < edges[-1])
            index.append(np.clip(np.searchsorted(edges, x, side="right") - 1, 0, len(axis) - 1))
        result = self.energy_map.astype(np.float64)[tuple(index)]
        result[~inside] = np.inf
        return result

    def project(self, states: Any) -> np.ndarray:
        """Map coordinates (N, n_axes) of full flat states (N, D) or (N, *state shape) in physical
        units: their principal coefficients on a pc map, their axis components otherwise.

        `m.energy(m.project(states))` places any recorded state on the map.
        """
        states = np.asarray(states, dtype=np.float64)
        flat = states.reshape(len(states), -1)
        if self.pc_vectors is not None:
            if flat.shape[1] != self.pc_origin.size:
                raise ValueError(f"states have {flat.shape[1]} components, the map's pc_vectors "
                                 f"{self.pc_origin.size}")
            return (flat - self.pc_origin) @ self.pc_vectors.T
        columns = [a.get("component") for a in self.metadata.get("axes", [])]
        if len(columns) != self.ndim or any(c is None for c in columns):
            raise ValueError("this map does not record which state components its axes are "
                             "(metadata axes[i].component); pass map coordinates to energy()")
        dim = int(np.prod(self.metadata.get("state", {}).get("shape", [flat.shape[1]])))
        if flat.shape[1] != dim:
            raise ValueError(f"states have {flat.shape[1]} components, the map's state {dim}")
        return flat[:, columns]

    def minima(self, radius: int = 1) -> list[Minimum]:
        """Local minima, lowest first: finite grid values that are the minimum of their window.

        The window spans `radius` grid points each way along every axis; a larger radius
        ignores the shallow dips of a noisy map.
        """
        values = self.energy_map.astype(np.float64)
        window_min = values
        for d in range(self.ndim):
            pad = [(0, 0)] * self.ndim
            pad[d] = (radius, radius)
            padded = np.pad(window_min, pad, constant_values=np.inf)
            n = values.shape[d]
            window_min = np.min(
                [np.take(padded, range(s, s + n), axis=d) for s in range(2 * radius + 1)], axis=0
            )
        found = np.argwhere(np.isfinite(values) & (values <= window_min))
        minima = [
            Minimum(tuple(int(i) for i in idx),
                    np.array([axis[i] for axis, i in zip(self.axes, idx, strict=True)]), float(values[tuple(idx)]))
            for idx in found
        ]
        return sorted(minima, key=lambda m: m.energy)
