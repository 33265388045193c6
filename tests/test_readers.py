"""The four format readers: sniffing, metadata-only inspection, range reads, faults."""

from __future__ import annotations

import csv
import gzip
import itertools
import shutil
from datetime import datetime, timezone

import h5py
import netCDF4
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ebm_vae import demo
from ebm_vae.data.readers import READERS, ReadError, read_head, sniff_format
from ebm_vae.data.readers.hdf5 import chunk_cache_bytes
from ebm_vae.data.readers.text import LineRanges

# --------------------------------------------------------------------------- sniffing


def test_sniff_by_magic_and_extension(tmp_path):
    demo.write_fusion_plain(tmp_path / "a.h5", n_time=2, n=4, nz=2)
    demo.write_wafer_netcdf(tmp_path / "b.nc", n_time=2, n=4)
    demo.write_wafer_netcdf(tmp_path / "c.nc", n_time=2, n=4, file_format="NETCDF3_CLASSIC")
    demo.write_grid_parquet(tmp_path / "d.parquet", n_rows=10)
    demo.write_grid_csv(tmp_path / "e.csv", n_rows=10)
    demo.write_png(tmp_path / "f.png")
    demo.write_readme(tmp_path / "g.txt")
    shutil.copy(tmp_path / "d.parquet", tmp_path / "no_extension")
    shutil.copy(tmp_path / "b.nc", tmp_path / "netcdf4_named.h5")  # NetCDF-4 is HDF5
    (tmp_path / "text.h5").write_text("not hdf5\n")
    (tmp_path / "binary.csv").write_bytes(b"\x00\x01\x02PNG")
    (tmp_path / "pmu.log.2").write_text("f=50.0\n")
    (tmp_path / "pmu.log.3.gz").write_bytes(gzip.compress(b"f=50.0\n"))
    (tmp_path / "binary.log").write_bytes(b"\x00\x01\x02")
    expected = {"a.h5": "hdf5", "b.nc": "netcdf", "c.nc": "netcdf", "d.parquet": "parquet",
                "e.csv": "csv", "f.png": None, "g.txt": "log", "no_extension": "parquet",
                "netcdf4_named.h5": "hdf5", "text.h5": "hdf5", "binary.csv": "csv",
                "pmu.log.2": "log", "pmu.log.3.gz": "log", "binary.log": "log"}
    assert {name: sniff_format(tmp_path / name) for name in expected} == expected
    assert READERS["csv"].sniff(read_head(tmp_path / "e.csv"), tmp_path / "e.csv")
    assert not READERS["csv"].sniff(read_head(tmp_path / "binary.csv"), tmp_path / "binary.csv")
    assert not READERS["csv"].sniff(read_head(tmp_path / "g.txt"), tmp_path / "g.txt")


def test_hdf5_signature_behind_a_user_block(tmp_path):
    path = tmp_path / "userblock.dat"
    with h5py.File(path, "w", userblock_size=1024) as f:
        f.attrs["capsule"] = "fusion"
        f["x"] = np.arange(3.0)
    assert read_head(path)[:8] != b"\x89HDF\r\n\x1a\n"
    assert sniff_format(path) == "hdf5"
    assert READERS["hdf5"].inspect(path).attrs == {"capsule": "fusion"}


# --------------------------------------------------------------------------- HDF5


def test_hdf5_inspect_walks_groups(tmp_path):
    path = demo.write_fusion_well(tmp_path / "MHD.h5", n_traj=2, n_time=3, n=8, nz=4)
    info = READERS["hdf5"].inspect(path)
    variables = {v.name: v for v in info.variables}
    field = variables["t1_fields/magnetic_field"]
    assert field.shape == (2, 3, 8, 8, 4, 3) and field.dtype == "float32"
    assert field.attrs["units"] == "T"
    assert variables["dimensions/z"].shape == (4,)
    assert info.n_rows is None and info.format == "hdf5"
    assert all(isinstance(v, str) for v in info.attrs.values())


def test_hdf5_range_read_matches_h5py(tmp_path):
    path = demo.write_fusion_well(tmp_path / "MHD.h5", n_traj=2, n_time=5, n=8, nz=4)
    selection = (1, slice(1, 4), slice(None), slice(None), 2, slice(None))
    with h5py.File(path) as f:
        expected = f["t1_fields/magnetic_field"][selection]
    with READERS["hdf5"].open(path) as handle:
        got = handle.read("t1_fields/magnetic_field", selection)
        assert "t1_fields/magnetic_field" in handle.variables
        assert handle.read("dimensions/z").shape == (4,)
        with pytest.raises(ReadError, match="no dataset"):
            handle.read("nope")
    np.testing.assert_array_equal(got, expected)
    assert got.shape == (3, 8, 8, 3)


