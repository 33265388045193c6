"""The demo writers produce schema-true, physically sensible files; the faults really are faulty."""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import runpy
from pathlib import Path

import h5py
import netCDF4
import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from ebm_vae import demo
from ebm_vae.config import config_dir

ROOT = Path(__file__).resolve().parents[1]


def _name_patterns() -> dict[str, list[str]]:
    """The built-in capsules' file-name patterns, read from their YAML (the crawl's rules)."""
    return {p.stem: list(OmegaConf.load(p).match.name)
            for p in sorted((config_dir() / "capsule").glob("*.yaml"))}


def _capsules_by_name(filename: str, patterns: dict[str, list[str]]) -> list[str]:
    return [c for c, pats in patterns.items()
            if any(fnmatch.fnmatch(filename.lower(), p.lower()) for p in pats)]


def test_fusion_well_layout(tmp_path):
    path = demo.write_fusion_well(tmp_path / "MHD_test.h5", n_traj=2, n_time=3, n=8, nz=4, seed=1)
    with h5py.File(path, "r") as f:
        assert f.attrs["grid_type"] == "cartesian"
        assert f.attrs["n_spatial_dims"] == 3
        assert f.attrs["dataset_name"] == "MHD_8"
        assert {"B0", "Ms", "Ma"} <= set(f.attrs)
        dims = f["dimensions"]
        assert [dims[a].shape for a in ("x", "y", "z", "time")] == [(8,), (8,), (4,), (3,)]
        z = dims["z"][:]
        np.testing.assert_allclose(z, -z[::-1])  # symmetric around the plane z = 0
        field = f["t1_fields/magnetic_field"]
        assert field.shape == (2, 3, 8, 8, 4, 3)
        assert field.dtype == np.float32
        assert field.chunks == (1, 1, 8, 8, 4, 3)
        assert field.attrs["units"] == "T"
        assert f["t1_fields/velocity"].shape == (2, 3, 8, 8, 4, 3)
        assert f["t0_fields/density"].shape == (2, 3, 8, 8, 4)
        assert np.all(f["t0_fields/density"][:] > 0)
        b = field[:]
    # Guide field along z, perturbations of ~10 %, different in every snapshot and trajectory.
    np.testing.assert_allclose(b[..., 2].mean(), demo.GUIDE_FIELD_T, rtol=0.1)
    assert 0.01 < b[..., 0].std() < 0.5
    snapshots = b.reshape(6, -1)
    assert np.all(np.std(snapshots, axis=0) > 0)
    assert not np.allclose(b[0], b[1])


def test_magnetic_field_is_divergence_free(tmp_path):
    path = demo.write_fusion_plain(tmp_path / "plasma.h5", n_time=1, n=48, nz=48, seed=3)
    with h5py.File(path, "r") as f:
        b = f["B"][0].astype(np.float64)
        x, y, z = f["x"][:], f["y"][:], f["z"][:]
    derivatives = [np.gradient(b[..., c], coord, axis=c) for c, coord in enumerate((x, y, z))]
    divergence = sum(derivatives)[2:-2, 2:-2, 2:-2]  # interior: one-sided differences at edges
    typical = np.sqrt(np.mean([np.mean(d[2:-2, 2:-2, 2:-2] ** 2) for d in derivatives]))
    # Central differences leave a few % of truncation error; a non-transverse mode gives O(1).
    assert np.sqrt(np.mean(divergence**2)) < 0.05 * typical


def test_fusion_plain_and_metadata_only(tmp_path):
    plain = demo.write_fusion_plain(tmp_path / "plasma.h5", n_time=5, n=8, nz=4)
    neutral = demo.write_metadata_only_fusion(tmp_path / "run_0007.h5", n=8, nz=4)
    with h5py.File(plain, "r") as f:
        assert f["B"].shape == (5, 8, 8, 4, 3)
        assert f["B"].dtype == np.float32
        assert f["B"].attrs["units"] == "T"
        assert f["B"].chunks == (1, 8, 8, 4, 3)
        assert [f[a].shape for a in ("x", "y", "z", "time")] == [(8,), (8,), (4,), (5,)]
        assert "capsule" not in f.attrs
    with h5py.File(neutral, "r") as f:
        assert f.attrs["capsule"] == "fusion"
        assert f["B"].ndim == 5
    assert _capsules_by_name(neutral.name, _name_patterns()) == []


