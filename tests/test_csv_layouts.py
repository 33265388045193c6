"""Real CSV layouts: lines above the header (csv.skip_rows), column names as written (columns:),
a "header" that is data, and ragged rows counted instead of skipped in silence."""

from __future__ import annotations

import json
import textwrap
from collections import Counter
from pathlib import Path

import h5py
import netCDF4
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ebm_vae import EnergyMap
from ebm_vae.capsules import parse_capsule, visible_capsules
from ebm_vae.config import compose
from ebm_vae.crawl.crawl import crawl
from ebm_vae.data.extractors import EXTRACTORS
from ebm_vae.data.readers import READERS, ReadError, ReadOptions
from ebm_vae.data.units import WorkUnit, entry_plan, make_units, read_unit
from ebm_vae.export import export
from ebm_vae.train import train

CSV = READERS["csv"]
TMY_COLUMNS = ["Date (MM/DD/YYYY)", "Time (HH:MM)", "GHI (W/m^2)", "GHI source", "Dry-bulb (C)",
               "Dew-point (C)", "RHum (%)", "Pressure (mbar)"]
CLIMATE = """\
    name: climate
    match: {name: ["*TMY3*"]}
    variables: [temperature, humidity]
    units: [degC, "%"]
    csv: {skip_rows: 1}
    columns: {temperature: "Dry-bulb (C)", humidity: "RHum (%)"}
    """


def write_tmy(path: Path, n_hours: int = 2000, seed: int = 0) -> tuple[Path, np.ndarray]:
    """A TMY3-like file: a station line, then a header of parenthesised names, then hourly rows.
    Returns the path and the (temperature, humidity) of every row."""
    rng = np.random.default_rng(seed)
    hours = np.arange(n_hours)
    temperature = np.round(8 + 6 * np.sin(2 * np.pi * hours / 24) + rng.normal(0, 2, n_hours), 1)
    humidity = np.round(np.clip(80 - 2.5 * (temperature - 8) + rng.normal(0, 5, n_hours), 5, 100), 0)
    lines = ['703165,"SAND POINT",AK,-9.0,55.317,-160.517,7', ",".join(TMY_COLUMNS)]
    for h, t, rh in zip(hours, temperature, humidity, strict=True):
        day = 1 + h // 24
        lines.append(f"01/{day:02d}/1988,{h % 24 + 1:02d}:00,{max(0, 300 * np.sin(np.pi * (h % 24) / 24)):.0f},"
                     f"2,{t},{t - 3:.1f},{rh:.0f},1004")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path, np.stack([temperature, humidity], axis=1)


def write_capsule(conf: Path, name: str, body: str) -> Path:
    path = conf / "capsule" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(body))
    return path


def crawl_cfg(data: Path, out: Path, conf: Path, *overrides: str):
    return compose("crawl", [f"data.root={data}", f"paths.root={out}", "crawl.workers=1",
                             "crawl.progress=false", *overrides], extra_dirs=[conf])


# --------------------------------------------------------------------------- TMY3, end to end


def test_a_tmy_file_crawls_and_trains_with_skip_rows_and_clean_names(tmp_path):
    data, conf, out = tmp_path / "data", tmp_path / "conf", tmp_path / "out"
    _, values = write_tmy(data / "703165TYA_TMY3.csv")
    write_capsule(conf, "climate", CLIMATE)
    manifest = crawl(crawl_cfg(data, out, conf))
    (row,) = manifest.entries()
    assert (row.capsule, row.error, row.n_samples) == ("climate", None, 2000)
    assert [v.name for v in row.variables] == TMY_COLUMNS  # the index shows the file as written
    stats = json.loads((out / "index" / "climate" / "stats.json").read_text())
    assert stats["state"]["names"] == ["temperature", "humidity"] and stats["count"] == 2000
    np.testing.assert_allclose(stats["mean"], values.mean(axis=0), rtol=1e-6)
    cfg = compose("train", ["capsule=climate", f"data.root={data}", f"paths.root={out}", "debug=fast",
                            "data.batch_size=256", "trainer.enable_progress_bar=false",
                            "trainer.enable_model_summary=false"], extra_dirs=[conf])
    train(cfg)
    # overrides and maps use the clean names, unquoted
    path = export(compose("export", ["capsule=climate", f"paths.root={out}", "export.resolution=8",
                                     "export.k=2", "export.progress=false", "export.plot=false",
                                     "export.axes=[humidity,temperature]", "export.limits=[[20,100],[-5,25]]"],
                          extra_dirs=[conf]))
    energy_map = EnergyMap.load(path)
    assert [a["name"] for a in energy_map.metadata["axes"]] == ["humidity", "temperature"]
    assert np.isfinite(energy_map.energy(np.array([[60.0, 8.0]]))).all()


