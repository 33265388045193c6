"""The Physics Crawler: scan, identification, capsule assignment, incremental re-crawl, manifest."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ebm_vae import demo
from ebm_vae.config import compose
from ebm_vae.crawl import crawl as crawl_module
from ebm_vae.crawl.crawl import crawl
from ebm_vae.crawl.manifest import SCHEMA, read_manifest
from ebm_vae.crawl.scan import scan
from ebm_vae.data.readers import READERS


def _cfg(data_root, out_root, *overrides, extra_dirs=None):
    return compose("crawl", [f"data.root={data_root}", f"paths.root={out_root}", "crawl.stats=false",
                             "crawl.progress=false", *overrides], extra_dirs=extra_dirs)


def _rows(manifest):
    return {e.path: e for e in manifest.entries()}


@pytest.fixture(scope="module")
def demo_crawl(tmp_path_factory):
    """The demo drive (tiny) and its manifest, shared by the read-only tests below."""
    base = tmp_path_factory.mktemp("demo")
    summary = demo.make_demo_tree(base / "data", scale=0.01, n=8, config_dir=base / "conf")
    manifest = crawl(_cfg(base / "data", base / "out", extra_dirs=[base / "conf"]))
    return summary, manifest, base


# --------------------------------------------------------------------------- the demo drive


def test_every_demo_file_gets_its_capsule(demo_crawl):
    summary, manifest, _ = demo_crawl
    rows = _rows(manifest)
    assert set(rows) == set(summary["files"])  # hidden files and the symlink loop are not listed
    assert {p: r.capsule for p, r in rows.items()} == {p: f["capsule"] for p, f in summary["files"].items()}


def test_faults_and_decoys_get_one_line_errors(demo_crawl):
    summary, manifest, _ = demo_crawl
    rows = _rows(manifest)
    kind = {p: f["kind"] for p, f in summary["files"].items()}
    by_kind = {}
    for path, row in rows.items():
        by_kind.setdefault(kind[path], []).append(row)
    assert all(r.error == "empty file" and r.format == "hdf5" for r in by_kind["empty"])
    assert all(r.error.startswith("truncated HDF5: ") for r in by_kind["truncated"])
    assert all(r.error.startswith("not a Parquet file: ") for r in by_kind["corrupt"])
    for r in by_kind["junk"]:  # junk values become NaN when read, the file itself is fine
        assert r.error is None and r.n_samples > 0 and r.format == "csv"
    for r in by_kind["decoy"]:  # README, PNG, unrelated CSV: indexed, no capsule
        assert r.capsule is None and r.n_samples == 0
        # a text file is a log by its name, and says why no capsule takes it
        assert r.error == ("no capsule's log rule parses its lines" if r.format == "log" else None)
    assert {r.path.rsplit("/", 1)[-1]: r.format for r in by_kind["decoy"]} == {
        "README.txt": "log", "IMG_0001.png": None, "sensor_log.csv": "csv"}
    assert all("\n" not in (r.error or "") for r in rows.values())
    usable = [r for r in rows.values() if r.capsule and r.error is None]
    assert all(r.n_samples > 0 and r.extent > 0 and r.variables for r in usable)


def test_demo_logs_are_indexed_with_their_unparseable_lines(demo_crawl):
    summary, manifest, _ = demo_crawl
    logs = {p: r for p, r in _rows(manifest).items() if r.format == "log"}
    kinds = {p: summary["files"][p]["kind"] for p in logs}
    assert sorted(kinds.values()) == ["decoy", "event_log", "event_log", "event_log", "log_by_content", "shot_log"]
    lines = {"event_log": (200, 2), "log_by_content": (100, 1), "shot_log": (100, 2)}  # 1 % bad, shots 2 %
    for path, row in logs.items():
        if kinds[path] == "decoy":
            continue
        n_lines, n_bad = lines[kinds[path]]
        assert (row.error, row.n_samples, row.skipped_rows) == (None, n_lines - n_bad, n_bad)
        assert (row.rule == "lines:key=value") == (kinds[path] == "log_by_content")
    assert logs["grid/pmu/pmu_grid_07.log.2.gz"].extent == 1


def test_metadata_only_identification(demo_crawl):
    _, manifest, _ = demo_crawl
    (row,) = [r for r in manifest.entries() if r.path == "lab/run_0007.h5"]
    assert (row.capsule, row.rule, row.error) == ("fusion", "attrs:capsule=fusion", None)
    named = [r for r in manifest.entries() if r.path.endswith("plasma_shot_1042.h5")]
    assert named[0].rule == "name:*plasma*"


def test_manifest_schema_and_paths(demo_crawl):
    _, manifest, base = demo_crawl
    table = pq.read_table(base / "out" / "index" / "manifest.parquet")
    assert table.schema.names == SCHEMA.names
    assert [f.type for f in table.schema] == [f.type for f in SCHEMA]
    metadata = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    assert metadata["ebm_vae.root"] == str((base / "data").resolve())
    assert {"ebm_vae.version", "ebm_vae.created"} <= set(metadata)
    paths = table["path"].to_pylist()
    assert paths == sorted(paths)
    assert all(not p.startswith("/") and "\\" not in p and str(base) not in p for p in paths)
    assert all((base / "data" / p).is_file() for p in paths)
    again = read_manifest(base / "out" / "index")
    assert again.root == (base / "data").resolve() and again.table.equals(manifest.table)
    field = next(v for v in _rows(again)["campaigns/2024/mhd/MHD_8_run01.h5"].variables
                 if v.name == "t1_fields/magnetic_field")
    assert field.shape == (2, 4, 8, 8, 4, 3) and field.dtype == "float32"


# --------------------------------------------------------------------------- the scan


def test_scan_skips_hidden_and_outside_links_and_stops_loops(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    demo.write_readme(root / "a" / "real.txt")
    demo.write_readme(root / ".hidden" / "secret.txt")
    demo.write_readme(root / ".hidden_file.txt")
    demo.write_fusion_plain(outside / "MHD_outside.h5", n_time=1, n=4, nz=2)
    os.symlink(outside, root / "to_outside")
    os.symlink(outside / "MHD_outside.h5", root / "MHD_link_outside.h5")
    os.symlink(root, root / "a" / "loop")
    os.symlink(root / "a", root / "alias_of_a")
    os.symlink(root / "a" / "real.txt", root / "alias.txt")
    os.symlink(root / "missing", root / "broken")
    assert sorted(f.relpath for f in scan(root)) == ["a/real.txt"]


def test_symlink_into_the_root_is_followed(tmp_path):
    root = tmp_path / "root"
    demo.write_readme(root / ".store" / "MHD_note.txt")  # only reachable through the link
    os.symlink(root / ".store", root / "linked")
    assert [f.relpath for f in scan(root)] == ["linked/MHD_note.txt"]


def test_index_inside_the_data_tree_is_refused(tmp_path):
    demo.write_readme(tmp_path / "README.txt")
    with pytest.raises(ValueError, match="never writes into the data tree"):
        crawl(_cfg(tmp_path, tmp_path / "out"))
    assert [p.name for p in tmp_path.iterdir()] == ["README.txt"]


# --------------------------------------------------------------------------- capsule assignment


def _user_capsule(config_dir, name, body):
    path = config_dir / "capsule" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(body))


def test_user_capsules_from_a_config_dir(tmp_path):
    data, conf = tmp_path / "data", tmp_path / "conf"
    demo.write_sensor_log(data / "lab" / "sensor_log.csv", n_rows=50)
    demo.write_grid_parquet(data / "grid_frequency_a.parquet", n_rows=30)
    demo.write_grid_csv(data / "feed_b.csv", n_rows=20)
    _user_capsule(conf, "climate", """\
        name: climate
        match: {columns: [temperature_c, humidity_pct]}
        extractor: table
        variables: [temperature_c, humidity_pct]
        units: [degC, "%"]
    """)
    _user_capsule(conf, "grid", """\
        name: grid
        match: {name: ["*feed*"]}
        extractor: grid
        variables: [frequency, phase_angle]
        units: [Hz, rad]
    """)  # replaces the built-in grid capsule: *grid* no longer matches
    rows = _rows(crawl(_cfg(data, tmp_path / "out", extra_dirs=[conf])))
    sensor = rows["lab/sensor_log.csv"]
    assert (sensor.capsule, sensor.rule, sensor.error, sensor.n_samples) == (
        "climate", "columns:temperature_c,humidity_pct", None, 50)
    assert (rows["feed_b.csv"].capsule, rows["feed_b.csv"].rule) == ("grid", "name:*feed*")
    assert rows["feed_b.csv"].n_samples == 20
    assert rows["grid_frequency_a.parquet"].capsule is None


def test_ambiguous_unsupported_and_missing_variables(tmp_path):
    data, conf = tmp_path / "data", tmp_path / "conf"
    demo.write_grid_csv(data / "grid_frequency_x.csv", n_rows=10)
    demo.write_grid_csv(data / "MHD_table.csv", n_rows=10)
    with h5py.File(data / "MHD_novars.h5", "w") as f:
        f["x"] = np.arange(4.0)
    with h5py.File(data / "wafer_empty_group.h5", "w") as f:
        f.create_group("nothing")
    _user_capsule(conf, "power", """\
        name: power
        match: {name: ["*frequency*"]}
        extractor: table
        variables: [frequency]
    """)
    rows = _rows(crawl(_cfg(data, tmp_path / "out", extra_dirs=[conf])))
    ambiguous = rows["grid_frequency_x.csv"]
    assert (ambiguous.capsule, ambiguous.error) == ("grid", "ambiguous: matches grid and power")
    assert ambiguous.n_samples == 0
    unsupported = rows["MHD_table.csv"]
    assert (unsupported.capsule, unsupported.error) == ("fusion", "format not supported: csv (fusion reads hdf5)")
    assert rows["MHD_novars.h5"].capsule == "fusion"
    assert rows["MHD_novars.h5"].error.startswith("missing variables")
    assert rows["wafer_empty_group.h5"].error.startswith("missing variables")


# --------------------------------------------------------------------------- incremental re-crawl


def _count_inspections(monkeypatch, tmp_path):
    """The names of the files the readers open, as a function: the crawl's worker processes
    inherit the patch and append to a file, since a list in this process would stay empty."""
    log = tmp_path / "opened.txt"
    for fmt, reader in READERS.items():
        original = reader.inspect

        def counting(path, *options, _original=original, _fmt=fmt):
            with open(log, "a") as out:
                out.write(path.name + "\n")
            return _original(path, *options)

        monkeypatch.setattr(reader, "inspect", counting)
    return lambda: log.read_text().split() if log.exists() else []


def test_incremental_recrawl(tmp_path, monkeypatch):
    data = tmp_path / "data"
    demo.write_grid_csv(data / "grid_a.csv", n_rows=20)
    demo.write_grid_parquet(data / "grid_b.parquet", n_rows=20)
    demo.write_fusion_plain(data / "MHD_c.h5", n_time=2, n=4, nz=2)
    demo.write_wafer_netcdf(data / "wafer_d.nc", n_time=2, n=4)
    cfg = _cfg(data, tmp_path / "out")
    first = _rows(crawl(cfg))
    assert len(first) == 4

    demo.write_grid_csv(data / "grid_a.csv", n_rows=35, seed=1)  # changed
    (data / "grid_b.parquet").unlink()  # deleted
    demo.write_grid_csv(data / "sub" / "grid_e.csv", n_rows=5)  # new
    opened = _count_inspections(monkeypatch, tmp_path)
    second = _rows(crawl(cfg))
    assert sorted(opened()) == ["grid_a.csv", "grid_e.csv"]  # unchanged files are not reopened
    assert sorted(second) == ["MHD_c.h5", "grid_a.csv", "sub/grid_e.csv", "wafer_d.nc"]
    assert second["grid_a.csv"].n_samples == 35 and second["sub/grid_e.csv"].n_samples == 5
    assert second["MHD_c.h5"] == first["MHD_c.h5"] and second["wafer_d.nc"] == first["wafer_d.nc"]

    (tmp_path / "opened.txt").unlink()
    assert _rows(crawl(cfg)) == second and opened() == []


def test_changed_capsules_recrawl_every_file(tmp_path, monkeypatch):
    data, conf = tmp_path / "data", tmp_path / "conf"
    demo.write_grid_csv(data / "grid_a.csv", n_rows=20)
    crawl(_cfg(data, tmp_path / "out"))
    _user_capsule(conf, "other", """\
        name: other
        match: {name: ["*nothing*"]}
        extractor: table
        variables: [x]
    """)
    opened = _count_inspections(monkeypatch, tmp_path)
    crawl(_cfg(data, tmp_path / "out", extra_dirs=[conf]))
    assert opened() == ["grid_a.csv"]


def test_interrupted_crawl_keeps_the_previous_manifest(tmp_path, monkeypatch):
    data = tmp_path / "data"
    for i in range(3):
        demo.write_grid_csv(data / f"grid_{i}.csv", n_rows=10, seed=i)
    cfg = _cfg(data, tmp_path / "out")
    before = crawl(cfg)
    demo.write_grid_csv(data / "grid_3.csv", n_rows=10)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(crawl_module, "identify", killed)
    with pytest.raises(KeyboardInterrupt):
        crawl(cfg)
    index = tmp_path / "out" / "index"
    assert read_manifest(index).table.equals(before.table)
    assert sorted(p.name for p in index.iterdir()) == ["manifest.parquet"]  # no temp file left
    monkeypatch.undo()
    assert len(crawl(cfg)) == 4


def test_recrawl_resumes_from_the_last_checkpoint(tmp_path, monkeypatch):
    data = tmp_path / "data"
    for i in range(5):
        demo.write_grid_csv(data / f"grid_{i}.csv", n_rows=10, seed=i)
    cfg = _cfg(data, tmp_path / "out", "crawl.checkpoint_s=0", "crawl.workers=1")
    monkeypatch.setattr(crawl_module, "CHUNK_FILES", 1)
    identify, called = crawl_module.identify, tmp_path / "called.txt"

    def dies_on_the_third_file(root, found, rules):  # in the worker process: it logs to a file
        with open(called, "a") as out:
            out.write(found.relpath + "\n")
        if len(called.read_text().split()) == 3:
            raise KeyboardInterrupt
        return identify(root, found, rules)

    monkeypatch.setattr(crawl_module, "identify", dies_on_the_third_file)
    with pytest.raises(KeyboardInterrupt):
        crawl(cfg)
    calls = called.read_text().split()
    assert [e.path for e in read_manifest(tmp_path / "out" / "index").entries()] == calls[:2]
    monkeypatch.setattr(crawl_module, "identify", identify)
    opened = _count_inspections(monkeypatch, tmp_path)
    assert len(crawl(cfg)) == 5
    assert sorted(opened()) == sorted(f"grid_{i}.csv" for i in range(5) if f"grid_{i}.csv" not in calls[:2])


def test_a_file_that_kills_its_reader_process_gets_an_error(tmp_path, monkeypatch):
    data = tmp_path / "data"
    for i in range(6):
        demo.write_grid_csv(data / f"grid_{i}.csv", n_rows=10, seed=i)
    parent, identify = os.getpid(), crawl_module.identify

    def segfaults_on_grid_3(root, found, rules):
        if found.relpath == "grid_3.csv" and os.getpid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)
        return identify(root, found, rules)

    monkeypatch.setattr(crawl_module, "identify", segfaults_on_grid_3)
    monkeypatch.setattr(crawl_module, "CHUNK_FILES", 2)
    rows = _rows(crawl(_cfg(data, tmp_path / "out", "crawl.workers=2")))
    assert len(rows) == 6
    assert rows["grid_3.csv"].error == "unreadable: the reader crashed on this file"
    assert all(r.error is None and r.n_samples == 10 for p, r in rows.items() if p != "grid_3.csv")


def test_stats_pass_runs_for_changed_capsules_only(tmp_path, monkeypatch):
    import ebm_vae.data.stats as stats

    calls = []

    def fake_stats(manifest, capsule, index_dir, cfg):
        calls.append(capsule.name)
        (index_dir / capsule.name).mkdir(parents=True, exist_ok=True)
        (index_dir / capsule.name / "stats.json").write_text("{}")

    monkeypatch.setattr(stats, "run_stats_pass", fake_stats)
    data = tmp_path / "data"
    demo.write_grid_csv(data / "grid_a.csv", n_rows=20)
    demo.write_fusion_plain(data / "MHD_c.h5", n_time=2, n=4, nz=2)
    cfg = _cfg(data, tmp_path / "out", "crawl.stats=true")
    crawl(cfg)
    assert calls == ["fusion", "grid"]
    calls.clear()
    crawl(cfg)
    assert calls == []
    demo.write_grid_csv(data / "grid_b.csv", n_rows=20)
    crawl(cfg)
    assert calls == ["grid"]
    calls.clear()
    (data / "MHD_c.h5").unlink()  # fusion has no usable file left: nothing to compute
    crawl(cfg)
    assert calls == []


# --------------------------------------------------------------------------- the command


def test_command_with_config_dir(tmp_path):
    data, conf, out = tmp_path / "data", tmp_path / "conf", tmp_path / "out"
    demo.write_sensor_log(data / "sensor_log.csv", n_rows=12)
    _user_capsule(conf, "climate", """\
        name: climate
        match: {name: ["sensor_*"]}
        extractor: table
        variables: [temperature_c]
        units: [degC]
    """)
    result = subprocess.run(
        [sys.executable, "-m", "ebm_vae.crawl.app", f"data.root={data}", f"paths.root={out}",
         "crawl.stats=false", "crawl.progress=false", "--config-dir", str(conf)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "climate" in result.stdout
    row = read_manifest(out / "index").entries()[0]
    assert (row.capsule, row.rule, row.n_samples) == ("climate", "name:sensor_*", 12)
    assert not (data / "index").exists() and (out / "logs" / "hydra").is_dir()


def test_manifest_columns_are_typed_even_when_empty(tmp_path):
    demo.write_png(tmp_path / "data" / "IMG_0001.png")
    manifest = crawl(_cfg(tmp_path / "data", tmp_path / "out"))
    assert manifest.table.schema == SCHEMA
    assert manifest.table["format"].to_pylist() == [None]
    assert manifest.usable("grid") == []
    assert isinstance(manifest.table["variables"].type, pa.ListType)
