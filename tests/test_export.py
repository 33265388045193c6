"""`export(cfg)` end to end on tiny trained checkpoints of the shared demo index."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from ebm_vae import EnergyMap, EnergyModel
from ebm_vae.config import compose
from ebm_vae.data.stats import Stats
from ebm_vae.energy.grid import GridError
from ebm_vae.energy.model import CheckpointError
from ebm_vae.export import export
from ebm_vae.train import train


@pytest.fixture(scope="module")
def trained(demo_index, tmp_path_factory):
    """paths.root holding checkpoints of grid (vector state) and fusion (field state), a few steps each."""
    root = tmp_path_factory.mktemp("export")
    for capsule in ("grid", "fusion"):
        train(compose("train", [f"capsule={capsule}", f"data.root={demo_index['data']}", f"paths.root={root}",
                                f"paths.index={demo_index['index']}", "debug=fast",
                                "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]))
    return root


def export_cfg(root, index, capsule="grid", *overrides):
    return compose("export", [f"capsule={capsule}", f"paths.root={root}", f"paths.index={index}",
                              "export.resolution=12", "export.k=4", "export.progress=false", *overrides])


def test_vae_export_writes_the_contract(trained, demo_index):
    out = export(export_cfg(trained, demo_index["index"]))
    assert out == trained / "energy_maps" / "grid.npz"
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    with np.load(out, allow_pickle=False) as data:
        assert sorted(data.files) == ["axis_0", "axis_1", "energy_map", "metadata"]
        assert data["energy_map"].dtype == np.float32 and data["energy_map"].shape == (12, 12)
        assert data["axis_0"].dtype == np.float64
        meta = json.loads(str(data["metadata"][()]))
    assert meta["capsule"] == "grid" and meta["method"] == "vae-iwae" and meta["k"] == 4
    assert [(a["name"], a["unit"]) for a in meta["axes"]] == [("frequency", "Hz"), ("phase_angle", "rad")]
    assert meta["reference_state"] == {}  # a 2-D state: nothing held off the grid
    assert meta["checkpoint"]["path"].endswith("checkpoints/grid/last.ckpt")
    assert {f["path"] for f in meta["source_files"]} == {"grid/grid_frequency_a.parquet",
                                                         "grid/grid_frequency_b.csv"}
    assert set(meta["normalization"]["mean"]) == {"frequency", "phase_angle"}
    assert "physical units" in meta["energy_definition"] and meta["created"]
    # default limits: mean +/- 4 std within the observed range (+10 %)
    stats = Stats.load(demo_index["index"] / "grid" / "stats.json")
    lo, hi = meta["axes"][0]["limits"]
    margin = 0.1 * (stats.max[0] - stats.min[0])
    assert stats.min[0] - margin <= lo < stats.mean[0] < hi <= stats.max[0] + margin
    energy_map = EnergyMap.load(out)
    assert np.all(np.isfinite(energy_map.energy_map))
    # the phase never leaves the observed range (no map of where no state can be)
    assert stats.min[1] <= meta["axes"][1]["limits"][0] < meta["axes"][1]["limits"][1] <= stats.max[1]
    assert [a["component"] for a in meta["axes"]] == [0, 1]
    states = np.array([[stats.mean[0], 0.0]])
    np.testing.assert_array_equal(energy_map.project(states), states)


def test_export_is_reproducible_for_a_seed_and_k1_is_the_elbo(trained, demo_index, tmp_path):
    a = EnergyMap.load(export(export_cfg(trained, demo_index["index"], "grid", f"export.out={tmp_path}/a.npz")))
    b = EnergyMap.load(export(export_cfg(trained, demo_index["index"], "grid", f"export.out={tmp_path}/b.npz",
                                         "export.plot=false")))
    np.testing.assert_array_equal(a.energy_map, b.energy_map)
    assert not (tmp_path / "b.png").exists()
    elbo = EnergyMap.load(export(export_cfg(trained, demo_index["index"], "grid", "export.k=1",
                                            f"export.out={tmp_path}/elbo.npz")))
    assert elbo.metadata["method"] == "vae-elbo" and elbo.metadata["k"] == 1


def test_field_state_slices_onto_principal_components(trained, demo_index, tmp_path):
    out = export(export_cfg(trained, demo_index["index"], "fusion", "export.resolution=6", "export.quantity=slice",
                            "+export.reference={pc3: 0.5}", f"export.out={tmp_path}/fusion.npz"))
    m = EnergyMap.load(out)
    assert m.axis_names == ["pc1", "pc2"] and m.axis_units == ["T", "T"]
    assert m.metadata["reference_state"] == {"pc3": 0.5, "pc4": 0.0}  # crawl.n_components=4
    assert set(m.metadata["normalization"]["channels"]) == {"Bx", "By", "Bz"}
    assert len(m.metadata["normalization"]["pca_std"]) == 4
    stats = Stats.load(demo_index["index"] / "fusion" / "stats.json")
    q = stats.quantiles["pc_values"][[0, -1], 0]  # the 0.1 % and 99.9 % quantiles of pc1, +10 % each side
    np.testing.assert_allclose(m.axes[0][[0, -1]], [q[0] - 0.1 * (q[1] - q[0]), q[1] + 0.1 * (q[1] - q[0])], rtol=1e-6)
    assert m.pc_vectors.shape == (2, 768) and m.pc_origin.shape == (768,)  # 3 x 16 x 16
    np.testing.assert_allclose(m.pc_vectors, stats.pca["components"][:2], atol=1e-6)
    # the origin is the mean plus the held pc3 coefficient: placing it on the map gives (0, 0)
    np.testing.assert_allclose(m.pc_origin, stats.mean + 0.5 * stats.pca["components"][2], atol=1e-5)
    np.testing.assert_allclose(m.project(m.pc_origin[None] + 0.3 * stats.pca["components"][:1]), [[0.3, 0.0]],
                               atol=1e-6)
    assert m.metadata["quantity"] == "slice" and m.energy_std is None


def test_field_state_maps_default_to_the_marginal(trained, demo_index, tmp_path, caplog):
    out = export(export_cfg(trained, demo_index["index"], "fusion", "export.resolution=6",
                            "+export.reference={pc3: 0.5}", f"export.out={tmp_path}/fusion.npz"))
    m = EnergyMap.load(out)
    stats = Stats.load(demo_index["index"] / "fusion" / "stats.json")
    assert m.metadata["quantity"] == "marginal" and m.metadata["reference_state"] == {}
    assert "export.reference {'pc3': 0.5} is ignored" in caplog.text
    marginal = m.metadata["marginal"]
    assert marginal["coordinates"].startswith("model coordinates of PrincipalField")
    assert marginal["exact_axes"] == [0, 1] and marginal["inner_k"] == 2
    assert np.all(np.isfinite(m.energy_map)) and m.energy_std.shape == (6, 6)
    assert np.all((m.energy_std >= 0) & (m.energy_std < 1.0))
    np.testing.assert_allclose(m.pc_origin, stats.mean, rtol=1e-6)  # nothing held: the origin is the mean
    # the marginal density integrates to about the mass on the grid (at most 1)
    volume = np.prod([a[1] - a[0] for a in m.axes])
    assert 0.5 < np.exp(-m.energy_map.astype(np.float64)).sum() * volume < 1.1


def test_one_axis_maps_integrate_or_hold_the_other_component(trained, demo_index, tmp_path):
    stats = Stats.load(demo_index["index"] / "grid" / "stats.json")
    marginal = EnergyMap.load(export(export_cfg(trained, demo_index["index"], "grid", "export.axes=[frequency]",
                                                f"export.out={tmp_path}/f.npz")))
    assert marginal.energy_map.shape == (12,) and marginal.axis_names == ["frequency"]
    assert marginal.metadata["quantity"] == "marginal" and marginal.metadata["reference_state"] == {}
    assert marginal.metadata["marginal"]["coordinates"].startswith("model coordinates of Standardize")
    assert marginal.energy_std.shape == (12,) and (tmp_path / "f.png").is_file()
    held = EnergyMap.load(export(export_cfg(trained, demo_index["index"], "grid", "export.axes=[frequency]",
                                            "export.quantity=slice", f"export.out={tmp_path}/s.npz")))
    assert held.metadata["quantity"] == "slice"
    assert held.metadata["reference_state"] == {"phase_angle": pytest.approx(stats.mean[1], rel=1e-6)}


def test_energy_model_takes_flat_or_shaped_field_states(trained):
    model = EnergyModel.from_checkpoint(trained / "checkpoints" / "fusion" / "last.ckpt", device="cpu")
    assert model.state_shape == (3, 16, 16) and model.state_names[1] == "Bx[0,1]"
    assert model.state_units[0] == "T" and model.capsule == "fusion"
    states = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)).double() * 0.1
    shaped = model.energy(states, k=2)
    np.testing.assert_array_equal(shaped, model.energy(states.reshape(2, -1).numpy(), k=2))
    assert shaped.shape == (2,) and np.all(np.isfinite(shaped))
    with pytest.raises(ValueError, match="states must have shape"):
        model.energy(np.zeros((2, 5)))


def test_histogram_export_counts_every_usable_file(trained, demo_index, tmp_path):
    out = export(export_cfg(trained, demo_index["index"], "grid", "export.method=histogram",
                            "export.resolution=10", f"export.out={tmp_path}/hist.npz"))
    m = EnergyMap.load(out)
    stats = Stats.load(demo_index["index"] / "grid" / "stats.json")
    report = m.metadata["histogram"]
    assert m.metadata["method"] == "histogram" and m.metadata["checkpoint"] is None
    assert report["n_total"] == stats.count  # every finite state, as the statistics pass counts them
    assert report["empty_bins"] == int(np.isposinf(m.energy_map).sum())
    # the density integrates to the fraction of states inside the grid
    volume = report["bin_volume"]
    mass = np.exp(-m.energy_map.astype(np.float64)).sum() * volume
    assert mass == pytest.approx(1 - report["n_outside_grid"] / report["n_total"], rel=1e-5)
    assert len(m.metadata["source_files"]) == 2 and m.metadata["skipped_files"] == []


def test_auto_counts_where_counting_resolves_the_map(trained, demo_index, tmp_path):
    """6,000 grid states on 8 x 8 bins: counted; on 128 x 128 bins they cannot fill the map."""
    coarse = EnergyMap.load(export(export_cfg(trained, demo_index["index"], "grid", "export.method=auto", "export.resolution=8",
                                              f"export.out={tmp_path}/coarse.npz")))
    assert coarse.metadata["method"] == "histogram"
    assert "counting resolves the map" in coarse.metadata["method_reason"]
    np.testing.assert_array_equal(coarse.support, np.round(coarse.support))  # the counts per bin
    fine = EnergyMap.load(export(export_cfg(trained, demo_index["index"], "grid", "export.method=auto",
                                            "export.resolution=128", "export.k=1",
                                            f"export.out={tmp_path}/fine.npz", "export.plot=false")))
    assert fine.metadata["method"] == "vae-elbo"
    assert "cannot resolve a 128 x 128 histogram" in fine.metadata["method_reason"]


def test_auto_rule_on_count_grids():
    from ebm_vae.energy.methods.auto import resolution

    x = np.linspace(-4, 4, 40)
    density = np.exp(-0.5 * (x[:, None] ** 2 + x[None, :] ** 2))
    full = np.round(5000 * density)
    empty, median, region = resolution(full)
    assert empty == 0.0 and median > 100 and 0.3 < region / full.size < 0.8
    holes = full.copy()
    holes[18, 10:30:2] = 0  # holes inside the landscape belong to the region
    assert resolution(holes)[0] == pytest.approx(10 / region)
    edge = full.copy()
    edge[:, 25:] = 0  # a sharp edge of the data: the empty space beyond it is not a hole
    assert resolution(edge)[0] == 0.0


def test_export_says_when_it_replaces_a_map(trained, demo_index, tmp_path, caplog):
    out = tmp_path / "again.npz"
    export(export_cfg(trained, demo_index["index"], "grid", f"export.out={out}", "export.plot=false"))
    assert "replacing" not in caplog.text
    export(export_cfg(trained, demo_index["index"], "grid", f"export.out={out}", "export.plot=false"))
    assert f"replacing {out} (vae-iwae map of 'grid' created" in caplog.text


def test_bad_requests_fail_naming_the_cause(trained, demo_index, tmp_path):
    index = demo_index["index"]
    grid_ckpt = trained / "checkpoints" / "grid" / "last.ckpt"
    with pytest.raises(ValueError, match="checkpoint of capsule 'grid'.*capsule='wafer'"):
        export(export_cfg(trained, index, "wafer", f"ckpt={grid_ckpt}"))
    with pytest.raises(GridError, match="export.limits"):
        export(export_cfg(trained, index, "grid", "export.limits=[[0,1],[0,1]]"))
    with pytest.raises(GridError, match="export.axes"):
        export(export_cfg(trained, index, "grid", "export.axes=[voltage]"))
    not_vae = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"lr": 1.0}}, not_vae)
    with pytest.raises(CheckpointError, match="other.ckpt"):
        export(export_cfg(trained, index, "grid", f"ckpt={not_vae}"))
    with pytest.raises(FileNotFoundError, match="wafer/last.ckpt"):
        export(export_cfg(trained, index, "wafer"))
    with pytest.raises(ValueError, match="a histogram counts the marginal"):
        export(export_cfg(trained, index, "fusion", "export.method=histogram", "export.quantity=slice"))
    with pytest.raises(ValueError, match="export.quantity must be one of marginal, slice"):
        export(export_cfg(trained, index, "grid", "export.quantity=joint"))


def test_a_failed_export_leaves_the_old_map(trained, demo_index, tmp_path, monkeypatch):
    out = tmp_path / "grid.npz"
    export(export_cfg(trained, demo_index["index"], "grid", f"export.out={out}", "export.plot=false"))
    before = out.read_bytes()

    def killed(fh, **arrays):
        fh.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", killed)
    with pytest.raises(KeyboardInterrupt):
        export(export_cfg(trained, demo_index["index"], "grid", f"export.out={out}", "export.plot=false"))
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.npz"]


def test_console_entry_point(trained, demo_index):
    """`python -m ebm_vae.export` is the `ebm-vae-export` script's Hydra main."""
    run = subprocess.run(
        [sys.executable, "-m", "ebm_vae.export", "capsule=grid", f"paths.root={trained}",
         f"paths.index={demo_index['index']}", "export.resolution=5", "export.k=2",
         "export.progress=false", "export.device=cpu", "export.out=${paths.root}/cli/grid.npz"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert (trained / "cli" / "grid.npz").is_file() and (trained / "cli" / "grid.png").is_file()
