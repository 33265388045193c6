"""Each extractor on each layout it reads: values against a direct read, units, the derived phase."""

from __future__ import annotations

import h5py
import netCDF4
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ebm_vae import demo
from ebm_vae.capsules import parse_capsule, visible_capsules
from ebm_vae.data.extractors import EXTRACTORS, ExtractError
from ebm_vae.data.extractors.base import flat_states
from ebm_vae.data.extractors.grid import wrap_phase
from ebm_vae.data.readers import READERS

FORMAT = {".h5": "hdf5", ".nc": "netcdf", ".csv": "csv", ".parquet": "parquet"}


def extractor(name: str, **params):
    capsule = visible_capsules()[name]
    capsule.params.update(params)
    return EXTRACTORS[capsule.extractor](capsule)


def plan_of(ex, path):
    return ex.plan(READERS[FORMAT[path.suffix]].inspect(path))


def states(ex, path, chunk=3, start=0, stop=None):
    reader = READERS[FORMAT[path.suffix]]
    plan = ex.plan(reader.inspect(path))
    with reader.open(path) as handle:
        parts = list(ex.iter_states(handle, plan, start, plan.extent if stop is None else stop, chunk))
    # one state per row: (n, D), or (n, *shape) in any memory layout
    assert all(p.dtype == np.float32 and p.shape[1:] in ((plan.state.dim,), plan.state.shape) for p in parts)
    return plan, np.concatenate([flat_states(p) for p in parts])


# ------------------------------------------------------------------------------------ fusion

def test_fusion_well_reads_the_plane_nearest_z0_across_trajectories(tmp_path):
    path = demo.write_fusion_well(tmp_path / "MHD.h5", n_traj=2, n_time=3, n=8, nz=5)
    plan, x = states(extractor("fusion"), path, chunk=2, start=1, stop=5)
    assert (plan.n_samples, plan.extent, plan.state.shape) == (6, 6, (3, 8, 8))
    assert plan.state.names[:2] == ("Bx[0,0]", "Bx[0,1]") and plan.state.units[0] == "T"
    with h5py.File(path) as f:
        iz = int(np.argmin(np.abs(f["dimensions/z"][:])))
        assert f["dimensions/z"][iz] == 0.0  # nz = 5: a plane at z = 0 exists
        field = f["t1_fields/magnetic_field"][:, :, :, :, iz, :].reshape(6, 8, 8, 3)
    expected = np.moveaxis(field, -1, 1).reshape(6, -1)[1:5]
    np.testing.assert_array_equal(x, expected)


