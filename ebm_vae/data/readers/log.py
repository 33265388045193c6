"""Text logs (`.log`, `.txt`, rotated `.log.1`, `.log.gz`): one record per line.

How a line parses is the capsule's choice (`ReadOptions`, from its `log:` rule):
- `log_pattern`: a regular expression searched in each line; its named groups are the fields,
  plus an optional `timestamp` group read with `timestamp_format` (strptime; ISO 8601 without).
- no pattern: `key=value` tokens (separated by spaces, commas or semicolons), keys matched
  case-insensitively; other tokens (a device name, a status word) are ignored, and a timestamp
  at the start of the line (ISO 8601, or `timestamp_format`) is the `timestamp` column.
The columns are named as the extractor asks for them (`ReadOptions.log_fields`); in the
key=value mode they are the asked-for keys seen in the file's first lines (a key missing
there is not a column, so e.g. the grid extractor derives a missing phase angle), in the
pattern mode the pattern's groups.

A line is a record when every column (the timestamp aside) is there and a number; any other
non-blank line is skipped and counted (`skipped_rows`), never dropped silently. A timestamp
that does not parse is NaN. Parsing is vectorised with Arrow's RE2 engine
(`pyarrow.compute.extract_regex`): linear in the line whatever the pattern, with no
backtracking, so a hostile pattern cannot hang a read.

The extent is bytes, split at line ends exactly as for CSV (`text.LineRanges`). A gzip log is
read as a stream and cannot be split: its extent is 1, one work unit.
"""

from __future__ import annotations

import gzip
import os
import re
import zlib
from collections.abc import Collection, Iterator
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

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
from ebm_vae.data.readers.csv import TIME_UNITS, epoch_seconds
from ebm_vae.data.readers.parquet import column_to_numpy
from ebm_vae.data.readers.text import (
    LineRanges,
    is_text,
    open_binary,
    parse_numbers,
    text_encoding,
    whole_line_blocks,
)

GZIP_MAGIC = b"\x1f\x8b"
NAME_RE = re.compile(r".*\.(log|txt)(\.\d+)?(\.gz)?$", re.IGNORECASE)
SAMPLE_BYTES = 64 << 10  # the first lines decide the columns (and a log's capsule by content)...
SAMPLE_LINES = 64  # ...at most this many non-blank ones
BLOCK_BYTES = 8 << 20  # bytes parsed per vectorised step
TIMESTAMP = "timestamp"
SEPARATORS = r"\s,;"  # between key=value tokens
ZONE_RE = re.compile(r"(Z|[+-]\d{2}:?\d{2})$")
ISO_TIMESTAMP = r"\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?)?(?:Z|[+-]\d{2}:?\d{2})?"
# strptime directives -> the text they read, for finding a leading timestamp in key=value lines
_DIRECTIVES = {"Y": r"\d{4}", "y": r"\d{2}", "m": r"\d{1,2}", "d": r"\d{1,2}", "H": r"\d{1,2}",
               "I": r"\d{1,2}", "M": r"\d{1,2}", "S": r"\d{1,2}", "f": r"\d{1,9}", "j": r"\d{1,3}",
               "z": r"(?:Z|[+-]\d{2}:?\d{2})", "b": r"[A-Za-z]{3}", "a": r"[A-Za-z]{3}", "p": r"[AaPp][Mm]",
               "%": "%"}


def format_regex(timestamp_format: str) -> str:
    """An RE2 expression for the text a strptime format reads; ValueError for a directive
    it does not know (the key=value mode must find where a timestamp ends)."""
    parts, i = [], 0
    while i < len(timestamp_format):
        char = timestamp_format[i]
        if char != "%":
            parts.append(re.escape(char))
            i += 1
            continue
        directive = timestamp_format[i + 1 : i + 2]
        if directive not in _DIRECTIVES:
            raise ValueError(f"the directive %{directive} is not supported without log.pattern "
                             f"(supported: {' '.join('%' + d for d in _DIRECTIVES)})")
        parts.append(_DIRECTIVES[directive])
        i += 2
    return "".join(parts)


