"""CSV with `pyarrow.csv`: the extent is bytes, split at line ends; column types are explicit.

A range [start, stop) of bytes owns the lines that *start* inside it, so any partition of
[0, size) reads every data row exactly once without a row index; the header (the first line)
names the columns and is never a data row. Records are single lines (no quoted newlines).

Types are decided once per file from a sample of its first lines: a column that is mostly
numbers is float64; one of ISO timestamps (or named like a time) is returned as float64
seconds since the epoch (UTC when the file gives no zone); anything else is text. Reads ask
pyarrow for exactly those types; when a block holds junk (`"n/a?"`, `"ERR"`) in a numeric
column that block is re-read as strings and only the values that are not numbers become NaN.
Text is UTF-8 (ASCII included); 8-bit text that is not UTF-8 is read as Latin-1; UTF-16 is refused.
"""

from __future__ import annotations

import codecs
import csv as pycsv
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyarrow import csv as pacsv

from ebm_vae.data.readers.base import (
    FileInfo,
    Reader,
    ReadError,
    TableHandle,
    VariableInfo,
    one_line,
)
from ebm_vae.data.readers.parquet import column_to_numpy

SAMPLE_BYTES = 64 << 10  # the header and the lines that decide the column types...
SAMPLE_LINES = 64  # ...at most this many of them
COUNT_BYTES = 1 << 20  # newline counting reads this much at a time
TIME_NAMES = {"timestamp", "time", "datetime", "date"}
TIME_UNITS = "s since 1970-01-01 UTC"
NUMBER_RE = r"^[+-]?(([0-9]+\.?[0-9]*|\.[0-9]+)(e[+-]?[0-9]+)?|nan|inf|infinity)$"
_ASCII_TEXT = bytes(range(32, 127)) + b"\t\n\r\f"
TIME_TYPES = (pa.timestamp("ns"), pa.timestamp("ns", tz="UTC"))


def is_text(head: bytes) -> bool:
    """Printable ASCII, or valid UTF-8 (the head may end inside a character), without NUL bytes."""
    if not head or b"\x00" in head:
        return False
    other = head.translate(None, _ASCII_TEXT)
    if not other:
        return True
    if any(b < 0x80 for b in other):  # ASCII control characters: binary
        return False
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return False
    return True


