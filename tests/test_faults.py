"""Bad input at every stage, bad configuration, and the trust boundaries (issue 7).

A bad file gets a one-line reason naming it, the run goes on, and the stage's summary counts
it: at the crawl in the manifest's `error` column and the summary table; at the statistics
pass, the training stream and the histogram export in a warning of that stage's logger
(`ebm_vae.data.stats`, `ebm_vae.data.stream`, `ebm_vae.energy.histogram`), counted in the
statistics' closing warning, `StateStream.skipped` and the map's `skipped_files`. No value
of a bad file (zeros of a truncated file, 1e300, NaN) reaches the statistics, a batch or a map.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import logging
import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import h5py
import netCDF4
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from rich.console import Console

from ebm_vae import EnergyMap, EnergyModel, demo
from ebm_vae.capsules import CapsuleError, visible_capsules
from ebm_vae.config import compose
from ebm_vae.crawl.crawl import crawl, summarize
from ebm_vae.crawl.manifest import read_manifest
from ebm_vae.data.extractors import EXTRACTORS
from ebm_vae.data.stats import Stats, run_stats_pass
from ebm_vae.data.stream import StateStream
from ebm_vae.data.units import make_units
from ebm_vae.energy.grid import GridError
from ebm_vae.energy.mapfile import EnergyMapError
from ebm_vae.energy.model import CheckpointError, load_vae
from ebm_vae.export import export
from ebm_vae.train import train

GRID_HEADER = "timestamp,frequency,phase_angle\n"



def crawl_cfg(data: Path, out: Path, *overrides: str, extra_dirs=None):
    return compose("crawl", [f"data.root={data}", f"paths.root={out}", "crawl.workers=1",
                             "crawl.progress=false", "crawl.n_components=4", *overrides],
                   extra_dirs=extra_dirs)


def noise(n: int, seed: int = 7) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def write_text(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


def rows_of(manifest) -> dict:
    return {e.path: e for e in manifest.entries()}


def messages(caplog, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger and r.levelno >= logging.WARNING]


def write_grid_file(path: Path, k: int, n_rows: int = 40) -> Path:
    """Grid rows whose frequency, 50 + k / 10 + row x 1e-4, tells the file they came from."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = np.arange(n_rows)
    freq, phase = 50.0 + k / 10 + rows * 1e-4, np.sin(rows)
    if path.suffix == ".csv":
        write_text(path, GRID_HEADER + "".join(
            f"2024-01-01T00:{i // 60:02d}:{i % 60:02d},{f!r},{p!r}\n"
            for i, f, p in zip(rows, freq.tolist(), phase.tolist(), strict=True)))
    else:
        pq.write_table(pa.table({"frequency": freq, "phase_angle": phase}), path)
    return path



# --------------------------------------------------------------------------- a tree of bad files

# Grid rows with NaN, Inf and magnitudes beyond float32 (per component: NaN [1, 0], Inf [2, 1]).
EXTREME_ROWS = [(1e300, 0.1), (np.nan, 0.2), (np.inf, 0.3), (50.0, -1e300), (50.01, 0.4)]

# relpath -> the reason the crawl must give (a regular expression)
BAD = {
    "grid/grid_empty.csv": r"^empty file$",
    "grid/grid_empty.parquet": r"^empty file$",
    "grid/grid_truncated.parquet": r"^not a Parquet file: .*magic bytes not found",
    "grid/grid_corrupt.parquet": r"^not a Parquet file",
    "grid/grid_utf16.csv": r"^UTF-16 text is not supported",
    "grid/grid_binary.csv": r"^not a text CSV: binary content$",
    "grid/grid_header_only.csv": r"^no samples$",
    "grid/grid_no_frequency.csv": r"^missing variables \['frequency'\]$",
    "grid/grid_text_frequency.csv": r"^variables \['frequency'\] are not numeric",
    "mhd/MHD_empty.h5": r"^empty file$",
    "mhd/MHD_truncated.h5": r"^truncated HDF5: \d+ of \d+ bytes$",
    "mhd/MHD_corrupt.h5": r"^unreadable HDF5: ",
    "mhd/MHD_no_field.h5": r"^missing variables ",
    "mhd/MHD_wrong_shape.h5": r"^B has shape \(4, 8, 8\), expected \(time, x, y, z, 3\)$",
    "fab/wafer_empty.nc": r"^empty file$",
    "fab/wafer_truncated.nc": r"^unreadable NetCDF: ",
    "fab/wafer_truncated_classic.nc": r"^truncated NetCDF: \d+ of \d+ bytes$",
    "fab/wafer_corrupt.nc": r"NetCDF",
    "fab/wafer_no_temperature.nc": r"^missing variables \['surface_temperature'\]",
    "fab/wafer_wrong_shape.nc": r"^surface_temperature has shape \(3,\)",
    "fab/wafer_no_records.nc": r"^no samples$",
}
GOOD = {
    "grid": ["grid/grid_extreme.csv", "grid/grid_extreme.parquet", "grid/grid_good.csv",
             "grid/grid_good.parquet", "grid/grid_junk.csv", "grid/grid_latin1.csv", "grid/grid_ragged.csv"],
    "fusion": ["mhd/MHD_extreme.h5", "mhd/MHD_good.h5"],
    "wafer": ["fab/wafer_classic.nc", "fab/wafer_good.nc"],
}
CAPSULE_OF_DIR = {"grid": "grid", "mhd": "fusion", "fab": "wafer"}


