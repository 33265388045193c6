"""The format readers. Adding a format = one module with a `Reader` subclass, listed here."""

from __future__ import annotations

import os
from pathlib import Path

from ebm_vae.data.readers.base import (
    ArrayHandle,
    FileInfo,
    Reader,
    ReadError,
    TableHandle,
    VariableInfo,
)
from ebm_vae.data.readers.csv import CsvReader
from ebm_vae.data.readers.hdf5 import Hdf5Reader
from ebm_vae.data.readers.netcdf import NetcdfReader
from ebm_vae.data.readers.parquet import ParquetReader

# Sniffing order matters: NetCDF-4 files are HDF5 files, so NetCDF claims them first.
READERS: dict[str, Reader] = {r.format: r for r in (NetcdfReader(), Hdf5Reader(), ParquetReader(), CsvReader())}
# Enough to see an HDF5 signature behind a user block of up to 4096 bytes.
HEAD_BYTES = 4096 + 8


def read_head(path: str | os.PathLike) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(HEAD_BYTES)


def sniff_format(path: str | os.PathLike, head: bytes | None = None) -> str | None:
    """The format of a file by its magic bytes, else by its extension; None for other files.

    The extension fallback keeps an empty or damaged `x.h5` an HDF5 file, so that its reader
    reports why it cannot be read.
    """
    path = Path(path)
    head = read_head(path) if head is None else head
    for reader in READERS.values():
        if reader.sniff(head, path):
            return reader.format
    suffix = path.suffix.lower()
    for reader in READERS.values():
        if suffix in reader.extensions:
            return reader.format
    return None


__all__ = ["HEAD_BYTES", "READERS", "ArrayHandle", "FileInfo", "ReadError", "Reader", "TableHandle",
           "VariableInfo", "read_head", "sniff_format"]