def _to_float(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Strings to float64; anything that is not a number becomes NaN."""
    trimmed = pc.utf8_trim_whitespace(column)
    numeric = pc.fill_null(pc.match_substring_regex(trimmed, NUMBER_RE, ignore_case=True), False)
    values = pc.cast(pc.if_else(numeric, trimmed, pa.scalar(None, pa.string())), pa.float64())
    return pc.fill_null(values, np.nan).to_numpy(zero_copy_only=False)


def _epoch_seconds(text: str | None) -> float:
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
    def read(cls, fh: io.BufferedReader, size: int) -> _Layout:
        if size == 0:
            raise ReadError("empty file")
        sample = os.pread(fh.fileno(), SAMPLE_BYTES, 0)
        if sample[:2] in (b"\xff\xfe", b"\xfe\xff"):
            raise ReadError("UTF-16 text is not supported: save the file as UTF-8")
        if is_text(sample):
            encoding = "utf8"
        elif is_text(sample.decode("latin-1").encode("utf-8")):  # no NUL or ASCII control bytes
            encoding = "latin-1"  # decodes any byte: 8-bit text of an older instrument
        else:
            raise ReadError("not a text CSV: binary content")
        newline = sample.find(b"\n")
        if newline < 0 and size > len(sample):
            raise ReadError(f"not a CSV: no line end in the first {SAMPLE_BYTES} bytes")
        header_end = len(sample) if newline < 0 else newline + 1
        header = sample[:header_end].decode("utf-8-sig" if encoding == "utf8" else encoding,
                                            errors="replace").strip("\r\n")
        names = tuple(n.strip() for n in next(pycsv.reader([header]), []))
        if not any(names):
            raise ReadError("not a CSV: empty header line")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ReadError(f"duplicate columns {duplicates}")
        body = sample[header_end : sample.rfind(b"\n") + 1] if newline >= 0 else b""
        lines = body.decode(encoding, errors="replace").splitlines()[:SAMPLE_LINES]
        rows = [r for r in pycsv.reader(lines) if len(r) == len(names)]
        types = {n: _column_type(n, [r[j] for r in rows]) for j, n in enumerate(names)}
        n_lines = max(1, body.count(b"\n"))
        return cls(names, types, header_end, len(body) / n_lines if body else 64.0, encoding)


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


def _parse(block: bytes, names: tuple[str, ...], types: dict[str, pa.DataType],
           columns: list[str] | None = None, encoding: str = "utf8") -> pa.Table:
    """One block of whole data lines; rows with the wrong number of fields are skipped."""
    return pacsv.read_csv(
        pa.py_buffer(block),
        read_options=pacsv.ReadOptions(column_names=list(names), use_threads=False, encoding=encoding),
        parse_options=pacsv.ParseOptions(invalid_row_handler=lambda row: "skip"),
        convert_options=pacsv.ConvertOptions(column_types=types, include_columns=columns or list(names)),
    )


def _count_lines(fh: io.BufferedReader, start: int, size: int) -> int:
    """Data lines from `start` to the end, counting newlines a bounded block at a time."""
    lines, pos, last = 0, start, b"\n"
    while pos < size:
        block = os.pread(fh.fileno(), min(COUNT_BYTES, size - pos), pos)
        if not block:
            break
        lines += block.count(b"\n")
        last = block[-1:]
        pos += len(block)
    return lines + (last != b"\n")


class CsvHandle(TableHandle):
    extent_unit = "bytes"

    def __init__(self, path: Path):
        self.path = path
        try:
            self._fh = open(path, "rb")  # noqa: SIM115 - held until close()
        except OSError as exc:
            raise ReadError(f"cannot open: {one_line(exc)}") from None
        self.extent = os.fstat(self._fh.fileno()).st_size
        try:
            self._layout = _Layout.read(self._fh, self.extent)
        except (ReadError, pa.ArrowException) as exc:
            self._fh.close()
            raise ReadError(str(exc) if isinstance(exc, ReadError) else f"not a CSV: {one_line(exc)}") from None
        self.attrs = {}
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
        return _count_lines(self._fh, self._layout.data_start, self.extent)

    def _line_start_at_or_after(self, pos: int) -> int:
        """The first line start >= pos (a line starts at 0 or right after a newline)."""
        if pos == 0 or os.pread(self._fh.fileno(), 1, pos - 1) == b"\n":
            return pos
        return self._newline_at_or_after(pos) + 1

    def _newline_at_or_after(self, pos: int) -> int:
        """Offset of the first newline >= pos, or the last byte's offset at the end of file."""
        while pos < self.extent:
            block = os.pread(self._fh.fileno(), 1 << 16, pos)
            hit = block.find(b"\n")
            if hit >= 0:
                return pos + hit
            pos += len(block)
        return self.extent - 1

    def _to_numpy(self, block: bytes, columns: list[str]) -> dict[str, np.ndarray]:
        types = {c: self._layout.types[c] for c in columns}
        try:
            table = _parse(block, self._layout.names, types, columns, self._layout.encoding)
            return {c: column_to_numpy(table.column(c)) for c in columns}
        except pa.ArrowInvalid:
            pass  # junk in a typed column: re-read this block as strings
        try:
            table = _parse(block, self._layout.names, {c: pa.string() for c in columns}, columns,
                           self._layout.encoding)
        except pa.ArrowException as exc:
            raise ReadError(f"unparsable CSV block: {one_line(exc)}") from None
        out = {}
        for c in columns:
            strings = table.column(c)
            if types[c] == pa.float64():
                out[c] = _to_float(strings)
            elif pa.types.is_timestamp(types[c]):
                out[c] = np.array([_epoch_seconds(s) for s in strings.to_pylist()], dtype=np.float64)
            else:
                out[c] = strings.to_numpy(zero_copy_only=False)
        return out

    def iter_batches(self, columns: list[str], start: int = 0, stop: int | None = None,
                     batch_rows: int = 65536) -> Iterator[dict[str, np.ndarray]]:
        missing = [c for c in columns if c not in self._layout.types]
        if missing:
            raise ReadError(f"missing columns {missing}")
        stop = self.extent if stop is None else min(stop, self.extent)
        begin = max(self._line_start_at_or_after(start), self._layout.data_start)
        if begin >= stop:
            return
        end = self._newline_at_or_after(stop - 1) + 1
        block_bytes = int(min(64 << 20, max(64 << 10, batch_rows * self._layout.line_bytes)))
        pos, carry = begin, b""
        while pos < end or carry:
            chunk = os.pread(self._fh.fileno(), min(block_bytes, end - pos), pos) if pos < end else b""
            pos = pos + len(chunk) if chunk else end  # a file cut short while read ends the range
            buf = carry + chunk
            cut = len(buf) if pos >= end else buf.rfind(b"\n") + 1
            block, carry = buf[:cut], buf[cut:]
            if not block.strip():
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

    def sniff(self, head: bytes, path: Path) -> bool:
        return Path(path).suffix.lower() in self.extensions and is_text(head)

    def inspect(self, path: Path) -> FileInfo:
        with self.open(path) as handle:
            n_rows = handle.count_rows()
            return FileInfo(format=self.format, attrs={}, variables=handle.describe(n_rows),
                            n_rows=n_rows, extent=handle.extent)

    def open(self, path: Path) -> CsvHandle:
        return CsvHandle(Path(path))