def write_bad_tree(root: Path) -> None:
    g, f, w = root / "grid", root / "mhd", root / "fab"
    # grid: good, then odd-but-readable, then bad
    demo.write_grid_parquet(g / "grid_good.parquet", n_rows=200)
    demo.write_grid_csv(g / "grid_good.csv", n_rows=200, seed=1)
    demo.write_junk_csv(g / "grid_junk.csv", n_rows=100)  # 5 junk frequencies -> NaN
    write_text(g / "grid_latin1.csv", "timestamp,frequency,phase_angle,Bemerkung (°C)\n"
               "2024-01-01T00:00:00,50.0,0.1,Störung\n2024-01-01T00:00:01,50.1,0.2,größer\n", "latin-1")
    write_text(g / "grid_ragged.csv", GRID_HEADER + "2024-01-01T00:00:00,50.0,0.1\n2024-01-01T00:00:01,50.1\n"
               "2024-01-01T00:00:02,49.9,0.2\n2024-01-01T00:00:03,49.8,0.3,7\n2024-01-01T00:00:04,50.2,0.4\n")
    write_text(g / "grid_extreme.csv", GRID_HEADER + "".join(
        f"2024-01-01T00:00:0{i},{f!r},{p!r}\n" for i, (f, p) in enumerate(EXTREME_ROWS)))
    freq, phase = (np.array(c, dtype=np.float64) for c in zip(*EXTREME_ROWS, strict=True))
    stamps = np.datetime64("2024-01-01", "ms") + np.arange(len(freq)) * np.timedelta64(1, "s")
    pq.write_table(pa.table({"timestamp": stamps, "frequency": freq, "phase_angle": phase}),
                   g / "grid_extreme.parquet")
    demo.write_empty(g / "grid_empty.csv")
    demo.write_empty(g / "grid_empty.parquet")
    path = demo.write_grid_parquet(g / "grid_truncated.parquet", n_rows=200)
    os.truncate(path, path.stat().st_size // 2)
    demo.write_corrupt_parquet(g / "grid_corrupt.parquet")
    write_text(g / "grid_utf16.csv", GRID_HEADER + "2024-01-01T00:00:00,50.0,0.1\n", "utf-16")
    demo.write_png(g / "grid_binary.csv")
    write_text(g / "grid_header_only.csv", GRID_HEADER)
    write_text(g / "grid_no_frequency.csv", "timestamp,voltage\n2024-01-01T00:00:00,230.0\n")
    write_text(g / "grid_text_frequency.csv", GRID_HEADER + "2024-01-01T00:00:00,high,0.1\n"
               "2024-01-01T00:00:01,low,0.2\n")
    # fusion (3 x 8 x 8 states)
    demo.write_fusion_plain(f / "MHD_good.h5", n_time=4, n=8, nz=2)
    field = np.random.default_rng(0).normal(0.0, 0.01, (4, 8, 8, 2, 3)) + [0.0, 0.0, 2.0]
    field[1, 3, 3, :, 0] = 1e300  # beyond float32: becomes inf, counted
    field[2, 4, 4, :, 1] = np.nan
    field[3, 5, 5, :, 2] = -np.inf
    with h5py.File(f / "MHD_extreme.h5", "w") as h5:
        h5["B"] = field
    demo.write_empty(f / "MHD_empty.h5")
    demo.write_truncated_hdf5(f / "MHD_truncated.h5")
    (f / "MHD_corrupt.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + noise(2000))
    with h5py.File(f / "MHD_no_field.h5", "w") as h5:
        h5["density"] = np.ones((4, 8, 8, 2))
    with h5py.File(f / "MHD_wrong_shape.h5", "w") as h5:
        h5["B"] = np.ones((4, 8, 8), np.float32)
    # wafer (1 x 8 x 8 states)
    demo.write_wafer_netcdf(w / "wafer_good.nc", n_time=4, n=8)
    demo.write_wafer_netcdf(w / "wafer_classic.nc", n_time=4, n=8, seed=1, file_format="NETCDF3_CLASSIC")
    demo.write_empty(w / "wafer_empty.nc")
    path = demo.write_wafer_netcdf(w / "wafer_truncated.nc", n_time=4, n=8)
    os.truncate(path, path.stat().st_size // 2)
    # netCDF-C reads the missing half of a classic file as zeros, without an error
    path = demo.write_wafer_netcdf(w / "wafer_truncated_classic.nc", n_time=4, n=8, file_format="NETCDF3_CLASSIC")
    os.truncate(path, path.stat().st_size - 100)
    (w / "wafer_corrupt.nc").write_bytes(b"CDF\x01" + noise(1000))
    for name, dims, variable in (("wafer_no_temperature.nc", ("time",), "other"),
                                 ("wafer_wrong_shape.nc", ("time",), "surface_temperature"),
                                 ("wafer_no_records.nc", ("time", "y", "x"), "surface_temperature")):
        with netCDF4.Dataset(w / name, "w") as ds:
            ds.createDimension("time", None if name == "wafer_no_records.nc" else 3)
            ds.createDimension("y", 8)
            ds.createDimension("x", 8)
            var = ds.createVariable(variable, "f4", dims)
            if name != "wafer_no_records.nc":
                var[:] = np.full(3, 300.0)


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    """The tree of good and bad files above, crawled with statistics: (manifest, cfg, out)."""
    base = tmp_path_factory.mktemp("faulty")
    write_bad_tree(base / "data")
    cfg = crawl_cfg(base / "data", base / "out")
    return crawl(cfg), cfg, base / "out"


@pytest.mark.parametrize("relpath", sorted(BAD))
def test_each_bad_file_gets_a_one_line_reason_at_the_crawl(faulty, relpath):
    row = rows_of(faulty[0])[relpath]
    assert row.capsule == CAPSULE_OF_DIR[relpath.split("/")[0]]  # indexed under its capsule...
    assert row.error is not None and re.search(BAD[relpath], row.error), row.error  # ...with why
    assert "\n" not in row.error and row.n_samples == 0


def test_good_and_odd_files_stay_usable_and_the_summary_counts_the_bad(faulty):
    manifest = faulty[0]
    for capsule, paths in GOOD.items():
        assert [e.path for e in manifest.usable(capsule)] == paths
    text = io.StringIO()
    summarize(manifest, ["fusion", "grid", "wafer"], Console(file=text, width=200))
    for capsule in ("fusion", "grid", "wafer"):
        row = re.search(rf"{capsule}\s*│\s*(\d+)\s*│[^│]*│[^│]*│\s*(\d+)", text.getvalue())
        n_bad = sum(CAPSULE_OF_DIR[p.split("/")[0]] == capsule for p in BAD)
        assert (int(row[1]), int(row[2])) == (len(GOOD[capsule]) + n_bad, n_bad)
    for relpath in sorted(e.path for e in manifest.entries() if e.error)[:10]:
        assert f"error {relpath}: " in text.getvalue()  # the first reasons, one line each


def test_nan_inf_and_absurd_values_are_counted_at_every_stage_and_never_used(faulty):
    manifest, cfg, out = faulty
    grid = Stats.load(out / "index" / "grid" / "stats.json")
    # finite rows: 200 + 200 (good) + 2 (latin-1) + 95 (junk) + 3 (ragged: 2 of 5 rows skipped)
    # + 1 + 1 (extreme csv/parquet); 1e300 overflows float32 into inf and is counted as inf
    assert grid.count == 502
    assert grid.nan_count.tolist() == [5 + 1 + 1, 0] and grid.inf_count.tolist() == [2 + 2, 1 + 1]
    assert 49.0 < grid.min[0] < grid.max[0] < 51.0 and grid.raw_std[0] < 0.5  # nothing leaked in
    assert -np.pi < grid.min[1] < grid.max[1] <= np.float32(np.pi)  # wrapped; -1e300 rad never was
    assert sorted(f["path"] for f in grid.files) == GOOD["grid"]

    fusion = Stats.load(out / "index" / "fusion" / "stats.json")
    assert fusion.count == 4 + 1 and fusion.nan_count.sum() == 1 and fusion.inf_count.sum() == 2
    assert np.abs(fusion.max).max() < 10.0  # tesla: no 1e300 in the moments
    wafer = Stats.load(out / "index" / "wafer" / "stats.json")
    assert wafer.count == 8 and wafer.min.min() > 250.0  # no zeros from the truncated classic file

    extractor = EXTRACTORS["grid"](visible_capsules()["grid"])
    units = make_units(manifest.usable("grid"), extractor, grid.state_info, 64, 1 << 20)
    stream = StateStream(units, extractor, grid.state_info, manifest.root, batch_size=1000, train=False)
    states = np.concatenate(list(stream.iter_share(0, 1, 0, 1)))  # physical units
    assert len(states) == grid.count and np.isfinite(states).all()
    assert stream.dropped == 13 and stream.skipped == {}  # 5 junk + 4 + 4 extreme rows
    assert np.any(np.all(np.isclose(states, [50.1, 0.2], atol=1e-4), axis=1))  # the latin-1 file

    out_map = export(compose("export", [
        "capsule=grid", f"paths.root={out}", "export.method=histogram", "export.resolution=8",
        "export.progress=false", "export.plot=false"]))
    report = EnergyMap.load(out_map).metadata["histogram"]
    assert report["n_total"] == 502 and report["n_nonfinite_dropped"] == 13


CRAWL_WITH_A_READER_THAT_DIES = """
import json, os, signal, sys, time
from ebm_vae.config import compose
from ebm_vae.crawl import crawl as crawl_module

identify = crawl_module.identify

def dies_on_one_file(root, found, rules):  # what libhdf5 2.0 does on some one-byte-damaged files
    if found.relpath == "MHD_bad.h5" and sys.argv[3] == "crash":
        os.kill(os.getpid(), signal.SIGSEGV)
    if found.relpath == "MHD_bad.h5" and sys.argv[3] == "hang":
        time.sleep(3600)
    return identify(root, found, rules)

crawl_module.identify = dies_on_one_file
crawl_module.CHUNK_FILES = int(sys.argv[4])
rows = crawl_module.crawl(compose("crawl", [f"data.root={sys.argv[1]}", f"paths.root={sys.argv[2]}",
                                            "crawl.progress=false", "crawl.stats=false", *sys.argv[5:]]))
print(json.dumps({e.path: e.error for e in rows.entries()}))
"""


def crawl_where_a_reader_dies(tmp_path: Path, how: str, chunk_files: int, *overrides: str,
                              timeout: float = 120) -> dict:
    for k in range(3):
        write_grid_file(tmp_path / "data" / f"grid_{k}.parquet", k)
    demo.write_fusion_plain(tmp_path / "data" / "MHD_bad.h5", n_time=2, n=4, nz=2)
    child = subprocess.Popen([sys.executable, "-c", CRAWL_WITH_A_READER_THAT_DIES, str(tmp_path / "data"),
                              str(tmp_path / "out"), how, str(chunk_files), *overrides],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = child.communicate(timeout=timeout)
    finally:  # the crawl's worker processes too, if any are left
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    assert child.returncode == 0, f"the crawl died (rc {child.returncode}): {stderr[-2000:]}"
    return json.loads(stdout.strip().splitlines()[-1])


def test_a_reader_crash_in_a_crawl_worker_becomes_an_error_row(tmp_path):
    rows = crawl_where_a_reader_dies(tmp_path, "crash", 1, "crawl.workers=2")  # 4 chunks: the pool
    assert rows["MHD_bad.h5"] == "unreadable: the reader crashed on this file"
    assert all(rows[f"grid_{k}.parquet"] is None for k in range(3))


def test_a_reader_crash_in_a_small_crawl_becomes_an_error_row(tmp_path):
    rows = crawl_where_a_reader_dies(tmp_path, "crash", 64)  # default workers, one chunk
    assert rows["MHD_bad.h5"] == "unreadable: the reader crashed on this file"


@pytest.mark.slow
def test_a_reader_that_never_returns_becomes_an_error_row(tmp_path):
    rows = crawl_where_a_reader_dies(tmp_path, "hang", 1, "crawl.workers=2", "crawl.file_timeout_s=5", timeout=60)
    assert rows["MHD_bad.h5"] == "unreadable: the reader did not finish within 5 s"
    assert all(rows[f"grid_{k}.parquet"] is None for k in range(3))


# --------------------------------------------------------------------------- faults after the crawl


@pytest.fixture
def damaged(tmp_path):
    """Crawled grid/fusion files, then damaged the way drives are: one deleted, one grown, one
    touched, and an HDF5 file whose metadata reads but whose compressed data chunk is corrupt."""
    data, out = tmp_path / "data", tmp_path / "out"
    for k, name in enumerate(["grid_0.parquet", "grid_1.parquet", "grid_2.parquet", "grid_3.parquet", "grid_4.csv"]):
        write_grid_file(data / name, k)
    demo.write_fusion_plain(data / "MHD_ok.h5", n_time=4, n=8, nz=2)
    with h5py.File(data / "MHD_bad_chunk.h5", "w") as h5:
        h5.create_dataset("B", data=np.ones((4, 8, 8, 2, 3), np.float32), chunks=(1, 8, 8, 2, 3),
                          compression="gzip")
        offset = h5["B"].id.get_chunk_info(0).byte_offset
    with open(data / "MHD_bad_chunk.h5", "r+b") as fh:
        fh.seek(offset)
        fh.write(noise(64))
    cfg = crawl_cfg(data, out, "crawl.stats=false")
    manifest = crawl(cfg)
    assert {e.path for e in manifest.usable("grid")} | {e.path for e in manifest.usable("fusion")} == {
        *(p.name for p in data.glob("grid_*")), "MHD_ok.h5", "MHD_bad_chunk.h5"}
    (data / "grid_0.parquet").unlink()
    with open(data / "grid_4.csv", "a") as fh:
        fh.write("2024-01-01T01:00:00,51.0,0.5\n")
    st = (data / "grid_1.parquet").stat()
    os.utime(data / "grid_1.parquet", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    return manifest, cfg, data, out


AFTER_CRAWL = {"grid_0.parquet": "No such file", "grid_1.parquet": "changed since the crawl",
               "grid_4.csv": "changed since the crawl"}


def test_files_changed_deleted_or_corrupt_after_the_crawl_are_skipped_at_every_stage(damaged, caplog):
    manifest, cfg, data, out = damaged
    capsules = visible_capsules()
    index = out / "index"
    with caplog.at_level(logging.WARNING):
        grid = run_stats_pass(manifest, capsules["grid"], index, cfg)
        fusion = run_stats_pass(manifest, capsules["fusion"], index, cfg)
    stats_lines = messages(caplog, "ebm_vae.data.stats")
    for path, reason in AFTER_CRAWL.items():
        assert any(m.startswith(f"skipping {path}: ") and reason in m for m in stats_lines), stats_lines
    assert any(m.startswith("skipping MHD_bad_chunk.h5: cannot read B") for m in stats_lines)
    assert "statistics of grid: 3 of 5 usable files skipped (reasons above), 2 counted" in stats_lines
    assert [f["path"] for f in grid.files] == ["grid_2.parquet", "grid_3.parquet"] and grid.count == 80
    assert [f["path"] for f in fusion.files] == ["MHD_ok.h5"] and fusion.count == 4

    caplog.clear()
    extractor = EXTRACTORS["grid"](capsules["grid"])
    units = make_units(manifest.usable("grid"), extractor, grid.state_info, 16, 1 << 20)
    stream = StateStream(units, extractor, grid.state_info, data, batch_size=50, train=False)
    with caplog.at_level(logging.WARNING):
        states = np.concatenate(list(stream.iter_share(0, 1, 0, 1)))  # physical units
    assert set(stream.skipped) == set(AFTER_CRAWL)
    assert all(reason in stream.skipped[path] for path, reason in AFTER_CRAWL.items())
    for path in AFTER_CRAWL:  # once per file, not once per work unit
        assert sum(m.startswith(f"skipping {path}: ") for m in messages(caplog, "ebm_vae.data.stream")) == 1
    assert sorted(set(np.round((states[:, 0] - 50.0) * 10).astype(int))) == [2, 3]  # never mixed in

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        out_map = export(compose("export", [
            "capsule=grid", f"paths.root={out}", "export.method=histogram", "export.resolution=8",
            "export.progress=false", "export.plot=false"]))
    meta = EnergyMap.load(out_map).metadata
    assert {skip["path"] for skip in meta["skipped_files"]} == set(AFTER_CRAWL)
    assert [f["path"] for f in meta["source_files"]] == ["grid_2.parquet", "grid_3.parquet"]
    assert len(messages(caplog, "ebm_vae.energy.histogram")) == 3

    # a re-crawl re-indexes the changed files and forgets the deleted one
    rows = rows_of(crawl(cfg))
    assert "grid_0.parquet" not in rows
    for name in ("grid_1.parquet", "grid_4.csv"):
        st = (data / name).stat()
        assert (rows[name].size, rows[name].mtime_ns, rows[name].error) == (st.st_size, st.st_mtime_ns, None)
    assert rows["grid_4.csv"].n_samples == 41


PERMISSION_SCRIPT = """
import json, logging, sys
from ebm_vae.capsules import visible_capsules
from ebm_vae.config import compose
from ebm_vae.crawl.crawl import crawl
from ebm_vae.crawl.manifest import read_manifest
from ebm_vae.data.stats import run_stats_pass

data, index, out = sys.argv[1:4]
warnings = []
class Keep(logging.Handler):
    def emit(self, record):
        warnings.append([record.name, record.getMessage()])
logging.getLogger().addHandler(Keep())
logging.getLogger().setLevel(logging.WARNING)
cfg = compose("crawl", [f"data.root={data}", f"paths.root={out}", "crawl.workers=1",
                        "crawl.progress=false", "crawl.stats=false"])
crawled = {e.path: e.error for e in crawl(cfg).entries()}
for name in ("grid", "fusion"):  # on the index crawled while the files were readable
    run_stats_pass(read_manifest(index), visible_capsules()[name], out, cfg)
print(json.dumps({"crawl": crawled, "warnings": warnings}))
"""
LOCKED = ["MHD_locked.h5", "grid_locked.csv", "grid_locked.parquet", "wafer_locked.nc"]


def obey_file_modes() -> None:
    """Run in the child before exec: root without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (dropped
    from the bounding set, so the exec'd process lacks them) is refused a mode-000 file like any
    user, while its interpreter under /root stays readable, which dropping to nobody would not."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_files_unreadable_by_permissions_at_crawl_and_statistics(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    write_grid_file(data / "grid_ok.parquet", 0)
    write_grid_file(data / "grid_locked.parquet", 1)
    write_grid_file(data / "grid_locked.csv", 2)
    demo.write_fusion_plain(data / "MHD_ok.h5", n_time=2, n=8, nz=2)
    demo.write_fusion_plain(data / "MHD_locked.h5", n_time=2, n=8, nz=2)
    demo.write_wafer_netcdf(data / "wafer_locked.nc", n_time=2, n=8)
    crawl(crawl_cfg(data, tmp_path / "readable", "crawl.stats=false"))  # the index of readable files
    for name in LOCKED:
        (data / name).chmod(0)
    try:
        done = subprocess.run([sys.executable, "-c", PERMISSION_SCRIPT, str(data),
                               str(tmp_path / "readable" / "index"), str(out)], capture_output=True,
                              text=True, timeout=300, preexec_fn=obey_file_modes if os.geteuid() == 0 else None)
    except subprocess.SubprocessError as exc:
        pytest.skip(f"cannot drop root's file-permission override here: {exc}")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for name in LOCKED:
        assert result["crawl"][name] == "cannot read: Permission denied"
    assert result["crawl"]["grid_ok.parquet"] is None and result["crawl"]["MHD_ok.h5"] is None
    stats_lines = [m for logger, m in result["warnings"] if logger == "ebm_vae.data.stats"]
    for name in ("grid_locked.parquet", "grid_locked.csv", "MHD_locked.h5"):
        line = next(m for m in stats_lines if m.startswith(f"skipping {name}: "))
        assert "Permission denied" in line and "\n" not in line
    assert Stats.load(out / "grid" / "stats.json").files[0]["path"] == "grid_ok.parquet"


# --------------------------------------------------------------------------- configuration (on a trained run)


SENSORS_CAPSULE = """\
name: sensors
match: {name: ["*sensor*"]}
extractor: table
variables: [temperature_c, humidity_pct]
units: [degC, pct]
"""


def snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file and link under the roots, hidden ones included."""
    out = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                st = os.lstat(Path(dirpath, name))
                out[str(Path(dirpath, name))] = (st.st_size, st.st_mtime_ns) if not stat.S_ISDIR(st.st_mode) else (0, 0)
    return out


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory):
    """A grid tree with links leading out of it and a user capsule that matches no file,
    crawled and trained for two steps. The snapshot is taken before anything ran."""
    base = tmp_path_factory.mktemp("grid_run")
    data, outside, conf, out = base / "data", base / "outside", base / "conf", base / "out"
    for k in range(3):
        write_grid_file(data / f"grid_{k}.parquet", k, n_rows=300)
    write_grid_file(outside / "grid_outside.parquet", 9)
    (data / "links").mkdir()
    (data / "links" / "outside_file.parquet").symlink_to(outside / "grid_outside.parquet")
    (data / "links" / "outside_dir").symlink_to(outside, target_is_directory=True)
    (data / "links" / "inside.parquet").symlink_to(data / "grid_0.parquet")
    write_text(conf / "capsule" / "sensors.yaml", SENSORS_CAPSULE)
    before = snapshot(data, outside)
    crawl(crawl_cfg(data, out, extra_dirs=[conf]))
    cfg = compose("train", ["capsule=grid", f"data.root={data}", f"paths.root={out}", "debug=fast",
                            "trainer.max_steps=2", "trainer.enable_progress_bar=false",
                            "trainer.enable_model_summary=false", "data.batch_size=64"], extra_dirs=[conf])
    train(cfg)
    return {"data": data, "outside": outside, "conf": conf, "out": out, "before": before,
            "ckpt": out / "checkpoints" / "grid" / "last.ckpt"}


def export_cfg(run, *overrides: str, capsule: str = "grid"):
    return compose("export", [f"capsule={capsule}", f"paths.root={run['out']}", "export.resolution=8",
                              "export.k=2", "export.progress=false", "export.plot=false", *overrides])


def full_message(exc: BaseException) -> str:
    """The text a user sees: the exception and its causes (Hydra wraps OmegaConf's errors)."""
    parts = []
    while exc is not None:
        parts.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return " | ".join(parts)


@pytest.mark.parametrize(("config", "overrides", "key"), [
    ("train", ["capsule=grid", "data.bogus=1"], "data.bogus"),
    ("train", ["capsule=grid", "data.batch_size=abc"], "data.batch_size"),
    ("crawl", ["crawl.workerz=2"], "crawl.workerz"),
    ("crawl", ["crawl.checkpoint_s=soon"], "crawl.checkpoint_s"),
    ("export", ["capsule=grid", "export.k=many"], "export.k"),
    ("export", ["capsule=grid", "export.resolutoin=64"], "export.resolutoin"),
    ("export", ["capsule=nosuch"], "capsule/nosuch"),
])
def test_unknown_keys_and_wrong_types_fail_at_compose_naming_the_key(config, overrides, key):
    with pytest.raises(Exception) as caught:  # Hydra's or OmegaConf's: the message is what counts
        compose(config, overrides)
    assert key in full_message(caught.value)


@pytest.mark.parametrize(("yaml", "key"), [
    (SENSORS_CAPSULE.replace("match:", "matches:"), "matches"),
    (SENSORS_CAPSULE.replace("variables: [temperature_c, humidity_pct]", "variables: 3"), "variables"),
    (SENSORS_CAPSULE.replace("extractor: table", "extractor: tabel"), "tabel"),
    (SENSORS_CAPSULE.replace("units: [degC, pct]", "units: [degC]"), "units"),
], ids=["unknown key", "wrong type", "unknown extractor", "units of other length"])
def test_a_bad_capsule_file_fails_naming_the_file_and_key(tmp_path, yaml, key):
    path = write_text(tmp_path / "conf" / "capsule" / "sensors.yaml", yaml)
    (tmp_path / "data").mkdir()
    with pytest.raises(CapsuleError) as caught:
        crawl(crawl_cfg(tmp_path / "data", tmp_path / "out", extra_dirs=[tmp_path / "conf"]))
    assert str(path) in str(caught.value) and key in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_a_capsule_with_no_files_fails_at_start_naming_it_and_the_data_root(grid_run):
    cfg = compose("train", ["capsule=sensors", f"data.root={grid_run['data']}",
                            f"paths.root={grid_run['out']}", "debug=fast"], extra_dirs=[grid_run["conf"]])
    with pytest.raises(ValueError, match="capsule 'sensors' has no usable files") as caught:
        train(cfg)
    assert f"data.root={grid_run['data']}" in str(caught.value)
    assert not (grid_run["out"] / "checkpoints" / "sensors").exists()


def test_checkpoints_of_another_capsule_or_version_fail_naming_the_file(grid_run, tmp_path):
    ckpt = grid_run["ckpt"]
    with pytest.raises(ValueError, match=f"{re.escape(str(ckpt))}: a checkpoint of capsule 'grid'"):
        export(export_cfg(grid_run, f"ckpt={ckpt}", capsule="wafer"))
    raw = torch.load(ckpt, weights_only=True)
    other_version = tmp_path / "other_version.ckpt"
    torch.save({**raw, "hyper_parameters": {**raw["hyper_parameters"], "hidden": 7}}, other_version)
    renamed = tmp_path / "renamed_argument.ckpt"  # hyper-parameters of another package version
    torch.save({**raw, "hyper_parameters": {**raw["hyper_parameters"], "n_hidden_layers": 2}}, renamed)
    not_ours = tmp_path / "not_ours.ckpt"
    torch.save({**raw, "hyper_parameters": {"lr": 1e-3}}, not_ours)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(ckpt.read_bytes()[:1000])
    for path, reason in ((other_version, "incompatible VAE checkpoint"), (renamed, "incompatible VAE checkpoint"),
                         (not_ours, "not an ebm-vae VAE checkpoint"),
                         (cut, "not loadable as a checkpoint")):
        with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}: {reason}"):
            export(export_cfg(grid_run, f"ckpt={path}"))


def test_export_limits_outside_the_data_fail_at_start_naming_the_key(grid_run, tmp_path):
    out = tmp_path / "map.npz"
    with pytest.raises(GridError, match=r"export.limits for frequency: \[1000.0, 2000.0\] lies outside the data"):
        export(export_cfg(grid_run, "export.limits=[[1000,2000],[-1,1]]", f"export.out={out}"))
    with pytest.raises(GridError, match=r"export.limits: 1 pairs for 2 axes"):
        export(export_cfg(grid_run, "export.limits=[[49,51]]", f"export.out={out}"))
    assert not out.exists()


# --------------------------------------------------------------------------- trust boundaries


class RunsCode:
    """Unpickling this creates `marker`: proof that a loader ran code from the file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_energy_maps_load_without_unpickling(tmp_path):
    marker = tmp_path / "code_ran"
    axis = np.linspace(0.0, 1.0, 3)
    for key in ("metadata", "energy_map"):
        arrays = {"energy_map": np.zeros((3, 3), np.float32), "axis_0": axis, "axis_1": axis,
                  "metadata": np.array("{}")}
        arrays[key] = np.array([RunsCode(marker)], dtype=object)
        path = tmp_path / f"pickled_{key}.npz"
        np.savez(path, **arrays)
        with pytest.raises(EnergyMapError, match=f"^{re.escape(str(path))}: not a readable energy map"):
            EnergyMap.load(path)
    assert not marker.exists()


def test_checkpoints_load_with_weights_only(grid_run, tmp_path):
    marker = tmp_path / "code_ran"
    raw = torch.load(grid_run["ckpt"], weights_only=True)
    evil = tmp_path / "last.ckpt"
    torch.save({**raw, "callbacks": {"x": RunsCode(marker)}}, evil)
    for load in (load_vae, EnergyModel.from_checkpoint):
        with pytest.raises(CheckpointError, match=f"^{re.escape(str(evil))}: not loadable .*weights_only=True"):
            load(evil)
    with pytest.raises(CheckpointError):
        export(export_cfg(grid_run, f"ckpt={evil}"))
    # resuming training loads it the same way
    cfg = compose("train", ["capsule=grid", f"data.root={grid_run['data']}", f"paths.root={tmp_path}",
                            f"paths.index={grid_run['out'] / 'index'}", "debug=fast", f"ckpt_path={evil}",
                            "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"])
    with pytest.raises(Exception, match="Weights only load failed"):
        train(cfg)
    assert not marker.exists()


def test_capsule_files_cannot_run_code(tmp_path):
    marker = tmp_path / "code_ran"
    payload = f'{{_target_: builtins.open, _args_: ["{marker}", "w"]}}'
    for yaml, key in ((SENSORS_CAPSULE + f"params: {{hook: {payload}}}\n", "params.hook._target_"),
                      (SENSORS_CAPSULE + "_target_: builtins.open\n", "_target_")):
        conf = tmp_path / key
        write_text(conf / "capsule" / "sensors.yaml", yaml)
        with pytest.raises(CapsuleError, match=f"invalid capsule key '{re.escape(key)}'"):
            visible_capsules([conf])
        cfg = compose("train", ["capsule=sensors", f"data.root={tmp_path}", f"paths.root={tmp_path / 'out'}",
                                "debug=fast"], extra_dirs=[conf])
        with pytest.raises(CapsuleError, match="_target_"):  # before anything is instantiated
            train(cfg)
    assert not marker.exists()


def test_the_pipeline_reads_inside_the_data_tree_only_and_never_writes_there(grid_run):
    manifest = read_manifest(grid_run["out"] / "index")
    assert sorted(e.path for e in manifest.entries()) == [
        "grid_0.parquet", "grid_1.parquet", "grid_2.parquet"]  # links out not followed, link in deduplicated
    export(export_cfg(grid_run, "export.plot=true"))
    export(export_cfg(grid_run, "export.method=histogram", f"export.out={grid_run['out']}/hist.npz"))
    assert snapshot(grid_run["data"], grid_run["outside"]) == grid_run["before"]
    assert {p.name for p in grid_run["out"].iterdir()} <= {"checkpoints", "energy_maps", "hist.npz", "index", "logs"}
    assert (grid_run["out"] / "energy_maps" / "grid.png").is_file()
    umask = os.umask(0o022)
    os.umask(umask)
    for output in ("index/manifest.parquet", "index/grid/stats.json", "energy_maps/grid.npz", "hist.npz"):
        mode = stat.S_IMODE((grid_run["out"] / output).stat().st_mode)
        assert mode == 0o666 & ~umask, (output, oct(mode))  # as open() makes files: shareable, not 0600
