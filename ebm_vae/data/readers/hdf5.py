"""HDF5 with h5py: every dataset of the file, in any group, is a variable (named by its path).

Inspection reads the root attributes (all, as strings, for capsule matching) and per dataset
its shape, dtype and the attributes that give its values meaning (units, fill, packing);
dimension names are not read (NetCDF-4 files named `.nc` go to the NetCDF reader for those).

A dataset's chunk cache is sized, on its first read, to the chunks that read touches: the
stream reads one range of snapshots after another with the same shape, so chunks spanning
several snapshots are decompressed once instead of once per read (h5py's default cache is
1 MiB, smaller than one 64^3 x 3 float32 chunk row).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import h5py
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

SIGNATURE = b"\x89HDF\r\n\x1a\n"
# The signature sits at 0 or, after a user block, at 512, 1024, 2048, ...
SIGNATURE_OFFSETS = (0, 512, 1024, 2048, 4096)
# Dimension-scale bookkeeping attributes: references, not metadata a user reads.
_INTERNAL_ATTRS = {"DIMENSION_LIST", "REFERENCE_LIST", "CLASS", "NAME", "_Netcdf4Dimid",
                   "_Netcdf4Coordinates", "_nc3_strict", "_NCProperties"}
# Per-dataset attributes kept in VariableInfo.attrs (what extractors need to interpret values).
VALUE_ATTRS = ("units", "long_name", "standard_name", "_FillValue", "missing_value", "scale_factor",
               "add_offset")
MIN_CACHE_BYTES = 1 << 20
MAX_CACHE_BYTES = 512 << 20


def has_signature(head: bytes) -> bool:
    return any(head[o : o + len(SIGNATURE)] == SIGNATURE for o in SIGNATURE_OFFSETS)


def _read_attrs(oid: h5py.h5o.ObjectID, wanted: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Attributes of an object as plain values: all of them (but HDF5/NetCDF bookkeeping), or
    only the `wanted` ones; ones of a type numpy cannot hold are skipped.

    Read with the low-level API: a crawl meets small files by the thousand, and there the
    high-level AttributeManager costs about as much per attribute as opening the file.
    """
    out = {}
    for index in range(h5py.h5o.get_info(oid).num_attrs):
        try:
            attr = h5py.h5a.open(oid, index=index)
            name = attr.name.decode("utf-8", errors="replace")
            if name in _INTERNAL_ATTRS or (wanted is not None and name not in wanted):
                continue
            value = np.empty(attr.shape, attr.dtype)
            attr.read(value)
        except (OSError, TypeError, ValueError):
            continue
        out[name] = plain_value(value)
    return out


def _describe(fid: h5py.h5f.FileID) -> tuple[dict[str, str], list[VariableInfo]]:
    """Root attributes (as strings) and every dataset, walked with the low-level API (the
    high-level `visititems` builds a Python object per group and dataset)."""
    attrs = {k: attr_text(v) for k, v in _read_attrs(fid).items()}
    variables: list[VariableInfo] = []

    def visit(name: bytes, info: h5py.h5o.ObjInfo) -> None:
        if info.type == h5py.h5o.TYPE_DATASET:
            dsid = h5py.h5d.open(fid, name)
            variables.append(VariableInfo(name=name.decode("utf-8", errors="replace"),
                                          shape=tuple(int(n) for n in dsid.shape),
                                          dtype=str(dsid.dtype), attrs=_read_attrs(dsid, VALUE_ATTRS)))

    h5py.h5o.visit(fid, visit, info=True)
    variables.sort(key=lambda v: v.name)
    return attrs, variables


def _open(path: Path) -> h5py.h5f.FileID:
    """The low-level file id: cheaper to open and close than `h5py.File`, which wraps it."""
    if os.path.getsize(path) == 0:
        raise ReadError("empty file")
    try:
        return h5py.h5f.open(os.fsencode(path), h5py.h5f.ACC_RDONLY)
    except OSError as exc:
        msg = one_line(exc)
        sizes = re.search(r"eof = (\d+).*stored_eof = (\d+)", msg)
        if sizes:
            raise ReadError(f"truncated HDF5: {sizes[1]} of {sizes[2]} bytes") from None
        if "signature" in msg:
            raise ReadError("not an HDF5 file: no HDF5 signature") from None
        raise ReadError(f"unreadable HDF5: {msg}") from None


