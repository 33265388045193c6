"""The statistics pass against numpy on the same data; Chan merges; NaN/Inf counts; PCA; flooring."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ebm_vae import demo
from ebm_vae.capsules import visible_capsules
from ebm_vae.config import compose
from ebm_vae.crawl.crawl import crawl
from ebm_vae.data.extractors.base import flat_states
from ebm_vae.data.principal import Reservoir
from ebm_vae.data.stats import Moments, Stats, merge_stats, run_stats_pass

USER_CAPSULE = """\
name: probe
match: {name: ["*probe*"]}
extractor: table
variables: [a, b, c]
units: [m, s, K]
"""


def crawl_tree(tmp_path, root):
    """Crawl `root` (with the user capsule `probe` visible); the config for the stats pass."""
    conf = tmp_path / "conf"
    (conf / "capsule").mkdir(parents=True, exist_ok=True)
    (conf / "capsule" / "probe.yaml").write_text(USER_CAPSULE)
    cfg = compose("crawl", [f"data.root={root}", f"paths.root={tmp_path / 'out'}", "crawl.workers=1",
                            "crawl.progress=false", "crawl.stats=false", "crawl.n_components=3",
                            "data.chunk_bytes=96"], extra_dirs=[conf])
    return crawl(cfg), cfg


def data_with_faults(seed: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal([1.0, -2.0, 300.0], [0.5, 3.0, 1e-3], size=(n, 3))
    x[rng.choice(n, 5, replace=False), 0] = np.nan
    x[rng.choice(n, 3, replace=False), 1] = np.inf
    x[rng.choice(n, 2, replace=False), 2] = -np.inf
    return x


def test_moments_equal_numpy_and_count_non_finite():
    x = data_with_faults(0, 500)
    chunks = np.array_split(x.astype(np.float32), [7, 8, 200, 450])
    m = Moments.empty(3)
    for chunk in chunks:
        m = m.merge(Moments.of(chunk))
    finite = x[np.isfinite(x).all(axis=1)].astype(np.float32).astype(np.float64)
    assert m.count == len(finite)
    np.testing.assert_allclose(m.mean, finite.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(m.raw_std, finite.std(axis=0), rtol=1e-9)
    np.testing.assert_array_equal(m.min, finite.min(axis=0))
    np.testing.assert_array_equal(m.max, finite.max(axis=0))
    assert m.nan_count.tolist() == [5, 0, 0] and m.inf_count.tolist() == [0, 3, 2]


def test_chan_merge_of_two_halves_equals_the_whole():
    x = np.random.default_rng(1).normal(5.0, 2.0, size=(1001, 4)).astype(np.float32)
    state = {"kind": "vector", "shape": [4], "names": list("abcd"), "units": ["m"] * 4,
             "channel_names": [], "channel_units": []}
    whole = Stats.from_moments("c", state, Moments.of(x))
    left = Stats.from_moments("c", state, Moments.of(x[:300]), files=[{"path": "a"}])
    right = Stats.from_moments("c", state, Moments.of(x[300:]), files=[{"path": "b"}])
    merged = merge_stats(left, right)
    assert merged.count == whole.count == 1001
    for key in ("mean", "std", "raw_std", "min", "max"):
        np.testing.assert_allclose(getattr(merged, key), getattr(whole, key), rtol=1e-10)
    assert [f["path"] for f in merged.files] == ["a", "b"]
    with pytest.raises(ValueError, match="cannot merge"):
        merge_stats(left, Stats.from_moments("other", state, Moments.of(x)))


def test_reservoirs_merge_to_the_same_sample_in_any_order_and_grouping():
    states = np.arange(10_000, dtype=np.float32)[:, None]
    parts = np.array_split(np.arange(10_000), [17, 6000, 6001])

    def reservoir_of(rows, seed):
        r = Reservoir(50, 1, seed=seed)
        for chunk in np.array_split(rows, 3):
            r.add(states[chunk])
        return r

    def files():  # one reservoir per part, seeded per part (per file in the pass)
        return [reservoir_of(rows, seed) for seed, rows in enumerate(parts)]

    a, b, c, d = files()
    left = a.merge(b).merge(c).merge(d)  # one process, in file order
    a, b, c, d = files()
    ranks = d.merge(c).merge(b.merge(a))  # two ranks, merged the other way round
    np.testing.assert_array_equal(left.sample, ranks.sample)
    assert left.seen == 10_000 and left.sample.shape == (50, 1) and len(np.unique(left.sample)) == 50
    assert left.sample.max() > 5000  # later states do get in
    few = reservoir_of(np.arange(30), 0)
    assert sorted(few.sample[:, 0]) == list(range(30))  # fewer than the size: every state


def test_stats_pass_equals_numpy_on_csv_and_parquet(tmp_path, caplog):
    root = tmp_path / "data"
    root.mkdir()
    x1, x2 = data_with_faults(2, 300), data_with_faults(3, 200)
    x2[:, 2] = 300.0  # component c is constant over the finite rows of x2 ...
    x1[:, 2] = 300.0  # ... and of x1: floored
    lines = "".join(",".join(repr(float(v)) for v in row) + "\n" for row in x1)
    (root / "probe_1.csv").write_text("a,b,c\n" + lines.replace("inf", "Infinity"))
    pq.write_table(pa.table({"c": x2[:, 2], "a": x2[:, 0], "b": x2[:, 1]}), root / "probe_2.parquet",
                   row_group_size=64)
    manifest, cfg = crawl_tree(tmp_path, root)
    capsule = visible_capsules([tmp_path / "conf"])["probe"]
    with caplog.at_level(logging.WARNING):
        stats = run_stats_pass(manifest, capsule, cfg.paths.index, cfg)
    x = np.concatenate([x1, x2]).astype(np.float32)
    finite = x[np.isfinite(x).all(axis=1)].astype(np.float64)
    assert stats.count == len(finite)
    np.testing.assert_allclose(stats.mean, finite.mean(axis=0), rtol=1e-10)
    np.testing.assert_allclose(stats.raw_std, finite.std(axis=0), rtol=1e-7, atol=1e-12)
    np.testing.assert_array_equal(stats.min, finite.min(axis=0))
    np.testing.assert_array_equal(stats.max, finite.max(axis=0))
    assert stats.nan_count.tolist() == np.isnan(x).sum(axis=0).tolist() == [10, 0, 0]
    assert stats.inf_count.tolist() == np.isinf(x).sum(axis=0).tolist() == [0, 6, 0]
    assert stats.floored == [2] and stats.std[2] > 0 and "std floored: c" in caplog.text
    assert stats.pca is None and stats.state["names"] == ["a", "b", "c"]
    assert stats.log_jacobian == pytest.approx(np.log(stats.std).sum())
    saved = Stats.load(tmp_path / "out" / "index" / "probe" / "stats.json")
    np.testing.assert_array_equal(saved.mean, stats.mean)
    assert [f["path"] for f in saved.files] == ["probe_1.csv", "probe_2.parquet"]
    # every finite state fits the reservoir: the quantiles are numpy's of the whole data
    np.testing.assert_allclose(saved.quantiles["values"], np.quantile(finite, saved.quantiles["levels"], axis=0),
                               rtol=1e-12)
    assert saved.state_info.units == ("m", "s", "K")


def test_field_stats_skip_a_minority_shape_and_keep_a_principal_basis(tmp_path, caplog):
    root = tmp_path / "data"
    demo.write_fusion_plain(root / "plasma_a.h5", n_time=6, n=8, nz=4, seed=1)
    demo.write_fusion_plain(root / "plasma_b.h5", n_time=6, n=8, nz=4, seed=2)
    demo.write_fusion_plain(root / "plasma_small.h5", n_time=6, n=4, nz=4, seed=3)
    manifest, cfg = crawl_tree(tmp_path, root)
    with caplog.at_level(logging.WARNING):
        stats = run_stats_pass(manifest, visible_capsules()["fusion"], cfg.paths.index, cfg)
    assert "skipping plasma_small.h5: state shape (3, 4, 4)" in caplog.text
    assert stats.count == 12 and stats.state["shape"] == [3, 8, 8]
    components, std = stats.pca["components"], stats.pca["std"]
    assert components.shape == (3, 192) and std.shape == (3,)
    np.testing.assert_allclose(components @ components.T, np.eye(3), atol=1e-9)
    assert np.all(np.diff(std) <= 0) and std[0] > 0
    # std along the first component equals the spread of the (here: all) states projected on it
    from ebm_vae.data.extractors import EXTRACTORS
    from ebm_vae.data.readers import READERS

    ex = EXTRACTORS["fusion"](visible_capsules()["fusion"])
    states = []
    for name in ("plasma_a.h5", "plasma_b.h5"):
        plan = ex.plan(READERS["hdf5"].inspect(root / name))
        with READERS["hdf5"].open(root / name) as h:
            states += map(flat_states, ex.iter_states(h, plan, 0, plan.extent, 100))
    projected = (np.concatenate(states) - stats.mean) @ components[0]
    assert np.sqrt(np.mean(projected**2)) == pytest.approx(std[0], rel=1e-5)
    # quantiles of the principal coefficients (not of 192 pixels)
    assert set(stats.quantiles) == {"levels", "pc_values"} and stats.quantiles["pc_values"].shape == (7, 3)
    np.testing.assert_allclose(stats.quantiles["pc_values"][:, 0],
                               np.quantile(projected, stats.quantiles["levels"]), rtol=1e-5, atol=1e-9)


# --------------------------------------------------------------------------- at scale


def fusion_tree(tmp_path, n_files=6):
    root = tmp_path / "data"
    for k in range(n_files):
        demo.write_fusion_plain(root / f"plasma_{k}.h5", n_time=5 + k, n=8, nz=2, seed=k)
    cfg = compose("crawl", [f"data.root={root}", f"paths.root={tmp_path / 'out'}", "crawl.workers=1",
                            "crawl.progress=false", "crawl.stats=false", "crawl.n_components=3",
                            "crawl.stats_reservoir=16", "data.chunk_bytes=2000"])
    return crawl(cfg), cfg


def assert_same_stats(a: Stats, b: Stats, rtol: float = 0.0) -> None:
    assert a.count == b.count and a.files == b.files and a.skipped == b.skipped
    for key in ("mean", "raw_std", "min", "max", "nan_count", "inf_count"):
        np.testing.assert_allclose(getattr(a, key), getattr(b, key), rtol=rtol, atol=0)
    np.testing.assert_allclose(a.pca["std"], b.pca["std"], rtol=max(rtol, 1e-12) * 1e3)
    np.testing.assert_allclose(np.abs(a.pca["components"] @ b.pca["components"].T), np.eye(3), atol=1e-8)
    np.testing.assert_allclose(a.quantiles["pc_values"], b.quantiles["pc_values"], rtol=max(rtol, 1e-12) * 1e3)


def test_the_pass_is_the_same_in_one_process_and_in_two(tmp_path):
    manifest, cfg = fusion_tree(tmp_path)
    one = run_stats_pass(manifest, visible_capsules()["fusion"], cfg.paths.index,
                         compose("crawl", [*cfg_overrides(cfg), "crawl.stats_workers=0"]))
    two = run_stats_pass(manifest, visible_capsules()["fusion"], cfg.paths.index,
                         compose("crawl", [*cfg_overrides(cfg), "crawl.stats_workers=2"]))
    assert_same_stats(one, two)  # files merged in path order: not a bit differs
    assert one.count == sum(5 + k for k in range(6)) and len(one.pca["std"]) == 3


def cfg_overrides(cfg) -> list[str]:
    return [f"data.root={cfg.data.root}", f"paths.root={cfg.paths.root}", "crawl.progress=false",
            "crawl.stats=false", "crawl.n_components=3", "crawl.stats_reservoir=16", "data.chunk_bytes=2000"]


STATS_ON_A_RANK = """
import json, sys
import torch
from ebm_vae.capsules import visible_capsules
from ebm_vae.config import compose
from ebm_vae.crawl.manifest import read_manifest
from ebm_vae.data.stats import run_stats_pass

