"""HDF5 with h5py: every dataset of the file (walked with visititems) is a variable.

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
    ArrayHandle,
    FileInfo,
    Reader,
    ReadError,
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


def _read_attrs(attrs: h5py.AttributeManager) -> dict[str, Any]:
    """Attributes as plain values; ones of a type h5py cannot convert are skipped."""
    out = {}
    for key in attrs:
        if key in _INTERNAL_ATTRS:
            continue
        try:
            out[key] = plain_value(attrs[key])
        except (OSError, TypeError, ValueError):
            continue
    return out


def _value_attrs(dsid: h5py.h5d.DatasetID) -> dict[str, Any]:
    """The attributes that say what a dataset's values mean (units, fill, packing).

    Only these are read: a file of many small datasets can carry hundreds of other attributes,
    and reading each costs as much as opening the file.
    """
    present = [name for name in VALUE_ATTRS if h5py.h5a.exists(dsid, name.encode())]
    if not present:
        return {}
    attrs = h5py.Dataset(dsid).attrs
    out = {}
    for name in present:
        try:
            out[name] = plain_value(attrs[name])
        except (OSError, TypeError, ValueError):
            continue
    return out


def _describe(f: h5py.File) -> tuple[dict[str, str], list[VariableInfo]]:
    """Root attributes (as strings) and every dataset, walked with the low-level API: the
    high-level `visititems` builds a Python object per group and dataset, several times slower
    on the small files a crawl meets by the thousand."""
    attrs = {k: attr_text(v) for k, v in _read_attrs(f.attrs).items()}
    variables: list[VariableInfo] = []

    def visit(name: bytes, info: h5py.h5o.ObjInfo) -> None:
        if info.type == h5py.h5o.TYPE_DATASET:
            dsid = h5py.h5d.open(f.id, name)
            variables.append(VariableInfo(name=name.decode("utf-8", errors="replace"),
                                          shape=tuple(int(n) for n in dsid.shape),
                                          dtype=str(dsid.dtype), attrs=_value_attrs(dsid)))

    h5py.h5o.visit(f.id, visit, info=True)
    variables.sort(key=lambda v: v.name)
    return attrs, variables


def _open(path: Path, **kwargs: Any) -> h5py.File:
    if os.path.getsize(path) == 0:
        raise ReadError("empty file")
    try:
        return h5py.File(path, "r", **kwargs)
    except OSError as exc:
        msg = one_line(exc)
        sizes = re.search(r"eof = (\d+).*stored_eof = (\d+)", msg)
        if sizes:
            raise ReadError(f"truncated HDF5: {sizes[1]} of {sizes[2]} bytes") from None
        if "signature" in msg:
            raise ReadError("not an HDF5 file: no HDF5 signature") from None
        raise ReadError(f"unreadable HDF5: {msg}") from None


def _walk(f: h5py.File) -> tuple[dict[str, str], list[VariableInfo]]:
    try:
        return _describe(f)
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
        self._file = _open(path)
        try:
            self.attrs, variables = _walk(self._file)
        except ReadError:
            self._file.close()
            raise
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

    def inspect(self, path: Path) -> FileInfo:
        with _open(path) as f:
            attrs, variables = _walk(f)
        return FileInfo(format=self.format, attrs=attrs, variables=variables)

    def open(self, path: Path) -> Hdf5Handle:
        return Hdf5Handle(Path(path))