@pytest.mark.parametrize("layered, units", [(False, "K"), (True, "degC"), (True, "K"), (False, "degC")])
def test_wafer_netcdf(tmp_path, layered, units):
    path = demo.write_wafer_netcdf(tmp_path / "wafer.nc", n_time=6, n=12, layered=layered,
                                   units=units, seed=2)
    with netCDF4.Dataset(path) as ds:
        assert ds.dimensions["time"].isunlimited()
        assert len(ds.dimensions["y"]) == len(ds.dimensions["x"]) == 12
        for coord in ("time", "y", "x"):
            assert coord in ds.variables
        name = "temperature" if layered else "surface_temperature"
        var = ds.variables[name]
        expected_dims = ("time", "layer", "y", "x") if layered else ("time", "y", "x")
        assert var.dimensions == expected_dims
        assert var.units == units
        assert var.chunking()[0] == 1
        values = np.asarray(var[:], dtype=np.float64)
    kelvin = values + (273.15 if units == "degC" else 0.0)
    assert kelvin.min() > 299.0 and kelvin.max() < 450.0
    surface = kelvin[:, 0] if layered else kelvin
    assert surface.max() - surface.min() > 5.0  # heater spots show on the surface
    assert not np.allclose(surface[0], surface[-1])  # heaters switch between snapshots
    if layered:
        assert kelvin[:, -1].max() > kelvin[:, 0].max()  # heat enters at the bottom


def test_wafer_classic_netcdf_with_attrs(tmp_path):
    path = demo.write_wafer_netcdf(tmp_path / "scan.nc", n=8, file_format="NETCDF3_CLASSIC",
                                   attrs={"capsule": "wafer"})
    assert path.read_bytes()[:3] == b"CDF"
    with netCDF4.Dataset(path) as ds:
        assert ds.variables["surface_temperature"].shape == (4, 8, 8)
        assert ds.getncattr("capsule") == "wafer"


def _check_phase(frequency, phase, dt, nominal=50.0):
    assert np.all((phase > -np.pi) & (phase <= np.pi))
    step = demo.wrap_phase(np.diff(phase))
    np.testing.assert_allclose(step, 2 * np.pi * (frequency[1:] - nominal) * dt, atol=1e-5)


def test_grid_csv_one_bus(tmp_path):
    path = demo.write_grid_csv(tmp_path / "grid_frequency_2024_01.csv", n_rows=500, seed=4)
    table = pa_csv.read_csv(path, convert_options=pa_csv.ConvertOptions(
        column_types={"timestamp": pa.string()}))
    assert table.column_names == ["timestamp", "frequency", "phase_angle"]
    stamps = table["timestamp"].to_pylist()
    assert stamps[:2] == ["2024-01-01T00:00:00", "2024-01-01T00:00:01"]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", s) for s in stamps)
    frequency = table["frequency"].to_numpy()
    assert np.all(np.abs(frequency - 50.0) < 0.5)
    assert frequency.std() > 1e-3
    _check_phase(frequency, table["phase_angle"].to_numpy(), dt=1.0)


def test_grid_csv_buses_without_phase_and_subsecond(tmp_path):
    path = demo.write_grid_csv(tmp_path / "g.csv", n_rows=100, buses=2, with_phase=False, dt=0.5,
                               nominal=60.0)
    table = pa_csv.read_csv(path, convert_options=pa_csv.ConvertOptions(
        column_types={"timestamp": pa.string()}))
    assert table.column_names == ["timestamp", "frequency_1", "frequency_2"]
    assert table["timestamp"][1].as_py() == "2024-01-01T00:00:00.500"
    assert abs(np.mean(table["frequency_2"].to_numpy()) - 60.0) < 0.5


