"""`ebm-vae-query`: CSV / Parquet / .npy in and out, streamed; bad inputs get one line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
from landscapes import PATCH, make_landscape

from ebm_vae import EnergyLandscape
from ebm_vae.query import load_config, main

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("query")
    make_landscape(root)
    return root


def run(root: Path, *args: str) -> int:
    return main([f"paths.root={root}", "progress=false", *args])


def states_table(n: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table({"id": np.arange(n), "x": rng.normal(size=n), "y": rng.normal(size=n),
                     "label": [f"s{i}" for i in range(n)]})


@pytest.mark.parametrize("out_ext", [".csv", ".parquet", ".npy"])
@pytest.mark.parametrize("in_ext", [".csv", ".parquet", ".npy"])
def test_every_format_in_and_out(root, tmp_path, in_ext, out_ext):
    table = states_table(300)
    source = tmp_path / f"in{in_ext}"
    if in_ext == ".csv":
        pa_csv.write_csv(table, source)
    elif in_ext == ".parquet":
        pq.write_table(table, source, row_group_size=64)
    else:
        np.save(source, np.column_stack([table["x"], table["y"]]))
    target = tmp_path / f"out{out_ext}"
    assert run(root, "capsule=toy", f"input={source}", f"output={target}", "k=4", "chunk_rows=100") == 0
    states = np.column_stack([table["x"], table["y"]])
    land = EnergyLandscape.open(root / "energy_maps")
    expected = np.concatenate([land.energy("toy", states[i : i + 100], k=4, seed=i // 100).energy
                               for i in range(0, 300, 100)])  # chunk i is seeded with seed + i
    if out_ext == ".npy":
        out = np.load(target, allow_pickle=False)
        assert out.shape == (300, 4) and out.dtype == np.float64
        np.testing.assert_array_equal(out[:, :2], states)
        energy, std = out[:, 2], out[:, 3]
    else:
        out = pq.read_table(target) if out_ext == ".parquet" else pa_csv.read_csv(target)
        carried = ["id", "x", "y", "label"] if in_ext != ".npy" else ["x", "y"]
        assert out.column_names == [*carried, "energy", "energy_std"]
        if in_ext != ".npy":
            assert out["label"].to_pylist() == table["label"].to_pylist()
        energy, std = out["energy"].to_numpy(), out["energy_std"].to_numpy()
    np.testing.assert_allclose(energy, expected, rtol=1e-12)
    assert np.all(std >= 0)


def test_points_on_the_map_axes_and_a_capsule_without_checkpoint(root, tmp_path):
    pa_csv.write_csv(pa.table({"pc2": [0.0, 1.0], "pc1": [0.0, -1.0]}), tmp_path / "pcs.csv")
    assert run(root, "capsule=patch", f"input={tmp_path / 'pcs.csv'}", f"output={tmp_path / 'e.csv'}") == 0
    out = pa_csv.read_csv(tmp_path / "e.csv")
    assert out.column_names == ["pc2", "pc1", "energy"]  # the map: no energy_std
    np.testing.assert_allclose(out["energy"].to_numpy(),
                               0.5 * np.array([0.0, 2.0]) + np.log(2 * np.pi))
    pq.write_table(pa.table({"b": [0.5], "a": [1.0]}), tmp_path / "ab.parquet")
    assert run(root, "capsule=counts", f"input={tmp_path / 'ab.parquet'}", f"output={tmp_path / 'ab.npy'}") == 0
    np.testing.assert_allclose(np.load(tmp_path / "ab.npy")[0, 2], 0.5 * 1.25 + np.log(2 * np.pi))


def test_field_states_from_npy_in_their_shape(root, tmp_path):
    fields = np.random.default_rng(2).normal(size=(5, *PATCH.shape)).astype(np.float32)
    np.save(tmp_path / "f.npy", fields)
    np.save(tmp_path / "fortran.npy", np.asfortranarray(fields.reshape(5, -1)))
    for name in ("f", "fortran"):
        assert run(root, "capsule=patch", f"input={tmp_path / name}.npy", f"output={tmp_path / name}.parquet", "k=2") == 0
    a, b = pq.read_table(tmp_path / "f.parquet"), pq.read_table(tmp_path / "fortran.parquet")
    assert a.num_columns == 16 + 2 and a.column_names[:2] == ["T[0,0]", "T[0,1]"]
    np.testing.assert_allclose(a["energy"].to_numpy(), b["energy"].to_numpy())


def test_an_empty_input_gives_an_empty_output_with_the_columns(root, tmp_path):
    (tmp_path / "empty.csv").write_text("x,y\n")
    assert run(root, "capsule=toy", f"input={tmp_path / 'empty.csv'}", f"output={tmp_path / 'out.csv'}") == 0
    assert pa_csv.read_csv(tmp_path / "out.csv").column_names == ["x", "y", "energy", "energy_std"]


def _truncated_parquet(path: Path) -> Path:
    pq.write_table(states_table(1000), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _corrupt_parquet_pages(path: Path) -> Path:
    pq.write_table(states_table(5000), path, row_group_size=500, compression="none")
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 4000] = b"\xff" * 4000
    path.write_bytes(bytes(data))
    return path


BAD_INPUTS = {
    "unknown capsule": (lambda p: pa_csv.write_csv(states_table(3), p / "s.csv") or p / "s.csv", ["capsule=nope"],
                        "unknown capsule 'nope': the landscape in .* has counts, patch, toy"),
    "wrong columns": (lambda p: pa_csv.write_csv(pa.table({"x": [1.0], "z": [2.0]}), p / "s.csv") or p / "s.csv", [],
                      r"its columns hold neither capsule 'toy''s state components \[x, y\] \(missing y\) nor its map axes \[x, y\]"),
    "text in a state column": (lambda p: (p / "s.csv").write_text("x,y\n1,2\n3,abc\n") and p / "s.csv", [],
                               "not a readable CSV file: .*Row #3: .*invalid value 'abc'"),
    "wrong npy shape": (lambda p: np.save(p / "s.npy", np.zeros((4, 3))) or p / "s.npy", [],
                        r"must have shape \(N, 2\) full states or \(N, 2\) points on the map axes \[x, y\] for capsule 'toy', got \(4, 3\)"),
    "object npy": (lambda p: np.save(p / "s.npy", np.array([[1, None]], dtype=object)) or p / "s.npy", [],
                   "holds object, not real numbers"),
    "truncated npy": (lambda p: (np.save(p / "t.npy", np.zeros((1000, 2))),
                                (p / "s.npy").write_bytes((p / "t.npy").read_bytes()[:5000])) and p / "s.npy", [],
                      r"truncated: its header promises \(1000, 2\)"),
    "truncated parquet": (lambda p: _truncated_parquet(p / "s.parquet"), [],
                          "not a readable Parquet file"),
    "corrupt parquet pages": (lambda p: _corrupt_parquet_pages(p / "s.parquet"), [],
                              "unreadable after row"),
    "energy column present": (lambda p: pa_csv.write_csv(pa.table({"x": [1.0], "y": [1.0], "energy": [0.0]}),
                                                         p / "s.csv") or p / "s.csv", [],
                              "already has a column 'energy'"),
    "unknown format": (lambda p: (p / "s.txt").write_text("x,y\n") and p / "s.txt", [], r"unknown format '.txt'"),
    "missing input": (lambda p: p / "none.csv", [], "no such file"),
    "misspelt key": (lambda p: pa_csv.write_csv(states_table(3), p / "s.csv") or p / "s.csv", ["kk=3"],
                     "invalid key 'kk'"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_inputs_fail_with_one_line_and_leave_no_output(root, tmp_path, capsys, case):
    make, extra, message = BAD_INPUTS[case]
    source = make(tmp_path)
    target = tmp_path / "out" / "energies.csv"
    args = ["capsule=toy", f"input={source}", f"output={target}", *extra]
    if any(a.startswith("capsule=") for a in extra):
        args.remove("capsule=toy")
    assert run(root, *args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ebm-vae-query: error: "), err
    assert re.search(message, err), err
    assert not target.exists() and not list(tmp_path.rglob(".energies.csv.*"))


def test_a_command_line_that_is_not_settings_is_bad_usage(root, capsys):
    assert run(root, "capsule=toy", "states.csv") == 2
    assert "'states.csv' is not a setting: settings are KEY=VALUE" in capsys.readouterr().err


def test_text_arguments_stay_text(tmp_path):
    cfg = load_config(["capsule=2024", "input=1e6.csv", "output=007.parquet", "k=8"])
    assert (cfg.capsule, cfg.input, cfg.output, cfg.k) == ("2024", "1e6.csv", "007.parquet", 8)


def test_a_tampered_catalogue_is_a_one_line_error(root, tmp_path, capsys):
    import shutil

    shutil.copytree(root, tmp_path / "land")
    path = tmp_path / "land" / "energy_maps" / "landscape.json"
    data = json.loads(path.read_text())
    data["capsules"]["toy"]["checkpoint"] = "/etc/passwd"
    path.write_text(json.dumps(data))
    pa_csv.write_csv(states_table(3), tmp_path / "s.csv")
    assert run(tmp_path / "land", "capsule=toy", f"input={tmp_path / 's.csv'}", f"output={tmp_path / 'o.csv'}") == 1
    assert "'toy'.checkpoint: path '/etc/passwd' must be relative" in capsys.readouterr().err


MEMORY_PROBE = """
import json, sys, tracemalloc
import pyarrow as pa
import ebm_vae.query as q
q.CSV_BLOCK_BYTES = 64 << 10
tracemalloc.start()
q.main([*sys.argv[1:], "input=tiny.npy", "output=tiny.csv"])  # imports and caches: not the input's
tracemalloc.reset_peak()
before = tracemalloc.get_traced_memory()[0]
report = {"codes": [q.main([*sys.argv[1:], f"input={source}", f"output={source}.out.parquet"])
                    for source in ("in.csv", "in.parquet", "in.npy")]}
