"""CSV with `pyarrow.csv`: the extent is bytes, split at line ends; column types are explicit.

A range [start, stop) of bytes owns the lines that *start* inside it, so any partition of
[0, size) reads every data row exactly once without a row index (`text.LineRanges`); the
header (the first line, or the line after `csv.skip_rows` lines such as TMY3's station line)
names the columns and is never a data row. Records are single lines (no quoted newlines).
A "header" that looks like a line of data is refused with that reason. Rows with too few or
too many fields are skipped and counted (`skipped_rows`).

Types are decided once per file from a sample of its first lines: a column that is mostly
numbers is float64; one of ISO timestamps (or named like a time) is returned as float64
seconds since the epoch (UTC when the file gives no zone); anything else is text. Reads ask
pyarrow for exactly those types; when a block holds junk (`"n/a?"`, `"ERR"`) in a numeric
column that block is re-read as strings and only the values that are not numbers become NaN.
Text is UTF-8 (ASCII included); 8-bit text that is not UTF-8 is read as Latin-1; UTF-16 is refused.
"""

from __future__ import annotations

import csv as pycsv
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
from pyarrow import csv as pacsv

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
from ebm_vae.data.readers.parquet import column_to_numpy
from ebm_vae.data.readers.text import LineRanges, is_text, open_binary, parse_numbers, text_encoding

SAMPLE_BYTES = 64 << 10  # the header and the lines that decide the column types...
SAMPLE_LINES = 64  # ...at most this many of them
TIME_NAMES = {"timestamp", "time", "datetime", "date"}
TIME_UNITS = "s since 1970-01-01 UTC"
TIME_TYPES = (pa.timestamp("ns"), pa.timestamp("ns", tz="UTC"))
_NUMBER_START = frozenset("0123456789+-.nNiI ")  # what float() may accept: digits, nan, inf


def epoch_seconds(text: str | None) -> float:
    """ISO 8601 text as seconds since the epoch (UTC when it gives no zone); NaN when it is not."""
    if not text:
        return np.nan
    try:
        stamp = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return np.nan
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=timezone.utc)
    return stamp.timestamp()


@dataclass(frozen=True)
class _Layout:
    """What the first lines of a file say: columns, their types, where data starts."""

    names: tuple[str, ...]
    types: dict[str, pa.DataType]  # float64, a timestamp type, or string
    data_start: int  # byte offset of the first data line
    line_bytes: float  # mean bytes per data line in the sample
    encoding: str = "utf8"  # or "latin-1": 8-bit text that is not UTF-8 (older instruments)

    @classmethod
    def read(cls, lines: LineRanges, skip_rows: int = 0) -> _Layout:
        if lines.size == 0:
            raise ReadError("empty file")
        sample = os.pread(lines.fd, SAMPLE_BYTES, 0)
        encoding = text_encoding(sample, "CSV")
        header_start = 0
        for skipped in range(skip_rows):  # lines above the header (a station line)
            header_start = lines.newline_at_or_after(header_start) + 1
            if header_start >= lines.size:
                raise ReadError(f"csv.skip_rows={skip_rows}: the file has only {skipped + 1} lines")
        if header_start:
            sample = os.pread(lines.fd, SAMPLE_BYTES, header_start)
        newline = sample.find(b"\n")
        if newline < 0 and lines.size - header_start > len(sample):
            raise ReadError(f"not a CSV: no line end in the first {SAMPLE_BYTES} bytes")
        header_end = len(sample) if newline < 0 else newline + 1
        header = sample[:header_end].decode("utf-8-sig" if encoding == "utf8" else encoding,
                                            errors="replace").strip("\r\n")
        names = tuple(n.strip() for n in next(pycsv.reader([header]), []))
        if not any(names):
            raise ReadError("not a CSV: empty header line")
        body = sample[header_end : sample.rfind(b"\n") + 1] if newline >= 0 else b""
        rows = list(pycsv.reader(body.decode(encoding, errors="replace").splitlines()[:SAMPLE_LINES]))
        _check_header(names, rows, header, skip_rows)
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ReadError(f"duplicate columns {duplicates}")
        rows = [r for r in rows if len(r) == len(names)]
        types = {n: _column_type(n, [r[j] for r in rows]) for j, n in enumerate(names)}
        n_lines = max(1, body.count(b"\n"))
        return cls(names, types, header_start + header_end, len(body) / n_lines if body else 64.0, encoding)


