"""What the line-based readers (CSV, text logs) share: text detection and byte ranges of lines.

A range [start, stop) of a file's bytes owns the lines that *start* inside it, so any
partition of [0, size) reads every line exactly once without a line index. Blocks handed to
the parsers always hold whole lines (the last line of a file may lack its newline).
"""

from __future__ import annotations

import codecs
import os
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ebm_vae.data.readers.base import ReadError, one_line

COUNT_BYTES = 1 << 20  # newline counting and line searches read this much at a time
MAX_BUFFERS = 2  # read buffers kept for reuse per process (`LineRanges.blocks`)
_BUFFERS: list[bytearray] = []
NUMBER_RE = r"^[+-]?(([0-9]+\.?[0-9]*|\.[0-9]+)(e[+-]?[0-9]+)?|nan|inf|infinity)$"
_ASCII_TEXT = bytes(range(32, 127)) + b"\t\n\r\f"


def open_binary(path) -> Any:
    """The file opened for byte-range reads (held by its handle until close()); a ReadError
    with the reason when it cannot be opened."""
    try:
        return open(path, "rb")  # noqa: SIM115 - the caller's handle closes it
    except OSError as exc:
        raise ReadError(f"cannot open: {one_line(exc)}") from None


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


def text_encoding(sample: bytes, what: str) -> str:
    """"utf8" or "latin-1" (8-bit text of older instruments that is not UTF-8); ReadError for
    UTF-16 and binary content. `what` names the format in the message ("CSV", "text log")."""
    if sample[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise ReadError("UTF-16 text is not supported: save the file as UTF-8")
    if is_text(sample):
        return "utf8"
    if is_text(sample.decode("latin-1").encode("utf-8")):  # no NUL or ASCII control bytes
        return "latin-1"
    raise ReadError(f"not a text {what}: binary content")


def parse_numbers(strings: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(float64 values, mask of the strings that are numbers): others become NaN, never a guess.

    `nan`, `inf` and `infinity` are numbers (their rows are counted downstream as non-finite).
    """
    try:  # the usual case, every string a number (or null): one strict cast
        values = pc.cast(strings, pa.float64())
        return (pc.fill_null(values, np.nan).to_numpy(zero_copy_only=False),
                pc.is_valid(values).to_numpy(zero_copy_only=False))
    except pa.ArrowInvalid:
        pass
    trimmed = pc.utf8_trim_whitespace(strings)
    numeric = pc.fill_null(pc.match_substring_regex(trimmed, NUMBER_RE, ignore_case=True), False)
    values = pc.cast(pc.if_else(numeric, trimmed, pa.scalar(None, pa.string())), pa.float64())
    return (pc.fill_null(values, np.nan).to_numpy(zero_copy_only=False),
            numeric.to_numpy(zero_copy_only=False))


def whole_line_blocks(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Consecutive chunks of bytes regrouped into blocks of whole lines (the file's last line
    may lack its newline); a line longer than a chunk waits for the chunks that complete it."""
    carry = b""
    for chunk in chunks:
        buf = carry + chunk if carry else chunk
        cut = buf.rfind(b"\n") + 1
        block, carry = buf[:cut], buf[cut:]
        if block:
            yield block
    if carry:
        yield carry


class LineRanges:
    """Byte ranges of an open file, split at line ends, read with `os.pread` (no shared offset)."""

    def __init__(self, fd: int, size: int):
        self.fd, self.size = fd, size

    def line_start_at_or_after(self, pos: int) -> int:
        """The first line start >= pos (a line starts at 0 or right after a newline)."""
        if pos == 0 or os.pread(self.fd, 1, pos - 1) == b"\n":
            return pos
        return self.newline_at_or_after(pos) + 1

    def newline_at_or_after(self, pos: int) -> int:
        """Offset of the first newline >= pos, or the last byte's offset at the end of file."""
        while pos < self.size:
            block = os.pread(self.fd, 1 << 16, pos)
            hit = block.find(b"\n")
            if hit >= 0:
                return pos + hit
            pos += len(block)
        return self.size - 1

    def blocks(self, start: int, stop: int, first_line: int, block_bytes: int) -> Iterator[memoryview]:
        """Blocks of the whole lines that start in [start, stop) and at or after `first_line`
        (the first data line: a header and the lines above it are never data), at most
        `block_bytes` each unless a line is longer.

        A block is a view of a read buffer that the next block overwrites: use it before asking
        for the next. Buffers are reused across ranges, files and epochs (`_BUFFERS`): a fresh
        bytes object per read had the kernel page in its memory anew every time, a sixth of a
        CSV epoch."""
        stop = min(stop, self.size)
        begin = max(self.line_start_at_or_after(start), first_line)
        if begin >= stop:
            return
        end = self.newline_at_or_after(stop - 1) + 1
        buffer = _BUFFERS.pop() if _BUFFERS else bytearray()
        pos, held = begin, 0  # held: the start of a line the last read cut, at the buffer's front
        try:
            while pos < end:
                want = min(block_bytes, end - pos)
                if len(buffer) < held + want:  # a new, larger buffer (a view may still hold the old)
                    buffer = bytearray(held + want) if not held else buffer[:held] + bytearray(want)
                got = os.preadv(self.fd, [memoryview(buffer)[held : held + want]], pos)
                if not got:  # a file cut short while read ends the range
                    break
                pos += got
                filled = held + got
                cut = filled if pos >= end else buffer.rfind(b"\n", 0, filled) + 1
                if cut:
                    yield memoryview(buffer)[:cut]
                held = filled - cut
                buffer[:held] = buffer[cut:filled]  # same size: allowed while views exist
            if held:
                yield memoryview(buffer)[:held]
        finally:
            if len(_BUFFERS) < MAX_BUFFERS:
                _BUFFERS.append(buffer)

    def count_lines(self, start: int) -> int:
        """Lines from `start` to the end, counting newlines a bounded block at a time."""
        lines, pos, last = 0, start, b"\n"
        while pos < self.size:
            block = os.pread(self.fd, min(COUNT_BYTES, self.size - pos), pos)
            if not block:
                break
            lines += block.count(b"\n")
            last = block[-1:]
            pos += len(block)
        return lines + (last != b"\n")