def test_chunk_cache_covers_the_chunks_a_read_touches():
    # chunks of 2 snapshots x full plane: reading snapshot 1..2 touches chunk rows 0 and 1
    shape, chunks = (10, 64, 64, 3), (2, 64, 64, 3)
    chunk_bytes = 2 * 64 * 64 * 3 * 4
    assert chunk_cache_bytes(shape, chunks, 4, (slice(1, 3),)) == max(1 << 20, 2 * chunk_bytes)
    big = (100, 512, 512), (10, 512, 512)
    assert chunk_cache_bytes(*big, 4, (slice(0, 20),)) == 2 * 10 * 512 * 512 * 4
    assert chunk_cache_bytes((1000, 512, 512), (10, 512, 512), 4, ()) == 512 << 20  # capped
    assert chunk_cache_bytes(shape, None, 4, ()) == 1 << 20  # contiguous


# --------------------------------------------------------------------------- NetCDF


@pytest.mark.parametrize("file_format", ["NETCDF4", "NETCDF3_CLASSIC"])
def test_netcdf_inspect_and_read(tmp_path, file_format):
    path = demo.write_wafer_netcdf(tmp_path / "wafer.nc", n_time=4, n=6, layered=True,
                                   units="degC", file_format=file_format)
    info = READERS["netcdf"].inspect(path)
    temperature = {v.name: v for v in info.variables}["temperature"]
    assert temperature.shape == (4, 3, 6, 6) and temperature.dims == ("time", "layer", "y", "x")
    assert temperature.attrs["units"] == "degC" and temperature.dtype == "float32"
    assert info.attrs["Conventions"] == "CF-1.8"
    with READERS["netcdf"].open(path) as handle, netCDF4.Dataset(path) as ds:
        got = handle.read("temperature", (slice(1, 3), 0))
        np.testing.assert_array_equal(got, np.asarray(ds["temperature"][1:3, 0]))
        assert got.shape == (2, 6, 6) and not isinstance(got, np.ma.MaskedArray)


def test_netcdf_fill_values_become_nan(tmp_path):
    path = tmp_path / "filled.nc"
    with netCDF4.Dataset(path, "w") as ds:
        ds.createDimension("time", None)
        ds.createDimension("x", 3)
        var = ds.createVariable("surface_temperature", "f4", ("time", "x"), fill_value=-999.0)
        var[0:2] = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
        var[3, 1] = 7.0  # row 2 and the rest of row 3 are never written: fill
        counts = ds.createVariable("count", "i4", ("time",), fill_value=-1)
        counts[0] = 5
    with READERS["netcdf"].open(path) as handle:
        data = handle.read("surface_temperature")
        assert data.shape == (4, 3)
        np.testing.assert_array_equal(np.isnan(data), [[0, 0, 0], [0, 0, 0], [1, 1, 1], [1, 0, 1]])
        assert data[3, 1] == 7.0
        assert handle.read("count")[0] == 5  # integers keep their values (no NaN for ints)


# --------------------------------------------------------------------------- Parquet


def test_parquet_inspect_metadata_and_row_count(tmp_path):
    path = demo.write_grid_parquet(tmp_path / "g.parquet", n_rows=300, buses=3,
                                   metadata={"capsule": "grid"})
    info = READERS["parquet"].inspect(path)
    assert info.n_rows == 300 and info.extent == 300
    assert info.attrs["capsule"] == "grid"
    names = [v.name for v in info.variables]
    assert names[0] == "timestamp" and "frequency_3" in names
    assert all(v.shape == (300,) for v in info.variables)
    assert {v.name: v.dtype for v in info.variables}["timestamp"] == "float64"


