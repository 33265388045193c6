"""Property-based fuzzing (hypothesis): damaged files through every reader and the crawl, and
random-but-valid tables through the writers, readers and extractors.

A damaged file must give a `ReadError` (or, in the crawl, a row with a one-line `error`),
never another exception, a hang or a silent wrong value: a file cut short is never usable.
Damaged HDF5 files can crash or hang libhdf5 itself (C code, out of Python's reach), so each
example runs in a forked child; a child killed by a signal is accepted only when the crawl,
whose worker processes absorb such crashes, still records the file. Valid tables must read
back the values written (NaN, +-inf and 1e300 included) and give the states the extractor
promises: float32 values (beyond float32: +-inf), phases wrapped to (-pi, pi].
Examples are derandomised: a run is reproducible, and the suite's time bounded.
"""

from __future__ import annotations

import math
import os
import signal
import time
import traceback
from pathlib import Path

import h5py
import netCDF4
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ebm_vae import demo
from ebm_vae.capsules import parse_capsule, visible_capsules
from ebm_vae.config import compose
from ebm_vae.crawl import crawl as crawl_module
from ebm_vae.crawl.crawl import _Rules, identify
from ebm_vae.crawl.scan import FoundFile
from ebm_vae.data.extractors import EXTRACTORS, ExtractError
from ebm_vae.data.extractors.grid import PHASE_LIMIT
from ebm_vae.data.readers import READERS, ReadError
from ebm_vae.data.readers.base import ArrayHandle
from ebm_vae.data.units import WorkUnit, entry_plan, read_unit