def test_grid_parquet_buses_and_row_groups(tmp_path):
    path = demo.write_grid_parquet(tmp_path / "grid.parquet", n_rows=60_000, buses=3, dt=0.1, seed=5,
                                   metadata={"capsule": "grid"})
    parquet = pq.ParquetFile(path)
    assert parquet.num_row_groups > 1
    assert parquet.metadata.metadata[b"capsule"] == b"grid"
    schema = parquet.schema_arrow
    assert schema.names == ["timestamp"] + [f"{v}_{b}" for b in (1, 2, 3)
                                            for v in ("frequency", "phase_angle")]
    assert schema.field("timestamp").type == pa.timestamp("ms")
    table = parquet.read()
    stamps = table["timestamp"].to_numpy()
    assert np.all(np.diff(stamps) == np.timedelta64(100, "ms"))
    for bus in (1, 2, 3):
        _check_phase(table[f"frequency_{bus}"].to_numpy(), table[f"phase_angle_{bus}"].to_numpy(), dt=0.1)
    # Buses share the system-wide deviation, so their frequencies move together.
    assert np.corrcoef(table["frequency_1"].to_numpy(), table["frequency_3"].to_numpy())[0, 1] > 0.5


def test_ou_series_is_stationary_with_the_right_correlation():
    rng = np.random.default_rng(0)
    x = demo._ou_series(rng, 400_000, tau=20.0, sigma=2.0)
    assert abs(x.std() - 2.0) < 0.1
    lag = np.corrcoef(x[:-20], x[20:])[0, 1]
    assert abs(lag - np.exp(-1.0)) < 0.03


def test_fault_files_are_faulty(tmp_path):
    truncated = demo.write_truncated_hdf5(tmp_path / "MHD_partial.h5")
    with pytest.raises(OSError), h5py.File(truncated, "r"):
        pass
    assert truncated.read_bytes()[:8] == b"\x89HDF\r\n\x1a\n"  # still sniffs as HDF5

    corrupt = demo.write_corrupt_parquet(tmp_path / "grid.parquet")
    data = corrupt.read_bytes()
    assert data[:4] == data[-4:] == b"PAR1"
    with pytest.raises((OSError, pa.ArrowException)):
        pq.ParquetFile(corrupt)

    junk = demo.write_junk_csv(tmp_path / "grid_junk.csv", n_rows=100)
    table = pa_csv.read_csv(junk)
    assert table.schema.field("frequency").type == pa.string()
    values = table["frequency"].to_pylist()
    bad = [v for v in values if not re.fullmatch(r"-?\d+(\.\d+)?", v)]
    assert bad and set(bad) <= {"n/a", "ERR", "#VALUE!"}
    assert len(bad) < len(values) // 2
    assert table.schema.field("phase_angle").type == pa.float64()

    assert demo.write_empty(tmp_path / "MHD_empty.h5").stat().st_size == 0