def test_parquet_ranges_across_row_groups(tmp_path):
    n = 1000
    table = pa.table({"timestamp": pa.array(np.arange(n) * 1_000_000_000, pa.timestamp("ns")),
                      "frequency": np.arange(n, dtype=np.float64),
                      "bus": pa.array(np.arange(n) % 3, pa.int32())})
    path = tmp_path / "t.parquet"
    pq.write_table(table, path, row_group_size=137)
    rng = np.random.default_rng(0)
    with READERS["parquet"].open(path) as handle:
        assert handle.extent == n and handle.extent_unit == "rows"
        for _ in range(20):
            start, stop = sorted(rng.integers(0, n + 1, 2))
            batches = list(handle.iter_batches(["frequency", "timestamp"], start, stop, batch_rows=50))
            assert all(len(b["frequency"]) <= 50 for b in batches)
            got = np.concatenate([b["frequency"] for b in batches]) if batches else np.array([])
            np.testing.assert_array_equal(got, np.arange(start, stop, dtype=np.float64))
            if batches:
                seconds = np.concatenate([b["timestamp"] for b in batches])
                np.testing.assert_array_equal(seconds, np.arange(start, stop, dtype=np.float64))
        with pytest.raises(ReadError, match="missing columns"):
            next(handle.iter_batches(["nope"]))


def test_parquet_nulls_are_nan(tmp_path):
    path = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"frequency": pa.array([50.0, None, 49.9]),
                             "count": pa.array([1, None, 3], pa.int64())}), path)
    with READERS["parquet"].open(path) as handle:
        (batch,) = handle.iter_batches(["frequency", "count"])
    np.testing.assert_array_equal(np.isnan(batch["frequency"]), [False, True, False])
    np.testing.assert_array_equal(np.isnan(batch["count"]), [False, True, False])


# --------------------------------------------------------------------------- CSV


def _reference_rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_csv_inspect_types_and_row_count(tmp_path):
    path = demo.write_grid_csv(tmp_path / "g.csv", n_rows=123, buses=2)
    info = READERS["csv"].inspect(path)
    assert info.n_rows == 123 and info.extent == path.stat().st_size
    assert [v.name for v in info.variables] == ["timestamp", "frequency_1", "phase_angle_1",
                                                "frequency_2", "phase_angle_2"]
    assert {v.dtype for v in info.variables} == {"float64"}
    assert {v.name: v for v in info.variables}["timestamp"].attrs["units"].startswith("s since 1970")


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
@pytest.mark.parametrize("trailing_newline", [True, False])
def test_csv_random_byte_partitions_read_every_row_once(tmp_path, newline, trailing_newline):
    source = demo.write_grid_csv(tmp_path / "src.csv", n_rows=257, seed=3)
    lines = source.read_text().splitlines()
    path = tmp_path / "g.csv"
    path.write_bytes((newline.join(lines) + (newline if trailing_newline else "")).encode())
    expected = np.array([float(r["frequency"]) for r in _reference_rows(source)])
    size = path.stat().st_size
    rng = np.random.default_rng(1)
    with READERS["csv"].open(path) as handle:
        assert handle.extent == size and handle.extent_unit == "bytes"
        for n_parts in (1, 2, 3, 7, 40, 300):
            cuts = np.unique(np.concatenate([[0, size], rng.integers(0, size, n_parts - 1)]))
            got = []
            for start, stop in zip(cuts[:-1], cuts[1:], strict=True):
                for batch in handle.iter_batches(["frequency"], int(start), int(stop), batch_rows=16):
                    assert len(batch["frequency"]) <= 16
                    got.append(batch["frequency"])
            np.testing.assert_array_equal(np.concatenate(got), expected)


