"""`bench.py all` ends with each figure, its baseline and their ratio (the README's table)."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def bench_script():
    path = Path(__file__).resolve().parent.parent / "scripts" / "bench.py"
    spec = importlib.util.spec_from_file_location("bench_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_summary_rows_pair_each_figure_with_its_baseline_and_ratio():
    bench = bench_script()
    results = {
        "stream": {
            "hdf5": {"stream_samples_per_s": 90.0, "raw_samples_per_s": 100.0, "ratio": 0.9},
            "parquet_dataloader_2_workers": {"samples_per_s": 4e6, "target_samples_per_s": 2e6},
            "cache_fusion": {"cache_samples_per_s": 300.0, "extract_samples_per_s": 50.0, "ratio": 6.0,
                             "target_ratio": 3.0, "plain_read_samples_per_s": 320.0,
                             "ratio_to_plain_read": 300 / 320, "target_ratio_to_plain_read": 0.9,
                             "litdata_samples_per_s": 100.0, "ratio_to_litdata": 3.0},
        },
        "study": {"grid": {"ratio": 1.7, "by_dim": {}}},
    }
    rows = {(r["section"], r["case"]): r for r in bench.summary_rows(results)}
    assert rows["stream", "hdf5"]["value"] == 90.0 and rows["stream", "hdf5"]["baseline_value"] == 100.0
    assert rows["stream", "parquet_dataloader_2_workers"]["ratio"] == 2.0  # against its target
    assert rows["stream", "cache_fusion"]["target_ratio"] == 3.0
    assert rows["stream", "cache_fusion (plain read)"]["ratio"] == 300 / 320
    assert rows["stream", "cache_fusion (LitData)"]["baseline_value"] == 100.0
    assert rows["study", "grid"]["ratio"] == 1.7 and rows["study", "grid"]["value"] is None
    machine = bench.machine()
    table = bench.format_summary(list(rows.values()), machine, machine)
    assert len(table.splitlines()) == 2 + len(rows) and "load average" in table.splitlines()[0]