FUZZ = settings(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
CHILD_TIMEOUT_S = 30.0

# Small valid files, named so that the crawl assigns them to a capsule; the damage is done to these.
SEED_FILES = {
    "MHD_plain.h5": lambda p: demo.write_fusion_plain(p, n_time=2, n=4, nz=2),
    "MHD_well.h5": lambda p: demo.write_fusion_well(p, n_time=2, n=4, nz=2),
    "wafer.nc": lambda p: demo.write_wafer_netcdf(p, n_time=2, n=4),
    "wafer_classic.nc": lambda p: demo.write_wafer_netcdf(p, n_time=2, n=4, file_format="NETCDF3_CLASSIC"),
    "grid.parquet": lambda p: demo.write_grid_parquet(p, n_rows=30),
    "grid.csv": lambda p: demo.write_grid_csv(p, n_rows=30),
    "grid_no_phase.csv": lambda p: demo.write_grid_csv(p, n_rows=30, with_phase=False),
}


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("seeds")
    return {name: write(folder / name).read_bytes() for name, write in SEED_FILES.items()}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


damage = st.tuples(
    st.sampled_from(sorted(SEED_FILES)),
    st.sampled_from(["cut", "flip", "overwrite", "noise after the magic", "noise"]),
    st.floats(0.0, 1.0),
    st.binary(min_size=1, max_size=256),
)


def damaged(seed: bytes, how: str, where: float, patch: bytes) -> bytes:
    i = int(where * (len(seed) - 1))
    if how == "cut":
        return seed[:i]
    if how == "flip":  # a few flipped bits around one place
        block = bytes(s ^ (p | 1) for s, p in zip(seed[i : i + 4], patch, strict=False))
        return seed[:i] + block + seed[i + len(block) :]
    if how == "overwrite":
        return seed[:i] + patch + seed[i + len(patch) :]
    if how == "noise after the magic":
        return seed[:8] + patch * (1 + i % 16)
    return patch


def in_child(work, timeout: float = CHILD_TIMEOUT_S) -> tuple[str, str]:
    """Run `work()` in a forked child: ("ok", ""), ("error", traceback), ("crash", signal) or ("hang", "")."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        os.close(read_end)
        status, text = 0, b""
        try:
            work()
        except BaseException:
            status, text = 3, traceback.format_exc()[-4000:].encode()
        os.write(write_end, text)
        os._exit(status)
    os.close(write_end)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(read_end)
            return "hang", ""
        time.sleep(0.002)
    with os.fdopen(read_end, "rb") as fh:
        text = fh.read().decode(errors="replace")
    if os.WIFSIGNALED(status):
        return "crash", signal.Signals(os.WTERMSIG(status)).name
    return ("ok", "") if os.WEXITSTATUS(status) == 0 else ("error", text)


def exercise(path: Path) -> None:
    """Every reader on the file: inspect, open, read a corner of every variable or the first rows.
    Raises anything but a ReadError (which must be a one-line reason)."""
    for reader in READERS.values():
        try:
            reader.inspect(path)
            with reader.open(path) as handle:
                if isinstance(handle, ArrayHandle):
                    for name, var in handle.variables.items():
                        handle.read(name, tuple(slice(0, 2) for _ in var.shape))
                else:
                    for _ in handle.iter_batches(list(handle.columns), 0, min(handle.extent, 1 << 16)):
                        pass
        except ReadError as exc:
            assert str(exc) and "\n" not in str(exc), repr(exc)


def crawl_with_pool(folder: Path) -> dict:
    """Crawl `folder` plus a good file with the worker pool (which survives reader crashes): rows by path."""
    demo.write_grid_csv(folder / "grid_good.csv", n_rows=10)
    cfg = compose("crawl", [f"data.root={folder}", f"paths.root={folder.parent / (folder.name + '_out')}",
                            "crawl.workers=2", "crawl.progress=false", "crawl.stats=false"])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(crawl_module, "CHUNK_FILES", 1)  # several chunks: the pool, not the inline path
        rows = {e.path: e for e in crawl_module.crawl(cfg).entries()}
    assert rows["grid_good.csv"].error is None
    return rows


@settings(FUZZ, max_examples=60)
@given(case=damage)
def test_damaged_files_give_read_errors_and_nothing_else(seeds, workdir, case):
    name, how, where, patch = case
    folder = workdir / f"readers_{name}"
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_bytes(damaged(seeds[name], how, where, patch))
    outcome, detail = in_child(lambda: exercise(path))
    assert outcome != "error", detail
    assert outcome != "hang", f"a reader never returned on {name} damaged by {how} at {where}"
    if outcome == "crash":  # libhdf5 / netCDF-C died: the crawl must still record the file
        assert name in crawl_with_pool(folder)


STATE_ERRORS = (ReadError, ExtractError)


def identify_and_read(folder: Path, name: str, how: str) -> None:
    """The crawl's view of one file, then every state of it when the crawl calls it usable."""
    capsules = visible_capsules()
    st_ = (folder / name).stat()
    entry = identify(str(folder), FoundFile(name, st_.st_size, st_.st_mtime_ns),
                     [_Rules.of(c) for c in capsules.values()])
    assert entry.capsule is not None, entry  # the name decides the capsule, damaged or not
    assert entry.error is None or (entry.error and "\n" not in entry.error), entry.error
    if how == "cut" and not name.endswith(".csv"):  # a CSV cut at a line end is a shorter CSV
        assert entry.error is not None, f"{name} cut short was accepted"
    if entry.error is None:
        capsule = capsules[entry.capsule]
        extractor = EXTRACTORS[capsule.extractor](capsule)
        plan = entry_plan(extractor, entry)
        try:
            n = sum(len(s) for s in read_unit(extractor, folder, WorkUnit.whole(entry, plan), 64))
        except STATE_ERRORS:
            return
        if plan.extent and entry.format != "csv":  # rows/snapshots: exactly as planned
            assert n == plan.n_samples


@settings(FUZZ, max_examples=60)
@given(case=damage)
@example(case=("wafer_classic.nc", "cut", 0.9, b"\0"))  # netCDF-C reads the missing part as zeros
@example(case=("grid.parquet", "cut", 0.9, b"\0"))
def test_the_crawl_records_every_damaged_file_and_the_stream_reads_or_refuses_it(seeds, workdir, case):
    name, how, where, patch = case
    folder = workdir / f"crawl_{name}"
    folder.mkdir(exist_ok=True)
    (folder / name).write_bytes(damaged(seeds[name], how, where, patch))
    outcome, detail = in_child(lambda: identify_and_read(folder, name, how))
    assert outcome != "error", detail
    assert outcome != "hang", f"the crawl never returned on {name} damaged by {how} at {where}"
    if outcome == "crash":
        assert crawl_with_pool(folder)[name].error is not None


@settings(FUZZ, max_examples=5)
@given(files=st.lists(st.tuples(st.sampled_from(["MHD_x.h5", "wafer_x.nc", "grid_x.parquet", "grid_x.csv",
                                                 "notes.txt"]), st.binary(max_size=2048)),
                      min_size=1, max_size=6))
def test_a_crawl_of_random_files_completes_with_a_reason_for_each(workdir, files):
    folder = workdir / f"tree_{len(list(workdir.glob('tree_*')))}"
    for i, (name, data) in enumerate(files):
        path = folder / f"{i}_{name}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    rows = crawl_with_pool(folder)
    for i, (name, _) in enumerate(files):
        row = rows[f"{i}_{name}"]
        assert (row.capsule is None) == (name == "notes.txt")  # the name decides, whatever the bytes
        assert row.error is None or (row.error and "\n" not in row.error)
        assert row.error is not None or row.n_samples > 0 or row.capsule is None


# --------------------------------------------------------------------------- valid tables

values = st.floats(allow_nan=True, allow_infinity=True, width=64) | st.sampled_from([1e300, -1e300, 3.5e38, 5e-324])
columns = st.integers(1, 40).flatmap(lambda n: st.tuples(
    arrays(np.float64, n, elements=values), arrays(np.float64, n, elements=values)))


def write_table(path: Path, frequency: np.ndarray, phase: np.ndarray) -> Path:
    if path.suffix == ".csv":
        lines = [f"2024-01-01T00:00:{i % 60:02d},{f!r},{p!r}\n"
                 for i, (f, p) in enumerate(zip(frequency.tolist(), phase.tolist(), strict=True))]
        path.write_text("timestamp,frequency,phase_angle\n" + "".join(lines))
    else:
        pq.write_table(pa.table({"frequency": frequency, "phase_angle": phase}), path)
    return path


def read_columns(path: Path, names: list[str]) -> dict[str, np.ndarray]:
    reader = READERS["csv" if path.suffix == ".csv" else "parquet"]
    with reader.open(path) as handle:
        batches = list(handle.iter_batches(names, 0, handle.extent, batch_rows=7))
    return {n: np.concatenate([b[n] for b in batches]) if batches else np.zeros(0) for n in names}


def expected_phase(p: float) -> float:
    """The extractor's promise for a phase angle, computed another way."""
    if math.isnan(p) or abs(p) >= PHASE_LIMIT:
        return math.copysign(math.inf, p) if not math.isnan(p) else math.nan
    wrapped = math.remainder(p, 2 * math.pi)
    return math.pi if wrapped <= -math.pi else wrapped


@settings(FUZZ, max_examples=40)
@given(data=columns, suffix=st.sampled_from([".csv", ".parquet"]))
def test_tables_read_back_what_was_written_and_give_the_promised_states(workdir, data, suffix):
    frequency, phase = data
    path = write_table(workdir / f"grid_table{suffix}", frequency, phase)
    read = read_columns(path, ["frequency", "phase_angle"])
    np.testing.assert_array_equal(read["frequency"], frequency)  # bit for bit, NaN where NaN
    np.testing.assert_array_equal(read["phase_angle"], phase)

    capsule = visible_capsules()["grid"]
    extractor = EXTRACTORS["grid"](capsule)
    info = READERS[suffix.strip(".")].inspect(path)
    plan = extractor.plan(info)
    assert plan.n_samples == len(frequency)
    with READERS[suffix.strip(".")].open(path) as handle, np.errstate(over="ignore"):
        states = np.concatenate(list(extractor.iter_states(handle, plan, 0, plan.extent, 5)))
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(states[:, 0], frequency.astype(np.float32))
    want = np.array([expected_phase(p) for p in phase])
    got = states[:, 1].astype(np.float64)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(got[np.isinf(want)], want[np.isinf(want)])
    finite = np.isfinite(want)
    assert np.all((got[finite] > -np.pi) & (got[finite] <= np.float32(np.pi)))
    gap = np.abs(np.angle(np.exp(1j * (got[finite] - want[finite]))))  # on the circle: pi == -pi
    assert np.all(gap <= 4e-7 + np.abs(phase[finite]) * 4e-16), (phase[finite], got[finite], want[finite])


SENSORS = parse_capsule({"name": "sensors", "match": {"name": ["*sensor*"]}, "extractor": "table",
                         "variables": ["x0", "x1"], "units": ["m", "s"]})


@settings(FUZZ, max_examples=30)
@given(data=columns, fmt=st.sampled_from(["hdf5", "netcdf", "parquet", "csv"]))
def test_user_capsule_states_are_the_columns_as_float32_in_every_format(workdir, data, fmt):
    x0, x1 = data
    path = workdir / f"sensor_table.{READERS[fmt].extensions[0].lstrip('.')}"
    if fmt == "hdf5":
        with h5py.File(path, "w") as f:
            f["x0"], f["x1"] = x0, x1
    elif fmt == "netcdf":
        with netCDF4.Dataset(path, "w") as ds:
            ds.createDimension("row", len(x0))
            for name, column in (("x0", x0), ("x1", x1)):
                ds.createVariable(name, "f8", ("row",), fill_value=False)[:] = column
    elif fmt == "parquet":
        pq.write_table(pa.table({"x0": x0, "x1": x1}), path)
    else:
        path.write_text("x0,x1\n" + "".join(f"{a!r},{b!r}\n" for a, b in zip(x0.tolist(), x1.tolist(), strict=True)))
    extractor = EXTRACTORS["table"](SENSORS)
    plan = extractor.plan(READERS[fmt].inspect(path))
    with READERS[fmt].open(path) as handle:
        states = np.concatenate(list(extractor.iter_states(handle, plan, 0, plan.extent, 3)))
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(states, np.stack([x0, x1], axis=1).astype(np.float32))