def _walk(fid: h5py.h5f.FileID) -> tuple[dict[str, str], list[VariableInfo]]:
    try:
        return _describe(fid)
    except (OSError, RuntimeError, KeyError, ValueError) as exc:
        raise ReadError(f"corrupt HDF5: {one_line(exc)}") from None


def _selection_bounds(shape: tuple[int, ...], selection: tuple[Any, ...]) -> list[tuple[int, int]]:
    """[start, stop) per axis of the box a selection of ints and slices covers."""
    bounds = []
    for axis, n in enumerate(shape):
        sel = selection[axis] if axis < len(selection) else slice(None)
        if isinstance(sel, slice):
            start, stop, step = sel.indices(n)
            if step < 0:
                start, stop = stop + 1, start + 1
            bounds.append((start, max(start, stop)))
        else:
            i = int(sel) + (n if int(sel) < 0 else 0)
            bounds.append((i, i + 1))
    return bounds


def chunk_cache_bytes(shape: tuple[int, ...], chunks: tuple[int, ...] | None, itemsize: int,
                      selection: tuple[Any, ...]) -> int:
    """Bytes of the chunks a selection touches, clamped to [1 MiB, 512 MiB]."""
    if not chunks:
        return MIN_CACHE_BYTES
    n_chunks = 1
    for (start, stop), c in zip(_selection_bounds(shape, selection), chunks, strict=True):
        if stop > start:
            n_chunks *= (stop - 1) // c - start // c + 1
    return min(MAX_CACHE_BYTES, max(MIN_CACHE_BYTES, n_chunks * math.prod(chunks) * itemsize))


class Hdf5Handle(ArrayHandle):
    def __init__(self, path: Path):
        self.path = path
        fid = _open(path)
        try:
            self.attrs, variables = _walk(fid)
        except ReadError:
            fid.close()
            raise
        self._file = h5py.File(fid)
        self.variables = {v.name: v for v in variables}
        self._datasets: dict[str, h5py.Dataset] = {}

    def _dataset(self, name: str, selection: tuple[Any, ...]) -> h5py.Dataset:
        ds = self._datasets.get(name)
        if ds is not None:
            return ds
        if name not in self.variables:
            raise ReadError(f"no dataset '{name}'")
        plain = self._file[name]
        nbytes = chunk_cache_bytes(plain.shape, plain.chunks, plain.dtype.itemsize, selection)
        dapl = h5py.h5p.create(h5py.h5p.DATASET_ACCESS)
        # nslots ~ 10 x the chunks held (HDF5's advice is a prime well above that count); w0 = 1
        # evicts fully read chunks first, which is every chunk once a range has been read.
        n_chunks = nbytes // max(1, math.prod(plain.chunks or (1,)) * plain.dtype.itemsize)
        dapl.set_chunk_cache(max(521, 10 * n_chunks + 1), nbytes, 1.0)
        ds = h5py.Dataset(h5py.h5d.open(self._file.id, name.encode(), dapl=dapl))
        self._datasets[name] = ds
        return ds

    def read(self, name: str, selection: tuple[Any, ...] = ()) -> np.ndarray:
        ds = self._dataset(name, selection)
        try:
            return np.asarray(ds[selection] if selection else ds[()])
        except (OSError, ValueError, TypeError, IndexError) as exc:
            raise ReadError(f"cannot read {name}{list(selection)}: {one_line(exc)}") from None

    def close(self) -> None:
        self._datasets.clear()
        self._file.close()


class Hdf5Reader(Reader):
    format = "hdf5"
    extensions = (".h5", ".hdf5", ".hdf", ".he5")
    kind = "array"

    def sniff(self, head: bytes, path: Path) -> bool:
        return has_signature(head)

    def inspect(self, path: Path, options: ReadOptions = DEFAULT_OPTIONS) -> FileInfo:
        fid = _open(path)
        try:
            attrs, variables = _walk(fid)
        finally:
            fid.close()
        return FileInfo(format=self.format, attrs=attrs, variables=variables)

    def open(self, path: Path, options: ReadOptions = DEFAULT_OPTIONS) -> Hdf5Handle:
        return Hdf5Handle(Path(path))