def _check_header(names: tuple[str, ...], rows: list[list[str]], header: str, skip_rows: int) -> None:
    """Refuse a "header" that is a line of data: mostly numbers, or some numbers and a field
    count that the lines below it do not have (TMY3's station line above the real header)."""
    filled = [n for n in names if n]
    numbers = sum(1 for n in filled if n[0] in _NUMBER_START and _is_number(n))
    if not numbers:  # the usual header: nothing more to check
        return
    widths = Counter(len(r) for r in rows if any(f.strip() for f in r))
    other_width = bool(widths) and widths.most_common(1)[0][0] != len(names)
    if 2 * numbers >= len(filled) or other_width:
        shown = header if len(header) <= 80 else header[:77] + "..."
        raise ReadError(f"the header looks like data: set csv.skip_rows to the lines above the header "
                        f"(line {skip_rows + 1}: {shown!r})")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _column_type(name: str, values: list[str]) -> pa.DataType:
    """float64 for mostly-number columns, a timestamp type for time columns, else string.

    Decided in Python from the sample lines (cheaper than a pyarrow read for the small files a
    crawl meets by the thousand). A column named like a time (`timestamp`, `time`, ...) holding
    numbers is taken as epoch seconds; holding junk only, it is still a time column.
    """
    filled = [v.strip() for v in values if v.strip()]
    if not filled or 2 * sum(map(_is_number, filled)) >= len(filled):
        return pa.float64()
    stamps = []
    for text in filled:
        try:
            stamps.append(datetime.fromisoformat(text.replace("Z", "+00:00")))
        except ValueError:
            continue
    if stamps and (2 * len(stamps) >= len(filled) or name.lower() in TIME_NAMES):
        return TIME_TYPES[1] if any(s.tzinfo is not None for s in stamps) else TIME_TYPES[0]
    return TIME_TYPES[0] if name.lower() in TIME_NAMES else pa.string()


def _parse(block: bytes | memoryview, names: tuple[str, ...], types: dict[str, pa.DataType],
           columns: list[str] | None = None, encoding: str = "utf8") -> tuple[pa.Table, int]:
    """One block of whole data lines, and how many rows it skipped for a wrong number of fields.

    Parsed as one Arrow block: its columns are then single arrays (`to_numpy` without a copy),
    and the parse measured 10 % faster than in Arrow's default 1 MiB blocks."""
    ragged = 0

    def skip(row: pacsv.InvalidRow) -> str:
        nonlocal ragged
        ragged += 1
        return "skip"

    table = pacsv.read_csv(
        pa.py_buffer(block),
        read_options=pacsv.ReadOptions(column_names=list(names), use_threads=False, encoding=encoding,
                                       block_size=max(1 << 20, len(block) + 1)),
        parse_options=pacsv.ParseOptions(invalid_row_handler=skip),
        convert_options=pacsv.ConvertOptions(column_types=types, include_columns=columns or list(names)),
    )
    return table, ragged


MAX_BLOCK_BYTES = 16 << 20


