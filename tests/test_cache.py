"""The state cache: the same states as the files, per-file invalidation, the auto gate."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ebm_vae import demo
from ebm_vae.config import compose
from ebm_vae.data.datamodule import datamodule_from_config


def write_tree(root):
    demo.write_fusion_well(root / "MHD_0.h5", n_traj=2, n_time=20, n=8, nz=4, seed=0)
    demo.write_fusion_plain(root / "MHD_1.h5", n_time=30, n=8, nz=4, seed=1)
    demo.write_grid_csv(root / "grid_0.csv", n_rows=3000, seed=0)
    demo.write_grid_csv(root / "grid_1.csv", n_rows=2000, with_phase=False, seed=1)  # whole_file
    rows = np.arange(1500, dtype=np.float64)
    frequency = 50 + 0.01 * np.sin(rows)
    frequency[::7] = np.nan  # NaN rows: dropped on both paths, counted the same
    pq.write_table(pa.table({"frequency": frequency, "phase_angle": np.cos(rows)}), root / "grid_2.parquet",
                   row_group_size=400)


def module(tmp_path, capsule, cache, *extra):
    cfg = compose("train", [f"capsule={capsule}", f"data.root={tmp_path / 'data'}",
                            f"paths.root={tmp_path / ('out_' + cache)}", "crawl.progress=false",
                            f"data.cache={cache}", "data.batch_size=16", "crawl.stats_workers=1", *extra])
    return datamodule_from_config(cfg)


def rows(batches) -> list[tuple]:
    return sorted(map(tuple, np.concatenate(list(batches)).tolist()))


@pytest.mark.parametrize("capsule", ["fusion", "grid"])
def test_a_cached_epoch_holds_the_same_states_as_the_files(tmp_path, capsule):
    write_tree(tmp_path / "data")
    on, off = module(tmp_path, capsule, "on"), module(tmp_path, capsule, "off")
    assert len(on.shards) == len(on.split["files"]) and not off.shards
    assert on.split == off.split
    for train in (False, True):
        streams = [dm.stream(train) for dm in (on, off)]
        assert streams[0].cached and not streams[1].cached
        if not train:  # in order, every state once
            assert rows(streams[0].iter_share(0, 1, 0, 1)) == rows(streams[1].iter_share(0, 1, 0, 1))
            totals = [s.counters.totals() for s in streams]
            # exact counts: the statistics pass counted each CSV block's rows
            assert totals[0] == totals[1] and totals[0]["read"] == on.split["val_samples"]
            continue
        for s in streams:  # two passes' worth of batches: every state at least once on both sides
            s.batches_per_epoch = 2 * s.n_samples // s.batch_size + 2
        assert set(rows(streams[0].iter_share(0, 1, 0, 1))) == set(rows(streams[1].iter_share(0, 1, 0, 1)))
    if capsule == "grid":  # NaN rows in validation too
        assert streams[0].counters.totals()["dropped"] > 0


def test_a_changed_file_invalidates_only_its_shard(tmp_path):
    write_tree(tmp_path / "data")
    first = module(tmp_path, "fusion", "on")
    before = {p: os.stat(s).st_mtime_ns for p, s in first.shards.items()}
    demo.write_fusion_plain(tmp_path / "data" / "MHD_1.h5", n_time=30, n=8, nz=4, seed=5)
    from ebm_vae.crawl.crawl import crawl

    crawl(compose("crawl", [f"data.root={tmp_path / 'data'}", f"paths.root={tmp_path / 'out_on'}",
                            "crawl.progress=false", "data.cache=on"]))
    second = module(tmp_path, "fusion", "on")
    assert second.shards["MHD_0.h5"] == first.shards["MHD_0.h5"]
    assert os.stat(second.shards["MHD_0.h5"]).st_mtime_ns == before["MHD_0.h5"]  # not rewritten
    assert second.shards["MHD_1.h5"] != first.shards["MHD_1.h5"]
    assert not os.path.exists(first.shards["MHD_1.h5"])  # the stale shard is gone
    shards = list((tmp_path / "out_on" / "cache" / "fusion").glob("*/*.npy"))
    assert len(shards) == 2


def test_auto_caches_planes_cut_from_volumes_and_not_parquet_columns(tmp_path):
    root = tmp_path / "data"
    demo.write_fusion_plain(root / "MHD_0.h5", n_time=10, n=8, nz=16)
    demo.write_grid_parquet(root / "grid_0.parquet", n_rows=2000)
    assert module(tmp_path, "fusion", "auto").shards  # a plane is 1/16 of each volume
    assert not module(tmp_path, "grid", "auto").shards  # 8 bytes of state in ~25 bytes of file
    with pytest.raises(ValueError, match="data.cache must be one of auto, on, off"):
        module(tmp_path, "grid", "sometimes")
