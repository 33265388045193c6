"""The stream: sample-level accounting over ranks x workers, equal budgets, determinism,
bounded memory, bad files, the train/val split and the data module."""

from __future__ import annotations

import logging
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from omegaconf import OmegaConf, open_dict

from ebm_vae.capsules import visible_capsules
from ebm_vae.config import compose, config_dir
from ebm_vae.crawl.crawl import crawl
from ebm_vae.data import stream as stream_module
from ebm_vae.data.datamodule import CapsuleDataModule, StreamLoader, datamodule_from_config
from ebm_vae.data.extractors import EXTRACTORS
from ebm_vae.data.shuffle import WindowShuffle
from ebm_vae.data.stats import Moments, Stats
from ebm_vae.data.stream import StateStream, split_units
from ebm_vae.data.units import make_units, mark_finite, plan_units, split_warnings

# A user capsule whose first component is the row id: every sample is recognisable.
IDS_CAPSULE = """\
name: ids
match: {name: ["*ids*"]}
extractor: table
variables: [id, value]
units: ["", m]
"""


@pytest.fixture
def tree(tmp_path):
    """write(sizes) -> (manifest, capsule, cfg): Parquet files of consecutive ids, crawled."""
    root, conf = tmp_path / "data", tmp_path / "conf"
    (conf / "capsule").mkdir(parents=True)
    (conf / "capsule" / "ids.yaml").write_text(IDS_CAPSULE)

    def write(sizes, suffix=".parquet"):
        start = 0
        for i, n in enumerate(sizes):
            ids = np.arange(start, start + n, dtype=np.float64)
            path = root / f"ids_{i:02d}{suffix}"
            path.parent.mkdir(parents=True, exist_ok=True)
            if suffix == ".parquet":
                pq.write_table(pa.table({"id": ids, "value": np.sin(ids)}), path, row_group_size=100)
            else:
                path.write_text("id,value\n" + "".join(f"{int(k)},{float(np.sin(k))!r}\n" for k in ids))
            start += n
        cfg = compose("crawl", [f"data.root={root}", f"paths.root={tmp_path / 'out'}",
                                "crawl.workers=1", "crawl.progress=false", "crawl.stats=false"],
                      extra_dirs=[conf])
        capsule = visible_capsules([conf])["ids"]
        return crawl(cfg), capsule, cfg

    return write


def identity_stats(capsule) -> Stats:
    """Statistics of the ids capsule (the stream yields physical states: the raw ids)."""
    extractor = EXTRACTORS["table"](capsule)
    moments = Moments(1, np.zeros(2), np.ones(2), np.zeros(2), np.ones(2), np.zeros(2, np.int64),
                      np.zeros(2, np.int64))
    return Stats.from_moments("ids", extractor._state(), moments)


def make_stream(manifest, capsule, *, unit_samples=256, train=True, **kwargs):
    stats = identity_stats(capsule)
    extractor = EXTRACTORS["table"](capsule)
    units = make_units(manifest.usable("ids"), extractor, stats.state_info, unit_samples, 1 << 20)
    return StateStream(units, extractor, stats.state_info, manifest.root, train=train, **kwargs)


def run_epoch(stream, world=2, n_workers=2):
    """{(rank, worker): [batches of ids]} for every share of one epoch."""
    return {(r, w): [b[:, 0].astype(np.int64) for b in stream.iter_share(r, world, w, n_workers)]
            for r in range(world) for w in range(n_workers)}


def test_every_id_exactly_once_over_2_ranks_x_2_workers(tree):
    manifest, capsule, _ = tree([1024] * 4)
    stream = make_stream(manifest, capsule, batch_size=64, shuffle_buffer=200)
    shares = run_epoch(stream)
    assert stream.rank_budget(world=2) == 32
    for rank in (0, 1):
        assert sum(len(shares[rank, w]) for w in (0, 1)) == 32
    assert all(len(b) == 64 for batches in shares.values() for b in batches)
    ids = np.concatenate([b for batches in shares.values() for b in batches])
    assert sorted(ids.tolist()) == list(range(4096))