class CsvHandle(TableHandle):
    """`skipped_rows` counts the rows with too few or too many fields (ragged rows)."""

    extent_unit = "bytes"

    def __init__(self, path: Path, options: ReadOptions = DEFAULT_OPTIONS):
        self.path = path
        self._fh = open_binary(path)
        self.extent = os.fstat(self._fh.fileno()).st_size
        self._lines = LineRanges(self._fh.fileno(), self.extent)
        try:
            self._layout = _Layout.read(self._lines, options.skip_rows)
        except (ReadError, pa.ArrowException) as exc:
            self._fh.close()
            raise ReadError(str(exc) if isinstance(exc, ReadError) else f"not a CSV: {one_line(exc)}") from None
        self.attrs = {}
        self.skipped_rows = 0
        # The row count is known only after counting newlines (inspect does; open does not).
        self.columns = {v.name: v for v in self.describe(-1)}

    def describe(self, n_rows: int) -> list[VariableInfo]:
        variables = []
        for name, kind in self._layout.types.items():
            is_time = pa.types.is_timestamp(kind)
            variables.append(VariableInfo(
                name=name, shape=(n_rows,), dtype="object" if kind == pa.string() else "float64",
                attrs={"units": TIME_UNITS} if is_time else {},
            ))
        return variables

    def count_rows(self) -> int:
        return self._lines.count_lines(self._layout.data_start)

    def _to_numpy(self, block: memoryview, columns: list[str]) -> dict[str, np.ndarray]:
        types = {c: self._layout.types[c] for c in columns}
        try:
            table, ragged = _parse(block, self._layout.names, types, columns, self._layout.encoding)
            self.skipped_rows += ragged
            return {c: column_to_numpy(table.column(c)) for c in columns}
        except pa.ArrowInvalid:
            pass  # junk in a typed column: re-read this block as strings
        try:
            table, ragged = _parse(block, self._layout.names, {c: pa.string() for c in columns}, columns,
                                   self._layout.encoding)
        except pa.ArrowException as exc:
            raise ReadError(f"unparsable CSV block: {one_line(exc)}") from None
        self.skipped_rows += ragged
        out = {}
        for c in columns:
            strings = table.column(c)
            if types[c] == pa.float64():
                out[c] = parse_numbers(strings)[0]
            elif pa.types.is_timestamp(types[c]):
                out[c] = np.array([epoch_seconds(s) for s in strings.to_pylist()], dtype=np.float64)
            else:
                out[c] = strings.to_numpy(zero_copy_only=False)
        return out

    def iter_batches(self, columns: list[str], start: int = 0, stop: int | None = None,
                     batch_rows: int = 65536) -> Iterator[dict[str, np.ndarray]]:
        missing = [c for c in columns if c not in self._layout.types]
        if missing:
            raise ReadError(f"missing columns {missing}")
        stop = self.extent if stop is None else stop
        # at most 16 MiB: the read buffers are kept for reuse (`LineRanges.blocks`), and Arrow
        # parses blocks of 8 MiB as fast as larger ones
        block_bytes = int(min(MAX_BLOCK_BYTES, max(64 << 10, batch_rows * self._layout.line_bytes)))
        for block in self._lines.blocks(start, stop, self._layout.data_start, block_bytes):
            if block[:1].tobytes().isspace() and bytes(block).isspace():  # blank lines only
                continue
            arrays = self._to_numpy(block, columns)
            n = len(arrays[columns[0]]) if columns else 0
            for i in range(0, n, batch_rows):
                yield {c: a[i : i + batch_rows] for c, a in arrays.items()}

    def close(self) -> None:
        self._fh.close()


class CsvReader(Reader):
    format = "csv"
    extensions = (".csv",)
    kind = "table"
    byte_extent = True

    def sniff(self, head: bytes, path: Path) -> bool:
        return Path(path).suffix.lower() in self.extensions and is_text(head)

    def inspect(self, path: Path, options: ReadOptions = DEFAULT_OPTIONS) -> FileInfo:
        with self.open(path, options) as handle:
            n_rows = handle.count_rows()
            return FileInfo(format=self.format, attrs={}, variables=handle.describe(n_rows),
                            n_rows=n_rows, extent=handle.extent)

    def open(self, path: Path, options: ReadOptions = DEFAULT_OPTIONS) -> CsvHandle:
        return CsvHandle(Path(path), options)