def test_a_header_that_is_data_says_to_set_skip_rows(tmp_path):
    data, conf = tmp_path / "data", tmp_path / "conf"
    write_tmy(data / "703165TYA_TMY3.csv", n_hours=30)
    write_capsule(conf, "climate", CLIMATE.replace("csv: {skip_rows: 1}", "csv: {skip_rows: 0}"))
    (row,) = crawl(crawl_cfg(data, tmp_path / "out", conf, "crawl.stats=false")).entries()
    assert row.capsule == "climate"
    assert row.error == ("the header looks like data: set csv.skip_rows to the lines above the header "
                         """(line 1: '703165,"SAND POINT",AK,-9.0,55.317,-160.517,7')""")


@pytest.mark.parametrize(("text", "skip_rows", "error"), [
    ("1.5,2.5\n3.5,4.5\n", 0, "the header looks like data"),  # no header at all
    ("station 7\nunits row\nx,y\n1,2\n", 5, "csv.skip_rows=5: the file has only 4 lines"),
    ("a,b\n1,2\n3,4\n", 1, "the header looks like data"),  # one line too many: a data line as header
    ("x,2020,y\n1,2,3\n", 0, None),  # one number among names, the same width below: a header
    ("x,y\n", 0, None),  # a header alone
])
def test_header_checks(tmp_path, text, skip_rows, error):
    path = tmp_path / "t.csv"
    path.write_text(text)
    if error is None:
        assert CSV.inspect(path, ReadOptions(skip_rows=skip_rows)).variables
        return
    with pytest.raises(ReadError, match=error):
        CSV.inspect(path, ReadOptions(skip_rows=skip_rows))


def test_capsule_keys_are_checked(tmp_path):
    body = {"name": "climate", "match": {"name": ["*x*"]}, "variables": ["t"]}
    with pytest.raises(ValueError, match="invalid capsule key 'columns.temp'"):
        parse_capsule({**body, "columns": {"temp": "T (C)"}})
    with pytest.raises(ValueError, match="invalid capsule key 'csv.skip_rows'"):
        parse_capsule({**body, "csv": {"skip_rows": -1}})
    with pytest.raises(ValueError, match="invalid capsule key 'log.timestamp_format'.*%Q"):
        parse_capsule({**body, "log": {"timestamp_format": "%Q"}})


# --------------------------------------------------------------------------- ragged rows are counted


def test_ragged_rows_are_counted_per_range_and_file(tmp_path):
    lines = ["timestamp,frequency,phase_angle"]
    ragged = 0
    for i in range(200):
        if i % 17 == 3:
            lines.append(f"2024-01-01T00:00:00,{50 + i * 1e-4}")  # too few fields
            ragged += 1
        elif i % 23 == 5:
            lines.append(f"2024-01-01T00:00:00,{50 + i * 1e-4},0.1,extra")  # too many
            ragged += 1
        elif i % 31 == 7:
            lines.append("2024-01-01T00:00:00,ERR,0.1")  # junk: a NaN to drop later, not ragged
        else:
            lines.append(f"2024-01-01T00:00:{i % 60:02d},{50 + i * 1e-4},0.1")
    path = tmp_path / "grid_ragged.csv"
    path.write_text("\n".join(lines) + "\n")
    size = path.stat().st_size
    for step in (size, 997, 101):
        total, rows = 0, 0
        with CSV.open(path) as handle:
            for start in range(0, size, step):
                before = handle.skipped_rows
                rows += sum(len(b["frequency"]) for b in handle.iter_batches(["frequency"], start, start + step))
                total += handle.skipped_rows - before
        assert (total, rows) == (ragged, 200 - ragged)
    assert ragged == 21
    # read_unit adds them to the per-file counter the statistics and the stream keep
    capsule = visible_capsules()["grid"]
    extractor = EXTRACTORS["grid"](capsule)
    info = CSV.inspect(path)
    assert info.skipped_rows is None  # the crawl counts lines, not fields: known once read
    from ebm_vae.crawl.manifest import ManifestEntry

    entry = ManifestEntry("grid_ragged.csv", size, path.stat().st_mtime_ns, format="csv",
                          variables=info.variables, extent=size)
    plan = entry_plan(extractor, entry)
    units = make_units([entry], extractor, plan.state, 64, 500)
    skipped = Counter()
    for unit in units:
        list(read_unit(extractor, tmp_path, unit, 32, skipped=skipped))
    assert len(units) > 5 and skipped == {"grid_ragged.csv": ragged}
    assert sum(len(s) for s in read_unit(extractor, tmp_path, WorkUnit.whole(entry, plan), 32)) == 200 - ragged