def test_uneven_files_equal_rank_budgets_and_the_documented_remainder(tree):
    sizes = [1000, 700, 333, 77]
    manifest, capsule, _ = tree(sizes)
    bs = 32
    stream = make_stream(manifest, capsule, unit_samples=128, batch_size=bs, shuffle_buffer=100)
    total = sum(sizes)
    budget = total // (2 * bs)
    assert stream.rank_budget(world=2) == budget
    for epoch in (0, 1):
        stream.set_epoch(epoch)
        shares = run_epoch(stream)
        for rank in (0, 1):
            assert sum(len(shares[rank, w]) for w in (0, 1)) == budget
            assert [len(shares[rank, w]) for w in (0, 1)] == [budget // 2 + (w < budget % 2) for w in (0, 1)]
        ids = np.concatenate([b for batches in shares.values() for b in batches])
        assert ids.min() >= 0 and ids.max() < total
        # the bound of the remainder policy, from the shares' sample counts
        order = np.random.default_rng([0, epoch]).permutation(len(stream.units))
        units = [stream.units[i] for i in order]
        bound = 0
        for r in (0, 1):
            for w in (0, 1):
                held = sum(u.n_samples for u in split_units(units, r, 2, w, 2))
                wanted = len(shares[r, w]) * bs
                bound += held - wanted if held > wanted else bs - 1
                in_share = np.concatenate(shares[r, w])
                if held >= wanted:  # no repeats within a share that has enough
                    assert len(np.unique(in_share)) == len(in_share)
        assert total - len(np.unique(ids)) <= bound


def test_shares_are_balanced_whatever_the_file_sizes(tree):
    manifest, capsule, _ = tree([3000, 10, 10, 500, 1])
    stream = make_stream(manifest, capsule, unit_samples=64, batch_size=16)
    loads = [sum(u.n_samples for u in split_units(stream.units, r, 2, w, 2)) for r in (0, 1) for w in (0, 1)]
    assert max(loads) - min(loads) <= 64
    assert sum(loads) == 3521


def test_deterministic_per_seed_and_epoch(tree):
    manifest, capsule, _ = tree([500, 300])
    stream = make_stream(manifest, capsule, unit_samples=64, batch_size=32, shuffle_buffer=128)

    def epoch_ids(s, epoch):
        s.set_epoch(epoch)
        return np.concatenate(list(s.iter_share(1, 2, 0, 2)))

    first = epoch_ids(stream, 3)
    np.testing.assert_array_equal(first, epoch_ids(stream, 3))
    assert not np.array_equal(first, epoch_ids(stream, 4))
    other_seed = make_stream(manifest, capsule, unit_samples=64, batch_size=32, shuffle_buffer=128, seed=1)
    assert not np.array_equal(first, epoch_ids(other_seed, 3))


def test_validation_stream_reads_every_sample_once_in_order(tree):
    manifest, capsule, _ = tree([250, 130])
    stream = make_stream(manifest, capsule, unit_samples=64, batch_size=50, train=False)
    shares = run_epoch(stream)
    for batches in shares.values():
        assert all(len(b) == 50 for b in batches[:-1]) and all(0 < len(b) <= 50 for b in batches)
    ids = np.concatenate([b for batches in shares.values() for b in batches])
    assert sorted(ids.tolist()) == list(range(380))
    with pytest.raises(TypeError):
        len(stream)


def test_memory_bounded_on_a_file_much_larger_than_the_window(tree, monkeypatch):
    manifest, capsule, _ = tree([20_000])
    seen = {"max_held": 0, "max_chunk": 0, "max_sources": 0, "windows": 0}

    class WatchedWindow(stream_module.WindowShuffle):
        def push(self, array, start=0, stop=None):
            seen["max_chunk"] = max(seen["max_chunk"], len(array))
            yield from super().push(array, start, stop)

        def _draw(self, placement, shift):  # the window is at its fullest when it draws
            seen["max_held"] = max(seen["max_held"], self.held)
            seen["max_sources"] = max(seen["max_sources"], len({id(a) for a, _, _ in self.pieces}))
            seen["windows"] += 1
            yield from super()._draw(placement, shift)

    monkeypatch.setattr(stream_module, "WindowShuffle", WatchedWindow)
    stream = make_stream(manifest, capsule, unit_samples=20_000, batch_size=64, shuffle_buffer=256,
                         chunk_bytes=100 * 8)
    batches = list(stream.iter_share(0, 1, 0, 1))
    assert len(batches) == 20_000 // 64
    # held: one window of 256 states, referencing at most the chunks (of <= 100 states) it spans
    assert seen["max_held"] == 256 and seen["max_chunk"] <= 100 and seen["max_sources"] <= 4
    assert seen["windows"] >= 20_000 // 256
    ids = np.concatenate(batches)[:, 0]
    assert len(np.unique(ids)) == len(ids)
    # a batch spreads over its window (256 consecutive rows here), never beyond it
    spans = [float(b[:, 0].max() - b[:, 0].min()) for b in batches]
    assert max(spans) < 256 and np.mean(spans) > 0.7 * 256


def test_field_buffer_is_capped_in_bytes(tree):
    manifest, capsule, _ = tree([100])
    stream = make_stream(manifest, capsule, batch_size=8, shuffle_buffer=10_000, shuffle_buffer_bytes=80 * 8)
    assert stream.shuffle_buffer == 80


def test_bad_files_are_skipped_with_a_reason(tree, caplog):
    manifest, capsule, _ = tree([200, 200, 200, 200], suffix=".parquet")
    root = manifest.root
    (root / "ids_00.parquet").unlink()
    with open(root / "ids_01.parquet", "ab") as fh:
        fh.write(b"appended")
    garbage = root / "ids_02.parquet"
    stat = garbage.stat()
    garbage.write_bytes(b"\0" * stat.st_size)
    os.utime(garbage, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    stream = make_stream(manifest, capsule, unit_samples=100, batch_size=20)
    with caplog.at_level(logging.WARNING):
        batches = list(stream.iter_share(0, 1, 0, 1))
    assert len(batches) == 800 // 20  # the budget holds: the good file is read again
    assert set(np.concatenate(batches)[:, 0].astype(int)) == set(range(600, 800))
    assert set(stream.skipped) == {"ids_00.parquet", "ids_01.parquet", "ids_02.parquet"}
    assert "No such file" in stream.skipped["ids_00.parquet"]
    assert "changed since the crawl" in stream.skipped["ids_01.parquet"]
    for name in stream.skipped:
        assert sum(f"skipping {name}:" in r.getMessage() for r in caplog.records) == 1


def test_non_finite_samples_are_dropped_and_counted(tree, tmp_path):
    ids = np.arange(10, dtype=np.float64)
    value = np.where(ids % 3 == 0, np.nan, ids)
    value[4] = np.inf
    (tmp_path / "data").mkdir()
    pq.write_table(pa.table({"id": ids, "value": value}), tmp_path / "data" / "ids_00.parquet")
    manifest, capsule, _ = tree([])
    stream = make_stream(manifest, capsule, batch_size=100, train=False)
    (batch,) = list(stream.iter_share(0, 1, 0, 1))
    assert sorted(batch[:, 0].astype(int).tolist()) == [1, 2, 5, 7, 8]
    assert stream.dropped == 5


def test_marked_finite_only_files_whose_statistics_found_every_state_finite(tree, tmp_path):
    """The statistics pass's per-file counts let the stream skip its finiteness test, only for
    the version of a file it read; a file with NaNs keeps the test and its drops."""
    (tmp_path / "data").mkdir()
    ids = np.arange(10, dtype=np.float64)
    pq.write_table(pa.table({"id": ids, "value": np.where(ids % 3 == 0, np.nan, ids)}),
                   tmp_path / "data" / "ids_00.parquet")
    pq.write_table(pa.table({"id": ids + 10, "value": ids}), tmp_path / "data" / "ids_01.parquet")
    manifest, capsule, _ = tree([])
    stats = identity_stats(capsule)
    extractor = EXTRACTORS["table"](capsule)
    units = make_units(manifest.usable("ids"), extractor, stats.state_info, 256, 1 << 20)
    records = [{"path": u.path, "size": u.size, "mtime_ns": u.mtime_ns, "n_read": 10,
                "n_finite": 6 if u.path.endswith("00.parquet") else 10} for u in units]
    stale = [{**r, "mtime_ns": r["mtime_ns"] + 1} for r in records]
    assert [u.finite for u in mark_finite(units, records)] == [False, True]
    assert not any(u.finite for u in mark_finite(units, stale))  # another version of the files
    stream = StateStream(mark_finite(units, records), extractor, stats.state_info, manifest.root,
                         batch_size=100, train=False)
    (batch,) = list(stream.iter_share(0, 1, 0, 1))
    assert sorted(batch[:, 0].astype(int).tolist()) == [1, 2, 4, 5, 7, 8, *range(10, 20)]
    assert stream.dropped == 4


@pytest.mark.parametrize("spatial", [(4, 5), (8, 12)])  # 60 and 288 components: both gather paths
def test_the_shuffle_takes_rows_of_any_layout_and_yields_flat_states(spatial):
    """A field read channels-last goes in as its channels-first view and comes out transposed
    by the shuffle's one copy, beside contiguous (n, D) sources."""
    rng = np.random.default_rng(0)
    view = np.moveaxis(rng.normal(size=(50, *spatial, 3)).astype(np.float32), -1, 1)  # (50, 3, h, w)
    assert not view.flags.c_contiguous
    dim = view[0].size
    plain = rng.normal(size=(30, dim)).astype(np.float32)
    shuffle = WindowShuffle(16, 8, dim, np.random.default_rng(1))
    got = np.concatenate([*shuffle.push(view, 3), *shuffle.push(plain), *shuffle.drain()])
    want = np.concatenate([np.ascontiguousarray(view[3:]).reshape(47, dim), plain])
    assert got.shape == (72, dim)  # 77 states: 9 whole batches, 5 wait for the next pass
    assert {r.tobytes() for r in got} <= {r.tobytes() for r in want}
    assert len({r.tobytes() for r in got}) == 72


def test_csv_units_split_bytes_and_cover_every_row(tree):
    manifest, capsule, _ = tree([300, 200], suffix=".csv")
    stats = identity_stats(capsule)
    extractor = EXTRACTORS["table"](capsule)
    units = make_units(manifest.usable("ids"), extractor, stats.state_info, 10**6, 700)
    assert len(units) > 4 and sum(u.n_samples for u in units) == 500
    stream = StateStream(units, extractor, stats.state_info, manifest.root, batch_size=64, train=False)
    ids = np.concatenate(list(stream.iter_share(0, 1, 0, 1)))[:, 0]
    assert sorted(ids.astype(int).tolist()) == list(range(500))


def split_ids(manifest, capsule, fraction=0.1, **kwargs):
    """(split, train ids, validation ids): every sample of each side, read through the stream."""
    stats = identity_stats(capsule)
    extractor = EXTRACTORS["table"](capsule)
    split = plan_units(manifest.usable("ids"), extractor, stats.state_info, kwargs.pop("unit_samples", 512),
                       kwargs.pop("unit_bytes", 4096), fraction, **kwargs)

    def ids(units):
        stream = StateStream(units, extractor, stats.state_info, manifest.root, batch_size=97, train=False)
        return np.concatenate([b[:, 0] for b in stream.iter_share(0, 1, 0, 1)] or [np.zeros(0)]).astype(int)

    return split, ids(split.train), ids(split.val)


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_validation_takes_a_fraction_of_every_file_spread_over_its_length(tree, suffix):
    sizes = [8760, 3000, 640]  # a year of hourly rows, and smaller files
    manifest, capsule, _ = tree(sizes, suffix=suffix)
    split, train, val = split_ids(manifest, capsule, 0.1)
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(sum(sizes)))  # each once
    starts = np.cumsum([0, *sizes])
    for k, n in enumerate(sizes):
        mine = val[(val >= starts[k]) & (val < starts[k + 1])] - starts[k]
        assert 0.06 < len(mine) / n < 0.14  # about val_fraction of this file ...
        tenths = np.unique(mine * 10 // n)
        assert len(tenths) >= 5  # ... in stretches over its whole length, not one season
        row = split.report()["files"][k]
        assert row["path"] == f"ids_{k:02d}{suffix}"
        if suffix == ".parquet":  # rows: the planned counts are exact
            assert (row["val_samples"], row["train_samples"]) == (len(mine), n - len(mine))
    report = split.report()
    assert report["train_files"] == report["val_files"] == 3 and report["only_val"] == []
    assert report["exact"] == (suffix == ".parquet")


def test_the_split_of_a_file_does_not_change_when_files_are_added(tree):
    manifest, capsule, _ = tree([2000] * 6)
    extractor = EXTRACTORS["table"](capsule)
    state = identity_stats(capsule).state_info
    everything = plan_units(manifest.usable("ids"), extractor, state, 300, 4096, 0.2)
    fewer = plan_units(manifest.usable("ids")[:3], extractor, state, 300, 4096, 0.2)
    assert fewer.files == everything.files[:3]
    assert set(fewer.val) <= set(everything.val) and set(fewer.train) <= set(everything.train)
    assert all(u.n_samples <= 300 for u in everything.train + everything.val)


def test_a_file_too_small_to_split_is_named_when_it_is_in_validation_only(tree, caplog):
    manifest, capsule, _ = tree([5000, 1])
    extractor = EXTRACTORS["table"](capsule)
    state = identity_stats(capsule).state_info
    for fraction in np.linspace(0.05, 0.95, 19):  # some fraction holds the one-row file out
        report = plan_units(manifest.usable("ids"), extractor, state, 512, 4096, fraction).report()
        if report["only_val"]:
            break
    assert report["only_val"] == ["ids_01.parquet"]
    assert "the model never trains on ids_01.parquet" in split_warnings(report)[0]
    one = plan_units(manifest.usable("ids")[1:], extractor, state, 512, 4096, 0.1).report()
    assert one["train_samples"] == 1  # a lone one-row file trains, whatever its hash


def test_a_single_short_file_still_has_both_sides(tree):
    manifest, capsule, _ = tree([12])
    split, train, val = split_ids(manifest, capsule, 0.1)
    assert len(train) and len(val) and sorted(np.concatenate([train, val]).tolist()) == list(range(12))


def test_a_derived_phase_file_is_split_by_sample_position(tmp_path):
    from ebm_vae import demo

    root = tmp_path / "data"
    demo.write_grid_csv(root / "grid_nophase.csv", n_rows=3000, with_phase=False)
    cfg = compose("crawl", [f"data.root={root}", f"paths.root={tmp_path / 'out'}", "crawl.workers=1",
                            "crawl.progress=false", "crawl.stats=false"])
    manifest = crawl(cfg)
    extractor = EXTRACTORS["grid"](visible_capsules()["grid"])
    (entry,) = manifest.usable("grid")
    from ebm_vae.data.units import WorkUnit, entry_plan, read_unit

    plan = entry_plan(extractor, entry)
    assert plan.whole_file
    everything = np.concatenate(list(read_unit(extractor, root, WorkUnit.whole(entry, plan), 256)))
    split = plan_units([entry], extractor, plan.state, 512, 1 << 20, 0.1)
    (train,), (val,) = split.train, split.val
    sides = [np.concatenate(list(read_unit(extractor, root, u, 256))) for u in (train, val)]
    assert [len(x) for x in sides] == [train.n_samples, val.n_samples] and len(sides[1]) > 200
    rows = {tuple(r) for r in everything.tolist()}
    assert {tuple(r) for r in sides[0].tolist()} | {tuple(r) for r in sides[1].tolist()} == rows
    assert not {tuple(r) for r in sides[0].tolist()} & {tuple(r) for r in sides[1].tolist()}


def test_datamodule_loaders_with_two_worker_processes(tree):
    manifest, capsule, cfg = tree([512] * 4)
    with open_dict(cfg):
        cfg.data.update(batch_size=64, num_workers=2, unit_samples=128, val_fraction=0.25,
                        shuffle_buffer=128)
    dm = CapsuleDataModule(cfg.data, capsule, manifest, identity_stats(capsule))
    assert dm.state.shape == (2,) and dm.stats.count == 1
    loader = dm.train_dataloader()
    epochs = iter([0, 1])
    loader.epoch_source = lambda: next(epochs)
    n_train = sum(u.n_samples for u in dm.train_units)
    assert len(loader) == n_train // 64
    seen = []
    for _ in range(2):
        batches = list(loader)
        assert len(batches) == len(loader)
        assert all(b.dtype == torch.float32 and b.shape == (64, 2) for b in batches)
        seen.append(torch.cat(batches)[:, 0].long())
    assert not torch.equal(seen[0], seen[1])  # the workers saw the new epoch
    # the same epoch in this process, worker by worker, gives the same ids
    stream = dm.stream(train=True)
    stream.set_epoch(1)
    expected = np.concatenate([np.concatenate(list(stream.iter_share(0, 1, w, 2))) for w in (0, 1)])
    assert sorted(seen[1].tolist()) == sorted(expected[:, 0].astype(int).tolist())

    def ids_of(units):
        return {512 * int(u.path[4:6]) + i for u in units for a, b in u.spans for i in range(a, b)}

    val = torch.cat(list(dm.val_dataloader()))[:, 0].long().tolist()
    assert sorted(val) == sorted(ids_of(dm.val_units)) and not ids_of(dm.val_units) & ids_of(dm.train_units)


def test_datamodule_from_config_crawls_and_runs_the_stats_pass(tmp_path):
    from ebm_vae import demo

    root = tmp_path / "data"
    demo.write_grid_parquet(root / "grid_a.parquet", n_rows=3000, buses=2)
    cfg = compose("crawl", [f"data.root={root}", f"paths.root={tmp_path / 'out'}", "crawl.workers=1",
                            "crawl.progress=false", "crawl.stats=false", "data.batch_size=128"])
    with open_dict(cfg):
        cfg.capsule = OmegaConf.load(config_dir() / "capsule" / "grid.yaml")
    dm = datamodule_from_config(cfg)
    assert (tmp_path / "out" / "index" / "grid" / "stats.json").is_file()
    assert dm.state.names == ("frequency", "phase_angle") and dm.stats.count == 6000
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (128, 2)
    assert abs(float(batch[:, 0].mean()) - 50.0) < 1.0  # physical units (Hz): the model z-scores


def test_counts_are_totalled_over_worker_processes_not_per_worker(tree, tmp_path):
    values = np.arange(400, dtype=np.float64)
    values[::10] = np.nan  # 40 NaN rows in one file
    (tmp_path / "data").mkdir()
    pq.write_table(pa.table({"id": np.arange(2000, 2400, dtype=np.float64), "value": values}),
                   tmp_path / "data" / "ids_10.parquet", row_group_size=100)
    manifest, capsule, cfg = tree([400] * 3)
    (manifest.root / "ids_02.parquet").unlink()  # gone after the crawl: skipped by every worker
    totals = []
    for workers in (0, 2):
        units = make_units(manifest.usable("ids"), EXTRACTORS["table"](capsule), identity_stats(capsule).state_info,
                           100, 1 << 20)
        stream = StateStream(units, EXTRACTORS["table"](capsule), identity_stats(capsule).state_info, manifest.root,
                             batch_size=50, train=False, n_slots=max(1, workers))
        loader = StreamLoader(stream, num_workers=workers)
        assert sum(len(b) for b in loader) == 1160  # every finite state of the readable files, once
        totals.append(stream.counters.totals())
    for t in totals:
        assert list(t["skipped"]) == ["ids_02.parquet"] and "No such file" in t["skipped"]["ids_02.parquet"]
        assert (t["read"], t["dropped"]) == (1200, 40)  # not once per worker, not lost in the workers


def test_rank_totals_merge_files_once():
    from ebm_vae.data.report import merge_totals

    merged = merge_totals([{"read": 10, "dropped": 1, "skipped": {"a": "gone"}},
                           {"read": 5, "dropped": 2, "skipped": {"a": "gone", "b": "changed"}}])
    assert merged == {"read": 15, "dropped": 3, "skipped_rows": 0, "skipped": {"a": "gone", "b": "changed"}}