torch.set_num_threads(1)
cfg = compose("crawl", sys.argv[2:])
stats = run_stats_pass(read_manifest(cfg.paths.index), visible_capsules()["fusion"], sys.argv[1], cfg)
print(json.dumps({"count": stats.count, "files": len(stats.files)}))
"""


def test_two_gloo_ranks_share_the_files_and_agree_with_one_process(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    manifest, cfg = fusion_tree(tmp_path)
    single = run_stats_pass(manifest, visible_capsules()["fusion"], tmp_path / "single",
                            compose("crawl", [*cfg_overrides(cfg), "crawl.stats_workers=1"]))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    children = []
    for rank in range(2):  # what torchrun gives each rank
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        children.append(subprocess.Popen(
            [sys.executable, "-c", STATS_ON_A_RANK, str(tmp_path / "ranks"), *cfg_overrides(cfg)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [child.communicate(timeout=240)[0] for child in children]
    assert [child.returncode for child in children] == [0, 0], outputs
    assert all('"files": 6' in out for out in outputs)  # every rank ends with the whole result
    ranked = Stats.load(tmp_path / "ranks" / "fusion" / "stats.json")  # written by rank 0
    assert_same_stats(ranked, single, rtol=1e-13)  # ranks merged: equal to float64 rounding
    assert not list((tmp_path / "ranks" / "fusion").glob("stats.partial-*"))


KILLED_PASS = """
import sys, time
from ebm_vae.capsules import visible_capsules
from ebm_vae.config import compose
from ebm_vae.crawl.manifest import read_manifest
from ebm_vae.data import filepass
from ebm_vae.data.stats import run_stats_pass