@pytest.mark.parametrize("trailing_newline", [True, False])
def test_line_ranges_give_whole_lines_once_from_reused_buffers(tmp_path, trailing_newline):
    """Blocks hold whole lines (one longer than a block waits for the reads that complete it),
    every line goes to the range its first byte is in, and two ranges read in turns do not
    overwrite each other's blocks (each has its own buffer while it is read)."""
    rng = np.random.default_rng(0)
    lines = [b"x" * int(n) for n in rng.integers(0, 12, 300)] + [b"long" * 20] + [b"tail"]
    data = b"\n".join(lines) + (b"\n" if trailing_newline else b"")
    path = tmp_path / "lines.txt"
    path.write_bytes(data)
    starts = [0, *(i + 1 for i, byte in enumerate(data) if byte == ord("\n") and i + 1 < len(data))]
    with open(path, "rb") as fh:
        ranges = LineRanges(fh.fileno(), len(data))
        for block_bytes in (7, 64, 1 << 16):
            cuts = sorted({0, len(data), *rng.integers(0, len(data), 5).tolist()})
            for start, stop in zip(cuts[:-1], cuts[1:], strict=True):
                got = b"".join(bytes(b) for b in ranges.blocks(start, stop, 0, block_bytes))
                owned = [s for s in starts if start <= s < stop]
                want = data[owned[0] : next((s for s in starts if s >= stop), len(data))] if owned else b""
                assert got == want
            half = starts[len(starts) // 2]
            first, second = ranges.blocks(0, half, 0, block_bytes), ranges.blocks(half, len(data), 0, block_bytes)
            got_first, got_second = [], []
            for a, b in itertools.zip_longest(first, second):  # both views held, then copied
                got_first.append(bytes(a) if a is not None else b"")
                got_second.append(bytes(b) if b is not None else b"")
            assert b"".join(got_first) == data[:half] and b"".join(got_second) == data[half:]


def test_csv_junk_and_timestamps(tmp_path):
    path = tmp_path / "grid_junk.csv"
    path.write_text(
        "timestamp,frequency,phase_angle,station\n"
        "2024-01-01T00:00:00Z,50.01,0.1,north\n"
        "2024-01-01T00:00:01Z,n/a?,0.2,north\n"
        "garbage,49.99,ERR,south\n"
        "2024-01-01T00:00:03Z,,0.4,south\n"
        "too,many,fields,in,this,row\n"
        "2024-01-01T00:00:04Z,+5e1,-.5,east\n"
    )
    info = READERS["csv"].inspect(path)
    assert {v.name: v.dtype for v in info.variables} == {
        "timestamp": "float64", "frequency": "float64", "phase_angle": "float64", "station": "object"}
    with READERS["csv"].open(path) as handle:
        (batch,) = handle.iter_batches(["timestamp", "frequency", "phase_angle", "station"])
    t0 = datetime(2024, 1, 1, tzinfo=timezone.utc).timestamp()
    np.testing.assert_array_equal(batch["timestamp"], [t0, t0 + 1, np.nan, t0 + 3, t0 + 4])
    np.testing.assert_array_equal(batch["frequency"], [50.01, np.nan, 49.99, np.nan, 50.0])
    np.testing.assert_array_equal(batch["phase_angle"], [0.1, 0.2, np.nan, 0.4, -0.5])
    assert list(batch["station"]) == ["north", "north", "south", "south", "east"]


def test_csv_demo_junk_file_reads_without_error(tmp_path):
    path = demo.write_junk_csv(tmp_path / "grid_junk.csv", n_rows=200)
    reference = [r["frequency"] for r in _reference_rows(path)]
    with READERS["csv"].open(path) as handle:
        frequency = np.concatenate([b["frequency"] for b in handle.iter_batches(["frequency"], batch_rows=64)])
    junk = np.array([not r.replace(".", "", 1).isdigit() for r in reference])
    assert junk.any()
    np.testing.assert_array_equal(np.isnan(frequency), junk)


def test_csv_header_only(tmp_path):
    path = tmp_path / "header.csv"
    path.write_text("timestamp,frequency\n")
    info = READERS["csv"].inspect(path)
    assert info.n_rows == 0 and [v.name for v in info.variables] == ["timestamp", "frequency"]
    with READERS["csv"].open(path) as handle:
        assert list(handle.iter_batches(["frequency"])) == []


# --------------------------------------------------------------------------- faults


@pytest.mark.parametrize("fmt", ["hdf5", "netcdf", "parquet", "csv"])
def test_empty_file(tmp_path, fmt):
    path = demo.write_empty(tmp_path / f"empty.{READERS[fmt].extensions[0].lstrip('.')}")
    with pytest.raises(ReadError, match="^empty file$"):
        READERS[fmt].inspect(path)
    with pytest.raises(ReadError, match="^empty file$"):
        READERS[fmt].open(path)


@pytest.mark.parametrize(("fmt", "write", "reason"), [
    ("hdf5", lambda p: demo.write_truncated_hdf5(p.with_suffix(".h5")), r"^truncated HDF5: \d+ of \d+ bytes$"),
    ("hdf5", lambda p: demo.write_readme(p.with_suffix(".h5")), "^not an HDF5 file"),
    ("netcdf", lambda p: demo.write_readme(p.with_suffix(".nc")), "^not a NetCDF file"),
    ("parquet", lambda p: demo.write_corrupt_parquet(p.with_suffix(".parquet")), "^not a Parquet file"),
    ("parquet", lambda p: demo.write_readme(p.with_suffix(".parquet")), "^not a Parquet file"),
    ("csv", lambda p: demo.write_png(p.with_suffix(".csv")), "^not a text CSV"),
])
def test_damaged_files_raise_one_line_read_errors(tmp_path, fmt, write, reason):
    path = write(tmp_path / "bad")
    with pytest.raises(ReadError, match=reason) as caught:
        READERS[fmt].inspect(path)
    assert "\n" not in str(caught.value)
