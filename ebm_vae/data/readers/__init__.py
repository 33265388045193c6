"""The format readers. Adding a format = one module with a `Reader` subclass, listed here."""

from __future__ import annotations

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

READERS: dict[str, Reader] = {r.format: r for r in (Hdf5Reader(), NetcdfReader(), ParquetReader(), CsvReader())}

__all__ = ["READERS", "ArrayHandle", "FileInfo", "ReadError", "Reader", "TableHandle", "VariableInfo"]
