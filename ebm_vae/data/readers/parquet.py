"""Parquet with `pyarrow.parquet.ParquetFile`: the extent is rows, read a row group at a time.

`ParquetFile.iter_batches` over the row groups that overlap a range keeps memory bounded by
one row group; `pyarrow.dataset.to_batches` does not (arrow#39808). Timestamps come back as
float64 seconds since the epoch (the CSV reader does the same), nulls in numeric columns as NaN.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterator
from itertools import accumulate
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ebm_vae.data.readers.base import (
    DEFAULT_OPTIONS,
    FileInfo,
    Reader,
    ReadError,
    ReadOptions,
    TableHandle,
    VariableInfo,
    one_line,
)

MAGIC = b"PAR1"
# Arrow's own copy of the schema (base64, large); the columns already say what it says.
_SKIPPED_METADATA = {"ARROW:schema"}


def _numpy_dtype(arrow_type: pa.DataType) -> str:
    """The dtype of what `iter_batches` yields for a column of this type."""
    if pa.types.is_timestamp(arrow_type) or pa.types.is_date(arrow_type):
        return "float64"
    if pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type) or pa.types.is_boolean(arrow_type):
        return str(np.dtype(arrow_type.to_pandas_dtype()))
    return "object"


def column_to_numpy(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A column as a 1-D array: timestamps/dates as float64 epoch seconds, nulls in numbers as NaN."""
    kind = column.type
    if pa.types.is_timestamp(kind) or pa.types.is_date(kind):
        if pa.types.is_date(kind):
            column = pc.cast(column, pa.timestamp("s"))
        ticks_per_second = {"s": 1.0, "ms": 1e3, "us": 1e6, "ns": 1e9}[column.type.unit]
        ticks = pc.cast(column, pa.int64()).to_numpy(zero_copy_only=False)
        out = ticks / ticks_per_second  # division: whole seconds stay exact
        if column.null_count:
            out[pc.is_null(column).to_numpy(zero_copy_only=False)] = np.nan
        return out
    if column.null_count and (pa.types.is_integer(kind) or pa.types.is_floating(kind)):
        return pc.fill_null(pc.cast(column, pa.float64()), np.nan).to_numpy(zero_copy_only=False)
    return column.to_numpy(zero_copy_only=False)


def _open(path: Path) -> pq.ParquetFile:
    if os.path.getsize(path) == 0:
        raise ReadError("empty file")
    try:
        # Pages written with CRCs (write_page_checksum) are verified: damage is an error, not values.
        return pq.ParquetFile(path, page_checksum_verification=True)
    except (PermissionError, FileNotFoundError) as exc:  # a Parquet file or not, it cannot be opened
        raise ReadError(f"cannot open: {exc.strerror or one_line(exc)}") from None
    except (pa.ArrowException, OSError, UnicodeDecodeError) as exc:  # undecodable: a damaged footer
        raise ReadError(f"not a Parquet file: {one_line(exc)}") from None


def _describe(pf: pq.ParquetFile) -> tuple[dict[str, str], dict[str, VariableInfo], int]:
    meta = pf.metadata
    attrs = {}
    for key, value in (meta.metadata or {}).items():
        name = key.decode("utf-8", errors="replace")
        if name not in _SKIPPED_METADATA:
            attrs[name] = value.decode("utf-8", errors="replace")
    n_rows = int(meta.num_rows)
    columns = {f.name: VariableInfo(name=f.name, shape=(n_rows,), dtype=_numpy_dtype(f.type),
                                    attrs={"arrow_type": str(f.type)})
               for f in pf.schema_arrow}
    return attrs, columns, n_rows


class ParquetHandle(TableHandle):
    extent_unit = "rows"

    def __init__(self, path: Path):
        self.path = path
        self._file = _open(path)
        self.attrs, self.columns, self.extent = _describe(self._file)
        sizes = [self._file.metadata.row_group(i).num_rows for i in range(self._file.num_row_groups)]
        self._group_starts = [0, *accumulate(sizes)]  # row offset of each row group, then n_rows

    def iter_batches(self, columns: list[str], start: int = 0, stop: int | None = None,
                     batch_rows: int = 65536) -> Iterator[dict[str, np.ndarray]]:
        missing = [c for c in columns if c not in self.columns]
        if missing:
            raise ReadError(f"missing columns {missing}")
        stop = self.extent if stop is None else min(stop, self.extent)
        if start >= stop:
            return
        first = bisect.bisect_right(self._group_starts, start) - 1
        last = bisect.bisect_left(self._group_starts, stop)  # exclusive
        row = self._group_starts[first]
        try:
            batches = self._file.iter_batches(batch_size=batch_rows, row_groups=range(first, last),
                                              columns=list(columns), use_threads=False)
            for batch in batches:
                lo, hi = max(start, row) - row, min(stop, row + batch.num_rows) - row
                row += batch.num_rows
                if hi > lo:
                    part = batch.slice(lo, hi - lo)
                    yield {c: column_to_numpy(part.column(c)) for c in columns}
        except (pa.ArrowException, OSError) as exc:
            raise ReadError(f"corrupt Parquet: {one_line(exc)}") from None

    def close(self) -> None:
        self._file.close()


class ParquetReader(Reader):
    format = "parquet"
    extensions = (".parquet", ".parq", ".pq")
    kind = "table"

    def sniff(self, head: bytes, path: Path) -> bool:
        """`PAR1` opens the file; the closing `PAR1` and footer are checked by `inspect`, so a
        truncated or corrupt Parquet file is still indexed as Parquet, with its error."""
        return head[:4] == MAGIC

    def inspect(self, path: Path, options: ReadOptions = DEFAULT_OPTIONS) -> FileInfo:
        pf = _open(path)
        try:
            attrs, columns, n_rows = _describe(pf)
        finally:
            pf.close()
        return FileInfo(format=self.format, attrs=attrs, variables=list(columns.values()),
                        n_rows=n_rows, extent=n_rows)

    def open(self, path: Path, options: ReadOptions = DEFAULT_OPTIONS) -> ParquetHandle:
        return ParquetHandle(Path(path))