read_file = filepass.read_file

def slowly(*args, **kwargs):  # a slow drive: the kill lands between files
    time.sleep(0.3)
    return read_file(*args, **kwargs)

filepass.read_file = slowly
cfg = compose("crawl", sys.argv[1:])
run_stats_pass(read_manifest(cfg.paths.index), visible_capsules()["fusion"], cfg.paths.index, cfg)
"""


def test_a_killed_pass_resumes_from_its_checkpoint_with_the_same_result(tmp_path, caplog):
    import os
    import signal
    import subprocess
    import sys
    import time

    manifest, cfg = fusion_tree(tmp_path)
    overrides = [*cfg_overrides(cfg), "crawl.stats_workers=1", "crawl.checkpoint_s=0"]
    checkpoint = tmp_path / "out" / "index" / "fusion" / "stats.partial-0-of-1.npz"
    child = subprocess.Popen([sys.executable, "-c", KILLED_PASS, *overrides], start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not checkpoint.exists():
        assert child.poll() is None and time.monotonic() < deadline, child.stdout.read()[-2000:]
        time.sleep(0.01)
    time.sleep(0.4)
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    assert not (tmp_path / "out" / "index" / "fusion" / "stats.json").exists()
    with caplog.at_level(logging.INFO, logger="ebm_vae.data.stats"):
        resumed = run_stats_pass(manifest, visible_capsules()["fusion"], cfg.paths.index, compose("crawl", overrides))
    done = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resuming the statistics pass")]
    assert done and "after 0 files" not in done[0] and "after 6 files" not in done[0]
    fresh = run_stats_pass(manifest, visible_capsules()["fusion"], tmp_path / "fresh", compose("crawl", overrides))
    assert_same_stats(resumed, fresh)
    assert not checkpoint.exists()
