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
from ebm_vae.data.stats import Moments, Reservoir, Stats, merge_stats, run_stats_pass

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


def test_reservoir_is_bounded_and_holds_every_state_until_full():
    r = Reservoir(50, 1, seed=0)
    r.add(np.arange(30, dtype=np.float32)[:, None])
    assert sorted(r.sample[:, 0]) == list(range(30))
    for start in range(30, 10_000, 997):
        r.add(np.arange(start, min(start + 997, 10_000), dtype=np.float32)[:, None])
    assert r.sample.shape == (50, 1) and len(np.unique(r.sample)) == 50
    assert r.sample.max() > 5000  # later states do get in


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
            states += list(ex.iter_states(h, plan, 0, plan.extent, 100))
    projected = (np.concatenate(states) - stats.mean) @ components[0]
    assert np.sqrt(np.mean(projected**2)) == pytest.approx(std[0], rel=1e-5)
    # quantiles of the principal coefficients (not of 192 pixels)
    assert set(stats.quantiles) == {"levels", "pc_values"} and stats.quantiles["pc_values"].shape == (7, 3)
    np.testing.assert_allclose(stats.quantiles["pc_values"][:, 0],
                               np.quantile(projected, stats.quantiles["levels"]), rtol=1e-5, atol=1e-9)
