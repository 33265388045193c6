"""`ebm-vae-query capsule=NAME input=FILE output=FILE`: the energies of many states, streamed.

    ebm-vae-query capsule=grid input=states.parquet output=energies.csv [paths.root=DIR]
                  [k=64] [source=auto|model|map] [chunk_rows=65536] [device=auto]

The input holds states in the capsule's physical units: CSV or Parquet with columns named as
the capsule's state components (full states: the checkpoint answers) or as its map's axes
(points on the map: the map answers), other columns carried along; or `.npy`, N x D, N x
state shape, or N x n_axes. The output (format from its extension) holds the input's columns
plus `energy` (nats) and, from the checkpoint, `energy_std`; a `.npy` output is float64
(N, columns + 1 or 2). Both are streamed `chunk_rows` rows at a time, so memory stays bounded
for inputs larger than memory, and the output is written atomically (nothing on failure).

Keys are typed by `ebm_vae.config.QueryConfig`; defaults in conf/query.yaml. Not a Hydra app
(a query is a lookup: it writes no run folder, and its `capsule=` names a landscape entry, not
a config group). Errors are one line: unknown capsule, wrong columns or shape, a truncated or
unreadable input, a tampered catalogue.
"""

from __future__ import annotations

import json
import logging
import struct
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pyarrow as pa
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ebm_vae.cli import message_of
from ebm_vae.config import PathsConfig, QueryConfig, config_dir
from ebm_vae.data.readers.base import one_line
from ebm_vae.energy.landscape import EnergyLandscape
from ebm_vae.errors import UserError, is_user_error
from ebm_vae.io import atomic_path
from ebm_vae.usage import ArgumentError

log = logging.getLogger(__name__)

TEXT_KEYS = {f.name for f in fields(QueryConfig) if f.type in ("str", str)} | {
    f"paths.{f.name}" for f in fields(PathsConfig)}
FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".npy": "npy"}
# Bytes per CSV (or buffered Parquet) read. Arrow's streaming CSV reader reads ahead up to 32
# blocks in the background (measured with pyarrow 26: ~37 MB held at 1 MB blocks, ~90 MB at
# 4 MB), so this bounds memory.
CSV_BLOCK_BYTES = 2**20


class QueryError(UserError, ValueError):
    """A query that cannot run; the message is one line naming the file and the problem."""


@dataclass
class QueryReport:
    rows: int
    source: str  # "model" or "map"
    output: Path
    seconds: float


# -- inputs: chunks of a table (CSV, Parquet) or an array (.npy) -------------------------


def _format(path: Path, what: str) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise QueryError(f"{what}={path}: unknown format '{path.suffix}'; use .csv, .parquet or .npy")
    return fmt


def _table_chunks(path: Path, fmt: str, chunk_rows: int,
                  numeric: Sequence[str]) -> tuple[list[str], pa.Schema, Iterator[pa.Table]]:
    """(column names, schema, chunks) of a CSV or Parquet file; `numeric` columns read as float64."""
    if fmt == "csv":
        from pyarrow import csv

        try:
            reader = csv.open_csv(path, read_options=csv.ReadOptions(block_size=CSV_BLOCK_BYTES, use_threads=False),
                                  convert_options=csv.ConvertOptions(column_types={c: pa.float64() for c in numeric}))
        except (OSError, pa.ArrowException) as exc:
            raise QueryError(f"{path}: not a readable CSV file: {one_line(exc)}") from None
        return reader.schema.names, reader.schema, (pa.Table.from_batches([b]) for b in reader)
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path, buffer_size=CSV_BLOCK_BYTES)  # buffered reads: one block at a time
    except (OSError, pa.ArrowException) as exc:
        raise QueryError(f"{path}: not a readable Parquet file (truncated or corrupt?): {one_line(exc)}") from None
    schema = parquet.schema_arrow

    def chunks() -> Iterator[pa.Table]:
        # One row group per call: over the whole file, iter_batches held every row group read
        # (measured: 18.5 MB for a 17.7 MB file, pyarrow 26) where this holds one.
        for group in range(parquet.num_row_groups):
            for batch in parquet.iter_batches(batch_size=chunk_rows, row_groups=[group], use_threads=False):
                yield pa.Table.from_batches([batch], schema)

    return schema.names, schema, chunks()