# --------------------------------------------------------------------------- `columns:` for every table source


def test_columns_map_clean_names_in_parquet_hdf5_and_netcdf(tmp_path):
    capsule = parse_capsule({"name": "climate", "match": {"name": ["*x*"]}, "variables": ["temperature", "humidity"],
                             "columns": {"temperature": "Dry-bulb (C)", "humidity": "rh/percent"}})
    extractor = EXTRACTORS["table"](capsule)
    values = np.array([[1.0, 50.0], [2.0, 60.0], [3.0, 70.0]])
    pq.write_table(pa.table({"Dry-bulb (C)": values[:, 0], "rh/percent": values[:, 1]}), tmp_path / "a.parquet")
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f["Dry-bulb (C)"] = values[:, 0]
        f.create_group("rh")["percent"] = values[:, 1]  # an HDF5 path as the column name
    with netCDF4.Dataset(tmp_path / "a.nc", "w") as ds:
        ds.createDimension("time", 3)
        ds.createVariable("Dry-bulb (C)", "f8", ("time",))[:] = values[:, 0]
        ds.createGroup("rh").createVariable("percent", "f8", ("time",))[:] = values[:, 1]
    for name, fmt in (("a.parquet", "parquet"), ("a.h5", "hdf5"), ("a.nc", "netcdf")):
        plan = extractor.plan(READERS[fmt].inspect(tmp_path / name))
        assert plan.state.names == ("temperature", "humidity") and plan.n_samples == 3
        with extractor.open(tmp_path / name, fmt) as handle:
            np.testing.assert_array_equal(np.concatenate(list(extractor.iter_states(handle, plan, 0, 3, 2))), values)
    pq.write_table(pa.table({"temperature": values[:, 0]}), tmp_path / "b.parquet")
    with pytest.raises(Exception, match=r"missing variables \['Dry-bulb \(C\)', 'rh/percent'\]"):
        extractor.plan(READERS["parquet"].inspect(tmp_path / "b.parquet"))


def test_columns_rename_the_grid_columns(tmp_path):
    capsule = parse_capsule({"name": "pmu", "match": {"name": ["*pmu*"]}, "extractor": "grid",
                             "variables": ["frequency", "phase_angle"],
                             "columns": {"frequency": "Freq (Hz)", "phase_angle": "Angle (rad)"}})
    extractor = EXTRACTORS["grid"](capsule)
    path = tmp_path / "pmu.csv"
    path.write_text("timestamp,Freq (Hz)_1,Angle (rad)_1,Freq (Hz)_2,Angle (rad)_2\n"
                    "2024-01-01T00:00:00,50.01,0.1,49.99,0.2\n")
    plan = extractor.plan(CSV.inspect(path))
    assert plan.n_samples == 2 and plan.state.names == ("frequency", "phase_angle")
    with extractor.open(path, "csv") as handle:
        states = np.concatenate(list(extractor.iter_states(handle, plan, 0, plan.extent, 8)))
    np.testing.assert_allclose(states, [[50.01, 0.1], [49.99, 0.2]], rtol=1e-6)
