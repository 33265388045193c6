"""What every format reader offers: sniffing, metadata-only inspection, and lazy range reads.

Two kinds of handle exist because the formats are of two kinds: array files (HDF5, NetCDF)
whose variables are read by hyperslab, and tables (Parquet, CSV, text logs) read as column
batches over a range of their *extent* (rows for Parquet; bytes, split at line ends, for CSV
and logs). Handles are opened inside the worker process that uses them, never before a fork.

How a file is read can depend on the capsule it belongs to (`ReadOptions`: lines above a CSV
header, a log's line rule); formats without such choices ignore the options.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np


class ReadError(Exception):
    """A file that cannot be read as its format; the message is the one-line reason."""


@dataclass(frozen=True)
class ReadOptions:
    """A capsule's choices for reading its files (`Extractor.read_options` builds them)."""

    skip_rows: int = 0  # CSV: lines above the header (e.g. a station line)
    log_pattern: str | None = None  # logs: RE2 regex whose named groups are the fields; None = key=value
    # logs: (column, group of `log_pattern` or key as written) per field the capsule reads
    log_fields: tuple[tuple[str, str], ...] = ()
    timestamp_format: str | None = None  # logs: strptime format of the timestamp; None = ISO 8601


DEFAULT_OPTIONS = ReadOptions()


@dataclass
class VariableInfo:
    name: str  # HDF5: full path without leading '/', e.g. "t1_fields/magnetic_field"
    shape: tuple[int, ...]
    dtype: str  # numpy dtype string, e.g. "float32"
    dims: tuple[str, ...] = ()  # dimension names where the format has them (NetCDF, HDF5 dims)
    attrs: dict[str, Any] = field(default_factory=dict)  # e.g. {"units": "K"}


@dataclass
class FileInfo:
    format: str
    attrs: dict[str, str]  # global attributes / key-value metadata, values as strings
    variables: list[VariableInfo]  # datasets/variables, or table columns with shape (n_rows,)
    n_rows: int | None = None  # tables: number of data rows; arrays: None
    extent: int | None = None  # tables: TableHandle.extent (rows for Parquet, bytes for CSV)
    # rows the inspection skipped (log lines that do not parse); None: not counted at inspection
    skipped_rows: int | None = None


class Handle(ABC):
    """An open file. `skipped_rows` counts the rows its reads skipped so far (log lines that
    do not parse, CSV rows with the wrong number of fields; always 0 for HDF5, NetCDF and
    Parquet): the rows of a range are its difference before and after reading the range, and
    the ranges of a partition of the extent count every skipped row of the file once."""

    skipped_rows: int = 0

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ArrayHandle(Handle):
    """An open HDF5/NetCDF file."""

    attrs: dict[str, str]
    variables: dict[str, VariableInfo]

    @abstractmethod
    def read(self, name: str, selection: tuple[Any, ...] = ()) -> np.ndarray:
        """Read `variables[name][selection]` (ints and slices per axis) without touching the rest."""


class TableHandle(Handle):
    """An open Parquet/CSV/log file read as column batches."""

    attrs: dict[str, str]
    columns: dict[str, VariableInfo]
    extent: int  # the addressable length: rows (Parquet), bytes (CSV, logs), 1 (a gzip log)
    extent_unit: str  # "rows" or "bytes"

    @abstractmethod
    def iter_batches(self, columns: list[str], start: int = 0, stop: int | None = None,
                     batch_rows: int = 65536) -> Iterator[dict[str, np.ndarray]]:
        """Yield dicts of 1-D arrays for `columns` over [start, stop) of the extent, in order.

        Non-numeric values in a numeric column become NaN (counted and dropped downstream).
        Every row belongs to exactly one range of a partition of [0, extent).
        """


class Reader(ABC):
    """One per format; registered in `ebm_vae.data.readers.READERS` under `format`."""

    format: ClassVar[str]
    extensions: ClassVar[tuple[str, ...]]
    kind: ClassVar[str]  # "array" or "table"
    byte_extent: ClassVar[bool] = False  # True: the extent is bytes, split at line ends (work units)

    @abstractmethod
    def sniff(self, head: bytes, path: Path) -> bool:
        """True when the first bytes (>= 512 or the whole file) say this is our format."""

    def named_like(self, path: Path) -> bool:
        """True when the file's name alone says this format (a damaged file keeps its format)."""
        return Path(path).suffix.lower() in self.extensions

    @abstractmethod
    def inspect(self, path: Path, options: ReadOptions = DEFAULT_OPTIONS) -> FileInfo:
        """Metadata only (names, shapes, dtypes, attributes, row count); raise ReadError."""

    @abstractmethod
    def open(self, path: Path, options: ReadOptions = DEFAULT_OPTIONS) -> ArrayHandle | TableHandle:
        """Open lazily for range reads; raise ReadError."""


def plain_value(value: Any) -> Any:
    """An attribute value as plain Python (str, int, float, bool or a short list), for
    VariableInfo.attrs: bytes are decoded, numpy scalars unwrapped, long arrays summarised."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.generic):
        return plain_value(value.item())
    if isinstance(value, np.ndarray):
        if value.size == 1:
            return plain_value(value.reshape(()).item())
        if value.size <= 16:
            return [plain_value(v) for v in value.ravel().tolist()]
        return f"<{value.dtype} array {value.shape}>"
    if isinstance(value, (list, tuple)):
        return [plain_value(v) for v in value]
    return value


def attr_text(value: Any) -> str:
    """A global attribute as the string matched by `capsule.match.attrs`."""
    value = plain_value(value)
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def one_line(exc: BaseException) -> str:
    """The message of a library exception on one line (HDF5 and netCDF errors span several)."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