def pattern_groups(pattern: str) -> list[str]:
    """The named groups of a log pattern; ValueError (the one-line reason) when RE2 refuses
    the pattern, a group is unnamed, or none is named."""
    try:
        result = pc.extract_regex(pa.array([""], pa.string()), pattern)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise ValueError(f"{one_line(exc)} (RE2 syntax: named groups (?P<name>...), non-capturing "
                         "(?:...), no backreferences or lookarounds)") from None
    groups = [field.name for field in result.type]
    if not groups:
        raise ValueError("the pattern has no named group (?P<variable>...)")
    return groups


def _text_lines(block: bytes, encoding: str) -> pa.Array:
    """The lines of a block of whole lines, as one Arrow string array (line ends removed)."""
    if encoding != "utf8":
        block = block.decode(encoding).encode("utf-8")
    lines = pc.split_pattern(pa.scalar(block, pa.binary()), b"\n").values
    try:
        lines = lines.cast(pa.string())
    except pa.ArrowInvalid:  # bytes that are not UTF-8 after the sample: replaced, never fatal
        lines = pa.array(block.decode("utf-8", errors="replace").split("\n"), pa.string())
    if b"\r" in block:
        lines = pc.utf8_rtrim(lines, characters="\r")
    return lines


def _blank(lines: pa.Array) -> np.ndarray:
    """Empty or whitespace-only lines: not records, and not counted as skipped."""
    blank = pc.or_(pc.equal(pc.binary_length(lines), 0), pc.utf8_is_space(lines))
    return pc.fill_null(blank, True).to_numpy(zero_copy_only=False)


def read_head(fd: int, path: Path, size: int, compressed: bool) -> tuple[str, bytes]:
    """The encoding and the whole lines of a log's first SAMPLE_BYTES (decompressed)."""
    if size == 0:
        raise ReadError("empty file")
    if compressed:
        head = next(_gzip_chunks(path, SAMPLE_BYTES), b"")[:SAMPLE_BYTES]
        if not head:
            raise ReadError("empty gzip log")
        whole = len(head) < SAMPLE_BYTES
    else:
        head = os.pread(fd, SAMPLE_BYTES, 0)
        whole = len(head) == size
    encoding = text_encoding(head, "log")
    cut = len(head) if whole else head.rfind(b"\n") + 1
    if cut == 0:
        raise ReadError(f"not a text log: no line end in the first {SAMPLE_BYTES} bytes")
    return encoding, head[:cut]


def sample_lines(head: bytes, encoding: str) -> pa.Array:
    """The first SAMPLE_LINES non-blank lines of a log's head."""
    lines = _text_lines(head, encoding)
    return lines.filter(pa.array(~_blank(lines)))[:SAMPLE_LINES]


def _seconds(strings: pa.Array, timestamp_format: str | None) -> np.ndarray:
    """Timestamps as float64 seconds since the epoch (UTC when they give no zone); NaN where
    a string does not parse. Arrow parses whole columns; what it cannot (fractions of a second
    in a format, mixed zones) is parsed one string at a time."""
    if timestamp_format is not None:
        stamps = pc.strptime(strings, format=timestamp_format, unit="ns", error_is_null=True)
        seconds = column_to_numpy(stamps)
        retry = np.flatnonzero(np.isnan(seconds) & pc.is_valid(strings).to_numpy(zero_copy_only=False))
        for i in retry:
            seconds[i] = _strptime_seconds(strings[int(i)].as_py(), timestamp_format)
        return seconds
    first = strings.drop_null()[:1].to_pylist()
    zoned = bool(first) and ZONE_RE.search(first[0].strip()) is not None
    naive, utc = pa.timestamp("ns"), pa.timestamp("ns", tz="UTC")
    for kind in (utc, naive) if zoned else (naive, utc):  # a failed cast costs a whole column
        try:
            return column_to_numpy(pc.cast(strings, kind))
        except pa.ArrowInvalid:
            continue
    return np.array([epoch_seconds(s) for s in strings.to_pylist()], dtype=np.float64)


def _strptime_seconds(text: str, timestamp_format: str) -> float:
    try:
        stamp = datetime.strptime(text.strip(), timestamp_format)
    except ValueError:
        return np.nan
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=timezone.utc)
    return stamp.timestamp()


