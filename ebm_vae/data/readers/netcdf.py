"""NetCDF (classic and NetCDF-4) with netCDF4: variables of the root group and its subgroups.

The netCDF-C library is not thread-safe and netCDF4-python releases the GIL around its calls
(netcdf4-python#844), so every call into it in this process goes through one lock: the
crawl's threads may inspect NetCDF files side by side, and a DataLoader worker (a process)
keeps its own handle. Masked arrays are switched off (`set_auto_mask(False)`) and fill values
of float variables become NaN, which the stream counts and drops.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import netCDF4
import numpy as np

from ebm_vae.data.readers.base import (
    ArrayHandle,
    FileInfo,
    Reader,
    ReadError,
    VariableInfo,
    attr_text,
    one_line,
    plain_value,
)
from ebm_vae.data.readers.hdf5 import has_signature

CLASSIC_MAGIC = (b"CDF\x01", b"CDF\x02", b"CDF\x05")
EXTENSIONS = (".nc", ".nc4", ".cdf", ".netcdf")
_LOCK = threading.Lock()


def _open(path: Path) -> netCDF4.Dataset:
    if os.path.getsize(path) == 0:
        raise ReadError("empty file")
    try:
        ds = netCDF4.Dataset(path, "r")
    except OSError as exc:
        reason = exc.strerror or one_line(exc)
        if "Unknown file format" in reason:
            raise ReadError(f"not a NetCDF file: {reason}") from None
        raise ReadError(f"unreadable NetCDF: {reason}") from None
    ds.set_auto_mask(False)
    return ds


def _groups(group: netCDF4.Group, prefix: str = ""):
    """(path prefix, group) for a group and all its subgroups."""
    yield prefix, group
    for name, sub in group.groups.items():
        yield from _groups(sub, f"{prefix}{name}/")


def _describe(ds: netCDF4.Dataset) -> tuple[dict[str, str], dict[str, netCDF4.Variable], list[VariableInfo]]:
    try:
        attrs = {k: attr_text(ds.getncattr(k)) for k in ds.ncattrs()}
        handles: dict[str, netCDF4.Variable] = {}
        variables = []
        for prefix, group in _groups(ds):
            for name, var in group.variables.items():
                dtype = var.dtype if isinstance(var.dtype, np.dtype) else np.dtype(object)
                handles[prefix + name] = var
                variables.append(VariableInfo(
                    name=prefix + name, shape=tuple(int(n) for n in var.shape), dtype=str(dtype),
                    dims=tuple(var.dimensions),
                    attrs={k: plain_value(var.getncattr(k)) for k in var.ncattrs()},
                ))
    except (OSError, RuntimeError, KeyError, ValueError, UnicodeDecodeError) as exc:
        raise ReadError(f"corrupt NetCDF: {one_line(exc)}") from None
    return attrs, handles, variables


def _fill_values(var: netCDF4.Variable) -> np.ndarray:
    """The values that mean "no data" for a variable, in the units a read returns."""
    names = var.ncattrs()
    fills = []
    fill = var.getncattr("_FillValue") if "_FillValue" in names else var.get_fill_value()
    if fill is not None:
        fills.append(fill)
    if "missing_value" in names:
        fills.extend(np.atleast_1d(var.getncattr("missing_value")).tolist())
    values = np.asarray(fills, dtype=np.float64)
    if "scale_factor" in names or "add_offset" in names:  # packed: reads are scaled, fills too
        scale = float(var.getncattr("scale_factor")) if "scale_factor" in names else 1.0
        offset = float(var.getncattr("add_offset")) if "add_offset" in names else 0.0
        values = values * scale + offset
    return values


class NetcdfHandle(ArrayHandle):
    def __init__(self, path: Path):
        self.path = path
        with _LOCK:
            self._ds = _open(path)
            try:
                self.attrs, self._vars, variables = _describe(self._ds)
            except ReadError:
                self._ds.close()
                raise
        self.variables = {v.name: v for v in variables}
        self._fills: dict[str, np.ndarray] = {}

    def read(self, name: str, selection: tuple[Any, ...] = ()) -> np.ndarray:
        if name not in self._vars:
            raise ReadError(f"no variable '{name}'")
        var = self._vars[name]
        with _LOCK:
            try:
                data = np.asarray(var[selection] if selection else var[...])
            except (OSError, RuntimeError, IndexError, ValueError) as exc:
                raise ReadError(f"cannot read {name}{list(selection)}: {one_line(exc)}") from None
            if data.dtype.kind == "f":
                if name not in self._fills:
                    self._fills[name] = _fill_values(var)
                fills = self._fills[name].astype(data.dtype)
                if fills.size:
                    data = np.array(data, copy=True) if not data.flags.writeable else data
                    data[np.isin(data, fills)] = np.nan
        return data

    def close(self) -> None:
        with _LOCK:
            self._ds.close()


class NetcdfReader(Reader):
    format = "netcdf"
    extensions = EXTENSIONS
    kind = "array"

    def sniff(self, head: bytes, path: Path) -> bool:
        """Classic magic, or an HDF5 signature (NetCDF-4) on a file named like NetCDF.

        NetCDF-4 files named otherwise are read by the HDF5 reader, which sees the same
        variables (without NetCDF's dimension names for some of them)."""
        if head[:4] in CLASSIC_MAGIC:
            return True
        return has_signature(head) and Path(path).suffix.lower() in EXTENSIONS

    def inspect(self, path: Path) -> FileInfo:
        with _LOCK:
            ds = _open(path)
            try:
                attrs, _, variables = _describe(ds)
            finally:
                ds.close()
        return FileInfo(format=self.format, attrs=attrs, variables=variables)

    def open(self, path: Path) -> NetcdfHandle:
        return NetcdfHandle(Path(path))