class _NpyInput:
    """An .npy file read `rows` at a time with plain reads (C order), or through a memory map."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with open(path, "rb") as fh:
                version = np.lib.format.read_magic(fh)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                self.shape, self.fortran, self.dtype = read_header(fh)
                self.offset = fh.tell()
        except (OSError, ValueError) as exc:
            raise QueryError(f"{path}: not a readable .npy file: {one_line(exc)}") from None
        if self.dtype.hasobject or self.dtype.kind not in "fiu":
            raise QueryError(f"{path}: holds {self.dtype}, not real numbers")
        if len(self.shape) < 1:
            raise QueryError(f"{path}: holds a single number, not N states")
        self.row_items = int(np.prod(self.shape[1:], dtype=np.int64))
        expected = self.offset + self.shape[0] * self.row_items * self.dtype.itemsize
        if path.stat().st_size < expected:
            raise QueryError(f"{path}: truncated: its header promises {self.shape} ({expected} bytes), "
                             f"the file holds {path.stat().st_size}")

    def chunks(self, rows: int) -> Iterator[tuple[None, np.ndarray]]:
        """(None, block) pairs, as the table inputs give (table, states); one empty block for N = 0."""
        if self.shape[0] == 0:
            yield None, np.empty(self.shape, dtype=self.dtype)
            return
        if self.fortran:  # rows are not contiguous: let the memory map gather them
            array = np.load(self.path, mmap_mode="r", allow_pickle=False)
            for start in range(0, self.shape[0], rows):
                yield None, np.ascontiguousarray(array[start : start + rows])
            return
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            for start in range(0, self.shape[0], rows):
                n = min(rows, self.shape[0] - start)
                data = fh.read(n * self.row_items * self.dtype.itemsize)
                yield None, np.frombuffer(data, dtype=self.dtype).reshape(n, *self.shape[1:])


# -- outputs -----------------------------------------------------------------------------


class _NpyOutput:
    """A float64 (N, C) .npy written row chunk by row chunk: the header's row count is
    reserved at its widest and rewritten, at the same length, when the rows are all in."""

    def __init__(self, path: Path, columns: int):
        self.columns, self.rows = columns, 0
        self.header_bytes = len(self._header(10**18))
        self.fh = open(path, "wb")  # noqa: SIM115 - closed by close(), after the last chunk
        self.fh.write(self._header(0))

    def _header(self, rows: int) -> bytes:
        text = f"{{'descr': '<f8', 'fortran_order': False, 'shape': ({rows}, {self.columns}), }}"
        used = 10 + len(text) + 1  # magic, version, length; the closing newline
        pad = (-used) % 64 if not hasattr(self, "header_bytes") else self.header_bytes - used
        text += " " * pad + "\n"
        return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode("latin1")

    def write(self, table: pa.Table | None, states: np.ndarray, extra: list[np.ndarray]) -> None:
        block = np.column_stack([states.reshape(len(states), -1), *extra])
        self.fh.write(np.ascontiguousarray(block, dtype="<f8").tobytes())
        self.rows += len(block)

    def close(self) -> None:
        self.fh.seek(0)
        self.fh.write(self._header(self.rows))
        self.fh.close()


class _TableOutput:
    """CSV or Parquet: the input's columns (or, for .npy inputs, the states' names) plus energies."""

    def __init__(self, path: Path, fmt: str, schema: pa.Schema):
        if fmt == "csv":
            from pyarrow import csv

            self.writer = csv.CSVWriter(path, schema)
        else:
            import pyarrow.parquet as pq

            self.writer = pq.ParquetWriter(path, schema)

    @staticmethod
    def table(table: pa.Table | None, states: np.ndarray, extra: list[np.ndarray], columns: Sequence[str]) -> pa.Table:
        if table is None:  # an .npy input: columns named as the states were read
            flat = states.reshape(len(states), -1)
            table = pa.table({name: flat[:, j] for j, name in enumerate(columns)})
        for name, values in zip(("energy", "energy_std"), extra, strict=False):
            table = table.append_column(name, pa.array(values, pa.float64()))
        return table

    def write(self, table: pa.Table) -> None:
        self.writer.write_table(table)

    def close(self) -> None:
        self.writer.close()


# -- the query ----------------------------------------------------------------------------


def _columns_for(landscape: EnergyLandscape, capsule: str, names: Sequence[str], path: Path) -> list[str]:
    """The input columns that hold the states: every state component, or every map axis."""
    entry = landscape.entry(capsule)
    state_names, axis_names = list(entry.state_info.names), entry.axis_names
    if "energy" in names or "energy_std" in names:
        raise QueryError(f"{path}: already has a column 'energy' or 'energy_std'; rename it")
    present = set(names)
    if all(n in present for n in state_names):
        return state_names
    if all(n in present for n in axis_names):
        return axis_names
    missing = [n for n in state_names if n not in present]
    shown = ", ".join(state_names[:4]) + (f", ... ({len(state_names)} in all)" if len(state_names) > 4 else "")
    listed = ", ".join(missing[:4]) + (", ..." if len(missing) > 4 else "")
    raise QueryError(f"{path}: its columns hold neither capsule '{capsule}''s state components "
                     f"[{shown}] (missing {listed}) nor its map axes [{', '.join(axis_names)}]")


def _states_of(table: pa.Table, columns: Sequence[str], path: Path) -> np.ndarray:
    out = np.empty((table.num_rows, len(columns)), dtype=np.float64)
    for i, name in enumerate(columns):
        column = table.column(name)
        if not (pa.types.is_floating(column.type) or pa.types.is_integer(column.type)):
            raise QueryError(f"{path}: column '{name}' holds {column.type}, not numbers")
        out[:, i] = column.to_numpy(zero_copy_only=False)
    return out


def _input_chunks(landscape: EnergyLandscape, cfg, path: Path, fmt: str) -> Iterator[tuple[pa.Table | None, np.ndarray]]:
    """(the chunk's table, or None for .npy; its states) a chunk at a time; at least one chunk
    (empty for an empty input), so that the output gets its columns."""
    entry = landscape.entry(cfg.capsule)
    if fmt == "npy":
        array = _NpyInput(path)
        landscape.source_for(cfg.capsule, array.shape, cfg.source)  # shape errors before any work
        yield from array.chunks(cfg.chunk_rows)
        return
    numeric = list(dict.fromkeys([*entry.state_info.names, *entry.axis_names]))
    names, schema, chunks = _table_chunks(path, fmt, cfg.chunk_rows, numeric)
    columns = _columns_for(landscape, cfg.capsule, names, path)
    rows = 0
    try:
        for table in _rechunk(chunks, cfg.chunk_rows, schema):
            yield table, _states_of(table, columns, path)
            rows += table.num_rows
    except (OSError, pa.ArrowException) as exc:
        raise QueryError(f"{path}: unreadable after row {rows:,}: {one_line(exc)}") from None


def _rechunk(tables: Iterator[pa.Table], rows: int, schema: pa.Schema) -> Iterator[pa.Table]:
    """Tables of exactly `rows` rows (the last one fewer, or empty for an empty input), whatever
    the reader's blocks or row groups: chunk i is then the same rows in every format, and its
    seed (seed + i) makes the model's energies reproducible across formats."""
    pending, count, given = [], 0, False
    for table in tables:
        pending.append(table)
        count += table.num_rows
        while count >= rows:
            whole = pa.concat_tables(pending)
            yield whole.slice(0, rows)
            given = True
            pending, count = [whole.slice(rows)], count - rows
    if count or not given:
        yield pa.concat_tables(pending) if pending else schema.empty_table()


def query(cfg) -> QueryReport:
    """Stream `cfg.input` through the landscape's capsule into `cfg.output`; see the module docstring."""
    from rich.progress import Progress, TextColumn, TimeElapsedColumn

    started = time.perf_counter()
    source_path, target = Path(cfg.input), Path(cfg.output)
    in_fmt, out_fmt = _format(source_path, "input"), _format(target, "output")
    if not source_path.is_file():
        raise QueryError(f"input={source_path}: no such file")
    if source_path.resolve() == target.resolve():
        raise QueryError(f"output={target} is the input: write the energies elsewhere")
    if cfg.chunk_rows < 1:
        raise QueryError(f"chunk_rows must be >= 1, got {cfg.chunk_rows}")
    landscape = EnergyLandscape.open(cfg.paths.energy_maps, root=cfg.paths.root,
                                     device=None if cfg.device == "auto" else cfg.device)
    landscape.entry(cfg.capsule)  # an unknown capsule fails before the input is opened
    rows, source, writer = 0, "", None
    columns = (TextColumn("query {task.description}"), TextColumn("{task.completed:,} rows"), TimeElapsedColumn())
    with atomic_path(target) as tmp, Progress(*columns, disable=not cfg.progress, transient=True) as progress:
        task = progress.add_task(cfg.capsule)
        try:
            for i, (table, states) in enumerate(_input_chunks(landscape, cfg, source_path, in_fmt)):
                result = landscape.energy(cfg.capsule, states, source=cfg.source, k=cfg.k, seed=cfg.seed + i)
                source = result.source
                extra = [result.energy] + ([result.energy_std] if result.energy_std is not None else [])
                if out_fmt == "npy":
                    writer = writer or _NpyOutput(tmp, int(np.prod(states.shape[1:])) + len(extra))
                    writer.write(table, states, extra)
                else:
                    out = _TableOutput.table(table, states, extra, result.columns)
                    writer = writer or _TableOutput(tmp, out_fmt, out.schema)
                    writer.write(out)
                rows += len(states)
                progress.update(task, advance=len(states))
        finally:
            if writer is not None:
                writer.close()
    return QueryReport(rows, source, target, time.perf_counter() - started)


def load_config(argv: Sequence[str]):
    """The query config: QueryConfig's types, conf/query.yaml's defaults, then `key=value` args."""
    bad = [a for a in argv if "=" not in a or a.startswith(("-", "+", "~"))]
    if bad:
        raise ArgumentError(f"'{bad[0]}' is not a setting: settings are KEY=VALUE, e.g. "
                            "capsule=grid input=states.csv output=energies.csv (see ebm-vae-query --help)")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(QueryConfig), OmegaConf.load(config_dir() / "query.yaml"),
                              OmegaConf.from_dotlist([_literal(a) for a in argv]))
        missing = sorted(k for k in ("capsule", "input", "output") if OmegaConf.is_missing(cfg, k))
        if missing:
            raise QueryError(f"missing {', '.join(f'{k}=...' for k in missing)}: "
                             "ebm-vae-query capsule=NAME input=FILE output=FILE")
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        key, message = getattr(exc, "full_key", None), str(exc).strip().splitlines()[0]
        raise QueryError(f"invalid key '{key}': {message}" if key else message) from None
    if cfg.source not in ("auto", "model", "map"):
        raise QueryError(f"source must be auto, model or map, got '{cfg.source}'")
    return cfg


def _literal(arg: str) -> str:
    """`key=value` with the value of a text key quoted: `input=1e6` names a file, not a float."""
    key, value = arg.split("=", 1)
    return f"{key}={json.dumps(value)}" if key in TEXT_KEYS else arg


def main(argv: Sequence[str] | None = None) -> int:
    """The console script: 0 when done, 1 on an error (one line), 2 on a command line that is not KEY=VALUE."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return 0
    debug = "--debug" in args  # a traceback instead of the one line, as for the other scripts
    args = [a for a in args if a != "--debug"]
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = query(load_config(args))
    except ArgumentError as exc:
        print(f"ebm-vae-query: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if debug or not is_user_error(exc):
            raise
        print(f"ebm-vae-query: error: {message_of(exc)}", file=sys.stderr)
        return 1
    print(f"{report.output}: {report.rows:,} rows, energies from the {report.source}, "
          f"in {report.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
