"""The format readers. Adding a format = one module with a `Reader` subclass, listed here."""

from __future__ import annotations

import os
from pathlib import Path

from ebm_vae.data.readers.base import (
    DEFAULT_OPTIONS,
    ArrayHandle,
    FileInfo,
    Handle,
    Reader,
    ReadError,
    ReadOptions,
    TableHandle,
    VariableInfo,
)
from ebm_vae.data.readers.csv import CsvReader
from ebm_vae.data.readers.hdf5 import Hdf5Reader
from ebm_vae.data.readers.log import LogReader
from ebm_vae.data.readers.netcdf import NetcdfReader
from ebm_vae.data.readers.parquet import ParquetReader

# Sniffing order matters: NetCDF-4 files are HDF5 files, so NetCDF claims them first; magic
# bytes (HDF5, Parquet) win over names (a `.log` that is an HDF5 file is read as HDF5).
READERS: dict[str, Reader] = {r.format: r for r in (NetcdfReader(), Hdf5Reader(), ParquetReader(), CsvReader(),
                                                    LogReader())}
# Enough to see an HDF5 signature behind a user block of up to 4096 bytes.
HEAD_BYTES = 4096 + 8


def read_head(path: str | os.PathLike) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(HEAD_BYTES)


def sniff_format(path: str | os.PathLike, head: bytes | None = None) -> str | None:
    """The format of a file by its magic bytes (or name and content), else by its name alone;
    None for other files.

    The name fallback keeps an empty or damaged `x.h5` an HDF5 file, so that its reader
    reports why it cannot be read.
    """
    path = Path(path)
    head = read_head(path) if head is None else head
    for reader in READERS.values():
        if reader.sniff(head, path):
            return reader.format
    for reader in READERS.values():
        if reader.named_like(path):
            return reader.format
    return None


__all__ = ["DEFAULT_OPTIONS", "HEAD_BYTES", "READERS", "ArrayHandle", "FileInfo", "Handle", "ReadError",
           "ReadOptions", "Reader", "TableHandle", "VariableInfo", "read_head", "sniff_format"]
