"""Wafer thermal states: the surface temperature map in kelvin, one state per snapshot.

Reads `surface_temperature(time, y, x)`, or layer `params.layer` of `temperature(time, layer,
y, x)` when the file has no surface variable (NetCDF or HDF5 root datasets). The map keeps the
stored (y, x) order. Units come from the variable's `units` attribute and are normalised to
kelvin (K, degC/Celsius, degF/Fahrenheit); a variable without units is taken as kelvin.
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

_KELVIN = {"k", "kelvin", "kelvins", "degk", "deg_k"}
_CELSIUS = {"degc", "deg_c", "c", "celsius", "degree_celsius", "degrees_celsius", "°c", "degreec"}
_FAHRENHEIT = {"degf", "deg_f", "f", "fahrenheit", "degree_fahrenheit", "degrees_fahrenheit", "°f",
               "degreef"}


def kelvin_transform(units: str | None, where: str) -> tuple[float, float]:
    """(scale, offset) with kelvin = stored * scale + offset."""
    key = "k" if units is None else str(units).strip().lower().replace(" ", "_")
    if key in _KELVIN or key == "":
        return 1.0, 0.0
    if key in _CELSIUS:
        return 1.0, 273.15
    if key in _FAHRENHEIT:
        return 5.0 / 9.0, 273.15 - 32.0 * 5.0 / 9.0
    raise ExtractError(f"unknown temperature units '{units}' on {where} (K, degC, degF)")


@dataclass(frozen=True)
class _Layout:
    variable: str
    layer: int | None  # None: a (time, y, x) surface variable
    n_time: int
    ny: int
    nx: int
    scale: float
    offset: float


class WaferExtractor(Extractor):
    name = "wafer"
    formats = ("netcdf", "hdf5")

    def _layout(self, variables: dict[str, VariableInfo]) -> _Layout:
        if "surface_temperature" in variables:
            var, layer = variables["surface_temperature"], None
            if len(var.shape) != 3:
                raise ExtractError(f"surface_temperature has shape {tuple(var.shape)}, expected (time, y, x)")
            n_time, ny, nx = var.shape
        elif "temperature" in variables:
            var, layer = variables["temperature"], int(self.capsule.params.get("layer", 0))
            if len(var.shape) != 4:
                raise ExtractError(f"temperature has shape {tuple(var.shape)}, expected (time, layer, y, x)")
            n_time, n_layers, ny, nx = var.shape
            if not 0 <= layer < n_layers:
                raise ExtractError(f"params.layer {layer} out of range: temperature has {n_layers} layers")
        else:
            raise ExtractError("missing variables ['surface_temperature'] (or 'temperature')")
        scale, offset = kelvin_transform(var.attrs.get("units"), var.name)
        return _Layout(var.name, layer, int(n_time), int(ny), int(nx), scale, offset)

    def plan(self, info: FileInfo) -> FilePlan:
        self.check_format(info)
        layout = self._layout(variables_of(info))
        pool = pool_factor(self.capsule.params)
        if layout.ny < pool or layout.nx < pool:
            raise ExtractError(f"{layout.variable}: {layout.ny}x{layout.nx} map is smaller than pool {pool}")
        state = StateInfo.field(("surface_temperature",), ("K",), (layout.ny // pool, layout.nx // pool))
        return FilePlan(n_samples=layout.n_time, extent=layout.n_time, state=state)

    def iter_states(self, handle: ArrayHandle, plan: FilePlan, start: int, stop: int,
                    chunk: int) -> Iterator[np.ndarray]:
        layout = self._layout(variables_of(handle))
        pool = pool_factor(self.capsule.params)
        for t0 in range(start, stop, max(1, chunk)):
            t1 = min(stop, t0 + max(1, chunk))
            layer = () if layout.layer is None else (layout.layer,)
            selection = (slice(t0, t1), *layer, slice(None), slice(None))
            block = np.asarray(handle.read(layout.variable, selection), dtype=np.float32)
            if (layout.scale, layout.offset) != (1.0, 0.0):
                block = block * np.float32(layout.scale) + np.float32(layout.offset)
            block = avg_pool(block, pool)  # (n, y, x)
            yield np.ascontiguousarray(block, dtype=np.float32).reshape(len(block), -1)