report.update(arrow_peak=pa.default_memory_pool().max_memory(),
              numpy_peak=tracemalloc.get_traced_memory()[1] - before, torch="torch" in sys.modules)
print(json.dumps(report))
"""


def test_memory_is_bounded_by_the_chunk_not_the_input(root, tmp_path):
    """15-25 MB inputs (CSV, Parquet; 5 MB of .npy) through the map in 4096-row chunks: Arrow's and
    NumPy's peaks stay a few MB (reading a whole file would hold all of it at least once)."""
    n = 300_000
    rng = np.random.default_rng(5)
    a, b = rng.uniform(-3, 3, n), rng.uniform(-3, 3, n)
    table = pa.table({"a": a, "b": b, "note": pa.array([f"sample {i}: {v:.17f}" for i, v in enumerate(a)])})
    pa_csv.write_csv(table, tmp_path / "in.csv")
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=8192, compression="none")
    np.save(tmp_path / "in.npy", np.column_stack([a, b]))
    np.save(tmp_path / "tiny.npy", np.zeros((3, 2)))
    sizes = {p.suffix: p.stat().st_size for p in tmp_path.glob("in.*")}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")])}
    run_ = subprocess.run([sys.executable, "-c", MEMORY_PROBE, f"paths.root={root}", "capsule=counts",
                           "chunk_rows=4096", "progress=false"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    report = json.loads(run_.stdout.strip().splitlines()[-1])
    assert report["codes"] == [0, 0, 0], run_.stderr[-2000:]
    assert not report["torch"]  # the map path needs no torch
    assert min(sizes[".csv"], sizes[".parquet"]) > 15e6 and sizes[".npy"] > 4.5e6, sizes
    assert report["arrow_peak"] < 4e6 and report["numpy_peak"] < 2e6, (sizes, report)
    assert pq.read_metadata(tmp_path / "in.csv.out.parquet").num_rows == n


@pytest.mark.slow
def test_an_input_larger_than_the_memory_budget_streams(root, tmp_path):
    """~450 MB of CSV through the map: the process's peak memory grows by far less than the input."""
    rng = np.random.default_rng(6)
    source = tmp_path / "big.csv"
    with pa_csv.CSVWriter(source, pa.schema([("a", pa.float64()), ("b", pa.float64()), ("id", pa.int64())])) as writer:
        for i in range(10):
            n = 1_000_000
            writer.write_table(pa.table({"a": rng.uniform(-3, 3, n), "b": rng.uniform(-3, 3, n),
                                         "id": np.arange(i * n, (i + 1) * n)}))
    probe = ("import resource, sys; from ebm_vae.query import main; import pyarrow;"
             "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; code = main(sys.argv[1:]);"
             "print(code, base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    run_ = subprocess.run([sys.executable, "-c", probe, f"paths.root={root}", "capsule=counts", f"input={source}",
                           f"output={tmp_path / 'out.parquet'}", "progress=false"],
                          capture_output=True, text=True, timeout=1800)
    code, base_kb, peak_kb = map(int, run_.stdout.split()[-3:])
    assert code == 0, run_.stderr[-2000:]
    growth = (peak_kb - base_kb) * 1024
    assert growth < 150e6 < source.stat().st_size / 3, (growth, source.stat().st_size)
    assert pq.read_metadata(tmp_path / "out.parquet").num_rows == 10_000_000