class LineRule:
    """How the lines of one log parse into columns, fixed from the file's first lines."""

    def __init__(self, options: ReadOptions, sample: pa.Array):
        if not options.log_fields:
            raise ReadError("a text log is read through a capsule's log rule, and none was given")
        self.timestamp_format = options.timestamp_format
        self.pattern = options.log_pattern
        if self.pattern is not None:
            try:
                groups = pattern_groups(self.pattern)
            except ValueError as exc:
                raise ReadError(f"log.pattern: {exc}") from None
            self.fields = {column: group for column, group in options.log_fields if group in groups}
            self.has_timestamp = TIMESTAMP in groups
        else:
            self.key_patterns = {column: f"(?:^|[{SEPARATORS}])(?i:{re.escape(key)})=(?P<v>[^{SEPARATORS}]*)"
                                 for column, key in options.log_fields}
            self.fields = {c: c for c, p in self.key_patterns.items() if self._any(sample, p)}
            stamp = ISO_TIMESTAMP if self.timestamp_format is None else format_regex(self.timestamp_format)
            self.timestamp_pattern = rf"^\s*\[?(?P<v>{stamp})"
            self.has_timestamp = self._any(sample, self.timestamp_pattern)

    @staticmethod
    def _any(lines: pa.Array, pattern: str) -> bool:
        return bool(pc.any(pc.match_substring_regex(lines, pattern)).as_py())

    @property
    def columns(self) -> list[str]:
        return list(self.fields) + ([TIMESTAMP] if self.has_timestamp else [])

    def describe(self) -> str:
        """The rule in words, for error messages."""
        if self.pattern is not None:
            return f"log.pattern {self.pattern!r}"
        return "key=value tokens " + ", ".join(f"{c}=" for c in self.key_patterns)

    def parse(self, lines: pa.Array, wanted: Collection[str] = ()) -> tuple[dict[str, np.ndarray], int, int, str | None]:
        """(the `wanted` columns of the records, records, lines skipped, the first skipped
        line) of some lines. Every field decides whether a line is a record; the timestamp,
        which does not, is parsed only when wanted."""
        blank = _blank(lines)
        found = pc.extract_regex(lines, self.pattern) if self.pattern is not None else None
        good = ~blank if self.fields else np.zeros(len(blank), dtype=bool)  # no field: no record
        values = {}
        for column in self.fields:
            numbers, ok = parse_numbers(self._strings(lines, found, column))
            good &= ok
            if column in wanted:
                values[column] = numbers
        if self.has_timestamp and TIMESTAMP in wanted:
            values[TIMESTAMP] = _seconds(self._strings(lines, found, TIMESTAMP), self.timestamp_format)
        bad = ~blank & ~good
        n_good, n_bad = int(good.sum()), int(bad.sum())
        first_bad = lines[int(np.argmax(bad))].as_py() if n_bad else None
        if n_good < len(good):
            values = {c: v[good] for c, v in values.items()}
        return values, n_good, n_bad, first_bad

    def _strings(self, lines: pa.Array, found: pa.StructArray | None, column: str) -> pa.Array:
        """The text of one column in every line (null where the line lacks it)."""
        if found is not None:
            return pc.struct_field(found, [self.fields.get(column, column)])
        pattern = self.timestamp_pattern if column == TIMESTAMP else self.key_patterns[column]
        return pc.struct_field(pc.extract_regex(lines, pattern), [0])


def _gzip_chunks(path: Path, block_bytes: int) -> Iterator[bytes]:
    try:
        with gzip.open(path, "rb") as stream:
            while chunk := stream.read(block_bytes):
                yield chunk
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise ReadError(f"corrupt gzip log: {one_line(exc)}") from None