def test_fusion_plain_without_z_uses_the_middle_plane_and_converts_gauss(tmp_path):
    rng = np.random.default_rng(0)
    volume = rng.normal(size=(4, 6, 4, 5, 3)).astype(np.float32)
    path = tmp_path / "plasma.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("B", data=volume).attrs["units"] = "G"
    plan, x = states(extractor("fusion"), path)
    assert plan.state.shape == (3, 6, 4)  # H, W in the file's x, y order
    expected = np.moveaxis(volume[:, :, :, 5 // 2, :], -1, 1).reshape(4, -1) * np.float32(1e-4)
    np.testing.assert_allclose(x, expected, rtol=1e-6)


def test_fusion_pooling_averages_windows(tmp_path):
    path = demo.write_fusion_plain(tmp_path / "plasma.h5", n_time=2, n=8, nz=4)
    _, full = states(extractor("fusion"), path)
    plan, pooled = states(extractor("fusion", pool=2), path)
    assert plan.state.shape == (3, 4, 4)
    expected = full.reshape(2, 3, 4, 2, 4, 2).mean(axis=(3, 5)).reshape(2, -1)
    np.testing.assert_allclose(pooled, expected, rtol=1e-5)


@pytest.mark.parametrize("datasets, message", [
    ({"velocity": (4, 8, 8, 8, 3)}, "missing variables ['t1_fields/magnetic_field']"),
    ({"B": (4, 8, 8, 8)}, "expected (time, x, y, z, 3)"),
])
def test_fusion_plan_names_what_is_wrong(tmp_path, datasets, message):
    path = tmp_path / "MHD.h5"
    with h5py.File(path, "w") as f:
        for name, shape in datasets.items():
            f.create_dataset(name, shape, "f4")
    with pytest.raises(ExtractError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        plan_of(extractor("fusion"), path)


def test_fusion_unknown_units_are_an_error(tmp_path):
    path = tmp_path / "MHD.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("B", (2, 4, 4, 4, 3), "f4").attrs["units"] = "furlongs"
    with pytest.raises(ExtractError, match="unknown magnetic field units 'furlongs'"):
        plan_of(extractor("fusion"), path)


# ------------------------------------------------------------------------------------- wafer

def test_wafer_surface_in_kelvin(tmp_path):
    path = demo.write_wafer_netcdf(tmp_path / "wafer.nc", n_time=5, n=8)
    plan, x = states(extractor("wafer"), path, chunk=2)
    assert (plan.n_samples, plan.state.shape, plan.state.channel_units) == (5, (1, 8, 8), ("K",))
    with netCDF4.Dataset(path) as ds:
        np.testing.assert_array_equal(x, ds["surface_temperature"][:].reshape(5, -1))


def test_wafer_layer_in_degc_becomes_kelvin(tmp_path):
    path = demo.write_wafer_netcdf(tmp_path / "wafer.nc", n_time=3, n=8, layered=True, units="degC")
    _, x = states(extractor("wafer", layer=1), path)
    with netCDF4.Dataset(path) as ds:
        celsius = ds["temperature"][:, 1].reshape(3, -1)
    np.testing.assert_allclose(x, celsius + 273.15, rtol=1e-6)
    assert x.min() > 250.0


def test_wafer_hdf5_in_fahrenheit_with_pooling(tmp_path):
    rng = np.random.default_rng(1)
    fahrenheit = rng.uniform(50, 200, size=(3, 4, 6)).astype(np.float32)
    path = tmp_path / "thermal.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("surface_temperature", data=fahrenheit).attrs["units"] = "degF"
    plan, x = states(extractor("wafer", pool=2), path)
    assert plan.state.shape == (1, 2, 3)
    kelvin = (fahrenheit.astype(np.float64) - 32) * 5 / 9 + 273.15
    np.testing.assert_allclose(x, kelvin.reshape(3, 2, 2, 3, 2).mean(axis=(2, 4)).reshape(3, -1), rtol=1e-5)


def test_wafer_layer_out_of_range(tmp_path):
    path = demo.write_wafer_netcdf(tmp_path / "wafer.nc", layered=True, n_layers=2)
    with pytest.raises(ExtractError, match="params.layer 5 out of range"):
        plan_of(extractor("wafer", layer=5), path)


# -------------------------------------------------------------------------------------- grid

def test_grid_per_bus_and_joint_states(tmp_path):
    path = demo.write_grid_csv(tmp_path / "grid.csv", n_rows=50, buses=2)
    table = READERS["csv"].open(path)
    with table:
        cols = next(table.iter_batches(["frequency_1", "phase_angle_1", "frequency_2", "phase_angle_2"]))
    plan, per_bus = states(extractor("grid"), path, chunk=7)
    assert plan.n_samples == 100 and plan.state.names == ("frequency", "phase_angle")
    expected = np.stack([cols["frequency_1"], cols["phase_angle_1"], cols["frequency_2"],
                         cols["phase_angle_2"]], axis=1).astype(np.float32)
    np.testing.assert_allclose(per_bus, expected.reshape(100, 2), rtol=1e-6)
    plan, joint = states(extractor("grid", per_bus=False), path, chunk=7)
    assert plan.n_samples == 50
    assert plan.state.names == ("frequency_1", "phase_angle_1", "frequency_2", "phase_angle_2")
    assert plan.state.units == ("Hz", "rad", "Hz", "rad")
    np.testing.assert_allclose(joint, expected, rtol=1e-6)


def trapezoid_phase(t: np.ndarray, f: np.ndarray, nominal: float) -> np.ndarray:
    steps = 0.5 * ((f[1:] - nominal) + (f[:-1] - nominal)) * np.diff(t)
    return wrap_phase(2 * np.pi * np.concatenate([[0.0], np.cumsum(steps)]))


@pytest.mark.parametrize("chunk", [1000, 7])  # one batch, and many batches (the carry)
def test_grid_derived_phase_is_the_integrated_frequency(tmp_path, chunk):
    n = 400
    ms = (1.7e12 + np.cumsum(np.random.default_rng(0).uniform(500, 1500, n))).astype("int64")  # uneven
    f = 50 + 0.05 * np.sin(np.arange(n) / 15)
    path = tmp_path / "frequency.parquet"
    pq.write_table(pa.table({"timestamp": pa.array(ms, pa.timestamp("ms")),
                             "frequency": f}), path, row_group_size=64)
    plan, x = states(extractor("grid"), path, chunk=chunk)
    assert plan.whole_file
    expected = trapezoid_phase(ms / 1e3, f, 50.0)
    np.testing.assert_allclose(x[:, 0], f.astype(np.float32))
    difference = wrap_phase(x[:, 1].astype(np.float64) - expected)
    assert np.abs(difference).max() < 1e-5
    assert x[0, 1] == 0.0 and np.abs(x[:, 1]).max() > 1.0  # the phase actually moves


def test_grid_derived_phase_per_bus_from_csv_with_nominal_60(tmp_path):
    path = demo.write_grid_csv(tmp_path / "grid.csv", n_rows=300, buses=2, with_phase=False,
                               nominal=60.0, dt=0.5)
    plan, x = states(extractor("grid", nominal_frequency=60.0, per_bus=False), path, chunk=50)
    assert plan.whole_file and plan.state.shape == (4,)
    with READERS["csv"].open(path) as table:
        cols = next(table.iter_batches(["timestamp", "frequency_1", "frequency_2"], batch_rows=1000))
    for bus, column in ((0, "frequency_1"), (1, "frequency_2")):
        expected = trapezoid_phase(cols["timestamp"], cols[column], 60.0)
        assert np.abs(wrap_phase(x[:, 2 * bus + 1] - expected)).max() < 1e-5


def test_grid_whole_file_plan_refuses_a_partial_range(tmp_path):
    path = demo.write_grid_parquet(tmp_path / "grid.parquet", n_rows=100, with_phase=False)
    with pytest.raises(ExtractError, match="whole file"):
        states(extractor("grid"), path, start=10)


def test_wrap_phase_interval():
    x = wrap_phase(np.array([np.pi, -np.pi, 3 * np.pi, 0.5, -0.5 - 2 * np.pi]))
    np.testing.assert_allclose(x, [np.pi, np.pi, np.pi, 0.5, -0.5])


@pytest.mark.parametrize("columns, params, message", [
    ({"timestamp": [1.0], "freq": [50.0]}, {}, r"missing variables \['frequency'\]"),
    ({"frequency_1": [50.0], "frequency_2": [50.0], "frequency_3": [50.0]}, {"buses": 2},
     "expected 2 buses, file has 3"),
    ({"frequency": [50.0]}, {}, r"missing variables \['timestamp'\]"),
])
def test_grid_plan_names_what_is_wrong(tmp_path, columns, params, message):
    path = tmp_path / "grid.parquet"
    pq.write_table(pa.table(columns), path)
    with pytest.raises(ExtractError, match=message):
        plan_of(extractor("grid", **params), path)


# ------------------------------------------------------------------------------------- table

def user_capsule(variables=("a", "b")):
    return EXTRACTORS["table"](parse_capsule({
        "name": "user", "match": {"name": ["*user*"]}, "extractor": "table",
        "variables": list(variables), "units": ["m"] * len(variables)}))


def write_table(path, a, b):
    if path.suffix == ".parquet":
        pq.write_table(pa.table({"b": b, "skip": a, "a": a}), path, row_group_size=7)
    elif path.suffix == ".csv":
        path.write_text("b,skip,a\n" + "".join(f"{float(y)!r},0,{float(x)!r}\n" for x, y in zip(a, b, strict=True)))
    elif path.suffix == ".h5":
        with h5py.File(path, "w") as f:
            f["a"], f["b"], f["skip"] = a, b, np.zeros((3, 3))
    else:
        with netCDF4.Dataset(path, "w") as ds:
            ds.createDimension("row", len(a))
            for name, values in (("a", a), ("b", b)):
                ds.createVariable(name, "f8", ("row",))[:] = values


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".h5", ".nc"])
def test_table_reads_the_capsule_variables_in_order(tmp_path, suffix):
    a, b = np.arange(40, dtype=np.float64), np.linspace(-1, 1, 40)
    path = tmp_path / f"user{suffix}"
    write_table(path, a, b)
    plan, x = states(user_capsule(), path, chunk=6)
    assert plan.n_samples == 40 and plan.state.names == ("a", "b") and plan.state.units == ("m", "m")
    np.testing.assert_allclose(x, np.stack([a, b], axis=1).astype(np.float32))


def test_table_plan_errors(tmp_path):
    path = tmp_path / "user.h5"
    with h5py.File(path, "w") as f:
        f["a"], f["b"] = np.zeros(5), np.zeros(6)
    with pytest.raises(ExtractError, match="different lengths"):
        plan_of(user_capsule(), path)
    with pytest.raises(ExtractError, match=r"missing variables \['c'\]"):
        plan_of(user_capsule(("a", "c")), path)
    text = tmp_path / "user.csv"
    text.write_text("a,b\n1,x\n2,y\n")
    with pytest.raises(ExtractError, match=r"variables \['b'\] are not numeric"):
        plan_of(user_capsule(), text)
