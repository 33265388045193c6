"""Fusion (MHD) states: the magnetic field (Bx, By, Bz) on one z-plane of a 3-D vector field.

Two HDF5 layouts are read:
- the Well: `t1_fields/<params.field>` shaped (traj, time, x, y, z, 3), coordinates in
  `dimensions/{x,y,z,time}`;
- plain: a root dataset `B` (or `<params.field>`) shaped (time, x, y, z, 3), root coordinates
  `x, y, z`.

A sample is one snapshot; samples are the (traj, time) pairs in C order, so the extent is
traj x time. The plane is the one whose z coordinate is nearest `params.z`; a file without a
z coordinate uses the middle plane index nz // 2 (for the usual grid centred on 0 that is the
plane z = 0). Only that plane is read (a hyperslab), never the volume. Values are converted
to tesla from the dataset's `units` attribute (T by default; G/gauss and mT are converted).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ebm_vae.data.extractors.base import (
    ExtractError,
    Extractor,
    FilePlan,
    StateInfo,
    avg_pool,
    pool_factor,
    variables_of,
)
from ebm_vae.data.readers.base import ArrayHandle, FileInfo, VariableInfo

_TESLA_PER_UNIT = {"t": 1.0, "tesla": 1.0, "g": 1e-4, "gauss": 1e-4, "mt": 1e-3, "millitesla": 1e-3}
CHANNELS = ("Bx", "By", "Bz")


def tesla_per_unit(units: str | None, where: str) -> float:
    if units is None or str(units).strip() == "":
        return 1.0
    key = str(units).strip().lower()
    if key not in _TESLA_PER_UNIT:
        raise ExtractError(f"unknown magnetic field units '{units}' on {where} (T, G, gauss, mT)")
    return _TESLA_PER_UNIT[key]


@dataclass(frozen=True)
class _Layout:
    dataset: str
    well: bool  # True: leading (traj, time) axes; False: leading (time,) axis
    n_traj: int
    n_time: int
    nx: int
    ny: int
    nz: int
    z_coordinate: str | None
    scale: float  # tesla per stored unit


class FusionExtractor(Extractor):
    name = "fusion"
    formats = ("hdf5",)

    def _layout(self, variables: dict[str, VariableInfo]) -> _Layout:
        field = str(self.capsule.params.get("field", "magnetic_field"))
        well_name = f"t1_fields/{field}"
        if well_name in variables:
            var, well, z_name, lead = variables[well_name], True, "dimensions/z", 2
        else:
            plain = next((n for n in ("B", field) if n in variables), None)
            if plain is None:
                raise ExtractError(f"missing variables ['{well_name}'] (or a root dataset 'B')")
            var, well, z_name, lead = variables[plain], False, "z", 1
        shape = tuple(var.shape)
        if len(shape) != lead + 4 or shape[-1] != 3:
            expected = "(traj, time, x, y, z, 3)" if well else "(time, x, y, z, 3)"
            raise ExtractError(f"{var.name} has shape {shape}, expected {expected}")
        n_traj, n_time = (shape[0], shape[1]) if well else (1, shape[0])
        nx, ny, nz = shape[lead : lead + 3]
        z_coordinate = z_name if z_name in variables else None
        if z_coordinate is not None and tuple(variables[z_coordinate].shape) != (nz,):
            raise ExtractError(
                f"{z_coordinate} has shape {tuple(variables[z_coordinate].shape)} for {nz} z-planes"
            )
        scale = tesla_per_unit(var.attrs.get("units"), var.name)
        return _Layout(var.name, well, n_traj, n_time, nx, ny, nz, z_coordinate, scale)

    def plan(self, info: FileInfo) -> FilePlan:
        self.check_format(info)
        layout = self._layout(variables_of(info))
        pool = pool_factor(self.capsule.params)
        if layout.nx < pool or layout.ny < pool:
            raise ExtractError(f"{layout.dataset}: {layout.nx}x{layout.ny} plane is smaller than pool {pool}")
        state = StateInfo.field(CHANNELS, ("T",) * 3, (layout.nx // pool, layout.ny // pool))
        n = layout.n_traj * layout.n_time
        return FilePlan(n_samples=n, extent=n, state=state)

    def plane_index(self, handle: ArrayHandle, layout: _Layout) -> int:
        """The z index nearest `params.z`, or the middle plane without a z coordinate."""
        if layout.z_coordinate is None:
            return layout.nz // 2
        z = np.asarray(handle.read(layout.z_coordinate), dtype=np.float64)
        return int(np.argmin(np.abs(z - float(self.capsule.params.get("z", 0.0)))))

    def iter_states(self, handle: ArrayHandle, plan: FilePlan, start: int, stop: int,
                    chunk: int) -> Iterator[np.ndarray]:
        layout = self._layout(variables_of(handle))
        iz = self.plane_index(handle, layout)
        pool = pool_factor(self.capsule.params)
        sample = start
        while sample < stop:
            traj, t0 = divmod(sample, layout.n_time)
            t1 = min(layout.n_time, t0 + max(1, chunk), t0 + (stop - sample))
            lead = (traj, slice(t0, t1)) if layout.well else (slice(t0, t1),)
            block = handle.read(layout.dataset, (*lead, slice(None), slice(None), iz, slice(None)))
            block = np.asarray(block, dtype=np.float32)  # (n, x, y, 3)
            if layout.scale != 1.0:
                block = block * np.float32(layout.scale)
            # channels first, as a view: the one copy of a state (the stream's shuffle, or
            # flat_states) transposes it
            yield avg_pool(np.moveaxis(block, -1, 1), pool)
            sample += t1 - t0