def test_decoys(tmp_path):
    patterns = _name_patterns()
    png = demo.write_png(tmp_path / "IMG_0001.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    readme = demo.write_readme(tmp_path / "README.txt")
    assert readme.read_text().strip()
    log = demo.write_sensor_log(tmp_path / "sensor_log.csv", n_rows=20)
    columns = pa_csv.read_csv(log).column_names
    assert "timestamp" in columns and not {"frequency", "phase_angle"} & set(columns)
    for path in (png, readme, log):
        assert _capsules_by_name(path.name, patterns) == []


def _walk(root: Path) -> dict[str, str]:
    """Relative path -> md5 of every regular file, not following symlinks, hidden dirs included."""
    digests = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = Path(folder) / name
            if not path.is_symlink():
                digests[path.relative_to(root).as_posix()] = hashlib.md5(path.read_bytes()).hexdigest()
    return digests


def test_demo_tree_structure(tmp_path):
    summary = demo.make_demo_tree(tmp_path / "drive", scale=0.01, seed=7, n=8)
    root = Path(summary["root"])
    on_disk = _walk(root)
    assert set(on_disk) == set(summary["files"]) | set(summary["skipped"])
    for rel, entry in summary["files"].items():
        assert (root / rel).stat().st_size == entry["bytes"]
    assert summary["total_files"] == len(summary["files"])
    assert sum(c["files"] for c in summary["capsules"].values()) == summary["total_files"]

    kinds = {entry["kind"] for entry in summary["files"].values()}
    assert {"well", "plain", "surface", "surface_classic", "layered", "one_bus", "three_buses",
            "no_phase", "metadata_only", "truncated", "corrupt", "junk", "empty", "decoy",
            "event_log", "log_by_content"} <= kinds
    assert {"fusion", "wafer", "grid", "none"} == set(summary["capsules"])
    assert max(rel.count("/") for rel in summary["files"]) >= 3  # nested folders

    # Names tell the capsule, except for the metadata-only file, a log known by its lines, and the decoys.
    patterns = _name_patterns()
    for rel, entry in summary["files"].items():
        by_name = _capsules_by_name(Path(rel).name, patterns)
        expected = [] if entry["kind"] in ("metadata_only", "log_by_content", "decoy") else [entry["capsule"]]
        assert by_name == expected, rel

    # Both wafer units and both fusion layouts are present.
    units = set()
    for rel, entry in summary["files"].items():
        if entry["capsule"] == "wafer":
            with netCDF4.Dataset(root / rel) as ds:
                units |= {v.units for v in ds.variables.values() if v.ndim >= 3}
    assert units == {"K", "degC"}

    # The hidden folder holds a file a crawl would otherwise claim.
    assert all(part.startswith(".") for part in (Path(p).parts[0] for p in summary["skipped"]))
    assert _capsules_by_name(Path(summary["skipped"][0]).name, patterns) == ["fusion"]

    if summary["symlinks"]:  # the OS may refuse symlinks; the tree is valid without them
        (link, target), = summary["symlinks"].items()
        assert os.readlink(root / link) == target
        assert (root / link).resolve() == (root / link).parent.parent.resolve()  # a loop


def test_demo_tree_is_deterministic_and_seeded(tmp_path):
    first = demo.make_demo_tree(tmp_path / "a", scale=0.01, seed=1, n=8)
    again = demo.make_demo_tree(tmp_path / "b", scale=0.01, seed=1, n=8)
    demo.make_demo_tree(tmp_path / "c", scale=0.01, seed=2, n=8)
    assert first["files"] == again["files"]
    assert _walk(tmp_path / "a") == _walk(tmp_path / "b")
    changed = {rel for rel, digest in _walk(tmp_path / "a").items()
               if digest != _walk(tmp_path / "c")[rel]}
    assert "grid/2024/grid_frequency_2024_01.csv" in changed


def test_demo_tree_rewrites_in_place(tmp_path):
    first = demo.make_demo_tree(tmp_path, scale=0.01, n=8)
    second = demo.make_demo_tree(tmp_path, scale=0.01, n=8)  # existing loop link and files
    assert first == second


def test_scale_splits_samples_over_files():
    assert demo._split(130, 64) == [44, 43, 43]
    assert demo._split(10, 64) == [10]


def test_many_small_files(tmp_path):
    summary = demo.make_many_small_files(tmp_path, n_files=300, seed=3, per_folder=20)
    assert summary["total_files"] == 300
    on_disk = _walk(tmp_path)
    assert set(on_disk) == set(summary["files"])
    folders = {Path(rel).parent for rel in on_disk}
    assert len(folders) == 15 and all(len(f.parts) == 2 for f in folders)
    assert {"fusion", "wafer", "grid", "none"} == set(summary["capsules"])
    sizes = [entry["bytes"] for entry in summary["files"].values()]
    assert np.median(sizes) < 8_000 and max(sizes) < 64_000
    assert demo.make_many_small_files(tmp_path / "again", n_files=300, seed=3,
                                      per_folder=20)["files"] == summary["files"]


def test_cli_prints_summary(tmp_path, capsys):
    cli = runpy.run_path(str(ROOT / "scripts" / "make_demo_data.py"), run_name="make_demo_data")
    assert cli["main"]([str(tmp_path / "small"), "--many-small", "40", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "40 files" in out and "grid" in out
    assert len(_walk(tmp_path / "small")) == 40