class LogHandle(TableHandle):
    """`skipped_rows` counts the non-blank lines that are not records."""

    extent_unit = "bytes"

    def __init__(self, path: Path, options: ReadOptions = DEFAULT_OPTIONS):
        self.path = path
        self._fh = open_binary(path)
        try:
            size = os.fstat(self._fh.fileno()).st_size
            self.compressed = os.pread(self._fh.fileno(), 2, 0) == GZIP_MAGIC
            self.extent = 1 if self.compressed else size
            self._lines = LineRanges(self._fh.fileno(), size)
            self.encoding, head = read_head(self._fh.fileno(), path, size, self.compressed)
            self.rule = LineRule(options, sample_lines(head, self.encoding))
        except ReadError:
            self._fh.close()
            raise
        self.attrs = {}
        self.skipped_rows = 0
        self.first_skipped: str | None = None  # the first line skipped, for error messages
        self.columns = {v.name: v for v in self.describe(-1)}

    def describe(self, n_rows: int) -> list[VariableInfo]:
        return [VariableInfo(name=c, shape=(n_rows,), dtype="float64",
                             attrs={"units": TIME_UNITS} if c == TIMESTAMP else {})
                for c in self.rule.columns]

    def _blocks(self, start: int, stop: int) -> Iterator[bytes]:
        if not self.compressed:
            yield from map(bytes, self._lines.blocks(start, stop, 0, BLOCK_BYTES))  # the parse needs bytes
        elif start <= 0 < stop:  # a stream: the range holding byte 0 reads it all
            yield from whole_line_blocks(_gzip_chunks(self.path, BLOCK_BYTES))

    def _parsed(self, start: int, stop: int, wanted: Collection[str] = ()) -> Iterator[tuple[dict[str, np.ndarray], int]]:
        """(the wanted columns, records) per block of the range; counts the skipped lines."""
        for block in self._blocks(start, stop):
            values, n_good, n_bad, first_bad = self.rule.parse(_text_lines(block, self.encoding), wanted)
            self.skipped_rows += n_bad
            if self.first_skipped is None:
                self.first_skipped = first_bad
            yield values, n_good

    def count_rows(self) -> int:
        """Records in the whole file (parses every line; counts the skipped ones)."""
        return sum(n for _, n in self._parsed(0, self.extent))

    def iter_batches(self, columns: list[str], start: int = 0, stop: int | None = None,
                     batch_rows: int = 65536) -> Iterator[dict[str, np.ndarray]]:
        missing = [c for c in columns if c not in self.columns]
        if missing:
            raise ReadError(f"missing columns {missing}")
        for values, n in self._parsed(start, self.extent if stop is None else stop, columns):
            for i in range(0, n, batch_rows):
                yield {c: values[c][i : i + batch_rows] for c in columns}

    def close(self) -> None:
        self._fh.close()


class LogReader(Reader):
    format = "log"
    extensions = (".log", ".txt")
    kind = "table"
    byte_extent = True

    def named_like(self, path: Path) -> bool:
        return NAME_RE.match(Path(path).name) is not None

    def sniff(self, head: bytes, path: Path) -> bool:
        return self.named_like(path) and (head[:2] == GZIP_MAGIC or is_text(head))

    def inspect(self, path: Path, options: ReadOptions = DEFAULT_OPTIONS) -> FileInfo:
        """Parses every line (the record count and the skipped lines are exact); a log of
        which no line parses is refused with the rule and its first line."""
        with self.open(path, options) as handle:
            n_rows = handle.count_rows()
            if n_rows == 0:
                first, n = handle.first_skipped or "", handle.skipped_rows
                shown = first if len(first) <= 60 else first[:57] + "..."
                raise ReadError(f"no line parses with {handle.rule.describe()} "
                                f"({n} line{'' if n == 1 else 's'}; the first: {shown!r})")
            return FileInfo(format=self.format, attrs={}, variables=handle.describe(n_rows), n_rows=n_rows,
                            extent=handle.extent, skipped_rows=handle.skipped_rows)

    def open(self, path: Path, options: ReadOptions = DEFAULT_OPTIONS) -> LogHandle:
        return LogHandle(Path(path), options)

    def sample_fractions(self, path: Path, candidates: list[ReadOptions]) -> list[float]:
        """For each rule, the fraction of the file's first non-blank lines that parse with it
        (how a log that no capsule's name matches finds its capsule by content). A key=value
        rule none of whose keys the first lines hold is 0 without parsing: most text files on
        a drive are notes, and parsing costs more than the test."""
        path = Path(path)
        try:
            with open(path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                encoding, head = read_head(fh.fileno(), path, size, os.pread(fh.fileno(), 2, 0) == GZIP_MAGIC)
        except OSError as exc:
            raise ReadError(f"cannot open: {one_line(exc)}") from None
        lowered = head.decode(encoding, errors="replace").lower()
        fractions, sample = [], None
        for options in candidates:
            if options.log_pattern is None and not any(f"{key.lower()}=" in lowered for _, key in options.log_fields):
                fractions.append(0.0)
                continue
            sample = sample_lines(head, encoding) if sample is None else sample
            _, n_good, n_bad, _ = LineRule(options, sample).parse(sample)
            fractions.append(n_good / max(1, n_good + n_bad))
        return fractions
