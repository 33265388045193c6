"""NetCDF (classic and NetCDF-4) with netCDF4: variables of the root group and its subgroups.

The netCDF-C library is not thread-safe and netCDF4-python releases the GIL around its calls
(netcdf4-python#844), so every call into it in this process goes through one lock: the
crawl's threads may inspect NetCDF files side by side, and a DataLoader worker (a process)
keeps its own handle. Masked arrays are switched off (`set_auto_mask(False)`) and fill values
of float variables become NaN, which the stream counts and drops.
"""

from __future__ import annotations

import math
import os
import threading
from pathlib import Path
from typing import Any

import netCDF4
import numpy as np

from ebm_vae.data.readers.base import (
    DEFAULT_OPTIONS,
    ArrayHandle,
    FileInfo,
    Reader,
    ReadError,
    ReadOptions,
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
    size = os.path.getsize(path)
    if size == 0:
        raise ReadError("empty file")
    _check_classic_header(path, size)
    try:
        ds = netCDF4.Dataset(path, "r")
    except (RuntimeError, UnicodeDecodeError) as exc:  # a damaged header or attribute name
        raise ReadError(f"corrupt NetCDF: {one_line(exc)}") from None
    except OSError as exc:
        reason = exc.strerror or one_line(exc)
        if "Unknown file format" in reason:
            raise ReadError(f"not a NetCDF file: {reason}") from None
        raise ReadError(f"unreadable NetCDF: {reason}") from None
    ds.set_auto_mask(False)
    return ds


def _check_classic_header(path: Path, size: int) -> None:
    """Refuse a classic file whose header is damaged or promises more data than the file holds.

    Checked before netCDF-C sees the file: on such files it reads the missing data as zeros
    without an error, and on some damaged headers it never returns.
    """
    try:
        with open(path, "rb") as fh:
            if fh.read(4) not in CLASSIC_MAGIC:
                return
            fh.seek(0)
            expected = classic_data_end(fh)
    except OSError as exc:
        raise ReadError(f"cannot open: {exc.strerror or one_line(exc)}") from None
    except (ValueError, IndexError, KeyError, OverflowError) as exc:
        raise ReadError(f"corrupt NetCDF header: {type(exc).__name__}: {one_line(exc)}") from None
    if size < expected:
        raise ReadError(f"truncated NetCDF: {size} of {expected} bytes")


# Bytes per value of the classic types: byte, char, short, int, float, double (CDF-1/2), then
# CDF-5's ubyte, ushort, uint, int64, uint64.
_CLASSIC_TYPE_BYTES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 4, 6: 8, 7: 1, 8: 2, 9: 4, 10: 8, 11: 8}


def classic_data_end(fh) -> int:
    """Where the data of a classic (CDF-1, -2 or -5) NetCDF file ends, from its header.

    Follows the format specification: big-endian integers, 64-bit counts in CDF-5, 64-bit
    offsets from CDF-2 on. Every loop step reads bytes, so a damaged count fails at the end of
    the file instead of looping on.
    """
    version = fh.read(4)[3]
    count_bytes, offset_bytes = (8, 8) if version == 5 else (4, 8 if version == 2 else 4)

    def number(n_bytes: int) -> int:
        raw = fh.read(n_bytes)
        if len(raw) < n_bytes:
            raise ValueError("header cut short")
        return int.from_bytes(raw, "big")

    def skip_name() -> None:
        n = number(count_bytes)
        fh.seek(n + -n % 4, os.SEEK_CUR)

    def skip_attributes() -> None:
        number(4)  # NC_ATTRIBUTE or ABSENT
        for _ in range(number(count_bytes)):
            skip_name()
            kind = number(4)
            n = number(count_bytes) * _CLASSIC_TYPE_BYTES[kind]
            fh.seek(n + -n % 4, os.SEEK_CUR)

    numrecs = number(count_bytes)
    number(4)  # NC_DIMENSION or ABSENT
    dims = []
    for _ in range(number(count_bytes)):
        skip_name()
        dims.append(number(count_bytes))
    skip_attributes()
    number(4)  # NC_VARIABLE or ABSENT
    fixed_ends, records = [0], []  # records: (begin, bytes per record) of record variables
    for _ in range(number(count_bytes)):
        skip_name()
        shape = [dims[number(count_bytes)] for _ in range(number(count_bytes))]
        skip_attributes()
        kind = number(4)
        number(count_bytes)  # vsize: clamped for large variables, so recomputed from the shape
        begin = number(offset_bytes)
        is_record = bool(shape) and shape[0] == 0
        values = math.prod(shape[1:] if is_record else shape)
        if is_record:
            records.append((begin, values * _CLASSIC_TYPE_BYTES[kind]))
        else:
            fixed_ends.append(begin + values * _CLASSIC_TYPE_BYTES[kind])
    end = max(fixed_ends)
    streaming = numrecs == (1 << 8 * count_bytes) - 1  # numrecs unknown: written while read
    if records and numrecs > 0 and not streaming:
        # Records interleave every record variable; a lone one is not padded to 4 bytes.
        record_bytes = records[0][1] if len(records) == 1 else sum(n + -n % 4 for _, n in records)
        end = max(end, *(begin + (numrecs - 1) * record_bytes + n for begin, n in records))
    return end


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

    def inspect(self, path: Path, options: ReadOptions = DEFAULT_OPTIONS) -> FileInfo:
        with _LOCK:
            ds = _open(path)
            try:
                attrs, _, variables = _describe(ds)
            finally:
                ds.close()
        return FileInfo(format=self.format, attrs=attrs, variables=variables)

    def open(self, path: Path, options: ReadOptions = DEFAULT_OPTIONS) -> NetcdfHandle:
        return NetcdfHandle(Path(path))
