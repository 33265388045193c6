"""EnergyMap file contract, interpolation, minima, pictures; state grids and exact histograms."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ebm_vae import EnergyMap
from ebm_vae.data.extractors.base import StateInfo
from ebm_vae.energy.grid import GridError, GridStats, StateGrid
from ebm_vae.energy.histogram import HistogramCounts
from ebm_vae.energy.mapfile import EnergyMapError
from ebm_vae.energy.plot import axis_label, plot_map


def make_map(ndim: int, seed: int = 0, method: str = "vae-iwae") -> EnergyMap:
    rng = np.random.default_rng(seed)
    axes = [np.sort(rng.uniform(-3, 3, 5 + d)) for d in range(ndim)]
    values = rng.uniform(0, 10, tuple(len(a) for a in axes)).astype(np.float32)
    meta = {"capsule": "toy", "method": method, "k": None,
            "axes": [{"name": f"x{d}", "unit": "m"} for d in range(ndim)]}
    return EnergyMap(values, axes, meta)


def grid_points(m: EnergyMap) -> np.ndarray:
    mesh = np.meshgrid(*m.axes, indexing="ij")
    return np.stack([g.ravel() for g in mesh], axis=1)


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_save_load_roundtrip_without_pickle(tmp_path, ndim):
    m = make_map(ndim)
    m.metadata["note"] = float("inf")  # non-finite metadata must still give strict JSON
    path = m.save(tmp_path / "maps" / "toy.npz")
    with np.load(path, allow_pickle=False) as data:
        assert sorted(data.files) == sorted(["energy_map", "metadata"] + [f"axis_{d}" for d in range(ndim)])
        assert data["energy_map"].dtype == np.float32
        assert all(data[f"axis_{d}"].dtype == np.float64 for d in range(ndim))
        assert data["metadata"].shape == ()
        meta = json.loads(str(data["metadata"][()]))
    assert meta["capsule"] == "toy" and meta["note"] is None
    loaded = EnergyMap.load(path)
    np.testing.assert_array_equal(loaded.energy_map, m.energy_map)
    assert loaded.axis_names == [f"x{d}" for d in range(ndim)] and loaded.axis_units == ["m"] * ndim
    assert list(tmp_path.joinpath("maps").iterdir()) == [path]  # no temp file left beside it


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_interpolation_is_exact_at_grid_points_and_inf_outside(ndim):
    m = make_map(ndim)
    np.testing.assert_array_equal(m.energy(grid_points(m)), m.energy_map.ravel().astype(np.float64))
    outside = np.array([[a[-1] + 1e-9 if d == 0 else a[0] for d, a in enumerate(m.axes)],
                        [a[0] - 1.0 for a in m.axes],
                        [np.nan] * ndim])
    assert np.all(np.isposinf(m.energy(outside)))


def test_interpolation_is_multilinear():
    axes = [np.array([0.0, 1.0, 3.0]), np.array([-1.0, 0.5, 2.0, 4.0])]
    x, y = np.meshgrid(*axes, indexing="ij")
    m = EnergyMap(2 * x - 3 * y + 0.5 * x * y + 1, axes, {})  # multilinear: reproduced exactly
    pts = np.random.default_rng(1).uniform([0, -1], [3, 4], size=(200, 2))
    want = 2 * pts[:, 0] - 3 * pts[:, 1] + 0.5 * pts[:, 0] * pts[:, 1] + 1
    # Bilinear within each cell equals the bilinear function, up to float32 storage of the grid.
    np.testing.assert_allclose(m.energy(pts), want, atol=1e-5)


def test_empty_neighbour_makes_interpolation_infinite_only_where_it_weighs():
    m = EnergyMap(np.array([[1.0, 2.0], [np.inf, 4.0]]), [np.array([0.0, 1.0]), np.array([0.0, 1.0])], {})
    e = m.energy([[0.0, 0.5], [0.5, 0.5], [1.0, 1.0], [0.0, 0.0]])
    np.testing.assert_array_equal(e, [1.5, np.inf, 4.0, 1.0])


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_histogram_map_returns_the_energy_of_the_own_bin(ndim):
    m = make_map(ndim, method="histogram")
    np.testing.assert_array_equal(m.energy(grid_points(m)), m.energy_map.ravel().astype(np.float64))
    # every point of a bin (edges halfway between grid points) gets that bin's energy
    rng = np.random.default_rng(3)
    index = tuple(rng.integers(0, len(a), 200) for a in m.axes)
    lo = [np.where(i > 0, 0.5 * (a[i] + a[np.maximum(i - 1, 0)]), a[0] - 0.5 * (a[1] - a[0]))
          for a, i in zip(m.axes, index, strict=True)]
    hi = [np.where(i < len(a) - 1, 0.5 * (a[i] + a[np.minimum(i + 1, len(a) - 1)]), a[-1] + 0.5 * (a[-1] - a[-2]))
          for a, i in zip(m.axes, index, strict=True)]
    points = np.stack([rng.uniform(low, high - 1e-9)
                       for low, high in zip(lo, hi, strict=True)], axis=1)
    np.testing.assert_array_equal(m.energy(points), m.energy_map[index].astype(np.float64))
    # outside the outer bin edges: +inf; just inside them: the outer bin
    first = np.array([[a[0] - 0.49 * (a[1] - a[0]) for a in m.axes]])
    past = np.array([[a[0] - 0.51 * (a[1] - a[0]) for a in m.axes]])
    assert m.energy(first)[0] == m.energy_map[(0,) * ndim]
    assert np.isposinf(m.energy(past)[0])


def test_histogram_lookup_ignores_an_empty_neighbour():
    """A common state next to an empty bin keeps its own bin's energy (issue: +inf before)."""
    axes = [np.array([20.0, 21.0, 22.0, 23.0]), np.array([85.0, 90.0, 95.0])]
    values = np.full((4, 3), 7.0)
    values[3, 1] = np.inf  # the bin at (23, 90) is empty
    values[2, 1] = 6.8
    m = EnergyMap(values, axes, {"method": "histogram"})
    assert m.energy([[22.0, 90.0], [22.4, 91.0]]).tolist() == [pytest.approx(6.8)] * 2
    assert np.isposinf(m.energy([[22.6, 90.0]])[0])
    learned = EnergyMap(values, axes, {"method": "vae-iwae"})
    assert np.isposinf(learned.energy([[22.4, 90.0]])[0])  # interpolation weighs the empty corner


def test_optional_arrays_roundtrip_and_project(tmp_path):
    rng = np.random.default_rng(0)
    basis, _ = np.linalg.qr(rng.standard_normal((12, 2)))
    origin = rng.normal(size=12)
    axes = [np.linspace(-1, 1, 4), np.linspace(-2, 2, 5)]
    m = EnergyMap(np.zeros((4, 5)), axes, {"method": "vae-iwae"}, energy_std=np.full((4, 5), 0.1),
                  support=np.arange(20.0).reshape(4, 5), pc_vectors=basis.T, pc_origin=origin)
    loaded = EnergyMap.load(m.save(tmp_path / "pc.npz"))
    with np.load(tmp_path / "pc.npz", allow_pickle=False) as data:
        assert data["energy_std"].dtype == np.float32 and data["support"].dtype == np.float32
        assert data["pc_vectors"].dtype == np.float64 and data["pc_origin"].shape == (12,)
    np.testing.assert_array_equal(loaded.support, m.support)
    coords = np.array([[0.5, -1.0], [0.0, 0.0]])
    states = origin + coords @ basis.T
    np.testing.assert_allclose(loaded.project(states), coords, atol=1e-12)
    np.testing.assert_allclose(loaded.project(states.reshape(2, 3, 2, 2)), coords, atol=1e-12)
    with pytest.raises(EnergyMapError, match="energy_std shape"):
        EnergyMap(np.zeros((4, 5)), axes, {}, energy_std=np.zeros((5, 4)))
    with pytest.raises(EnergyMapError, match="come together"):
        EnergyMap(np.zeros((4, 5)), axes, {}, pc_vectors=basis.T)


def test_project_picks_the_axis_components():
    meta = {"axes": [{"name": "c", "component": 2}, {"name": "a", "component": 0}],
            "state": {"shape": [3]}}
    m = EnergyMap(np.zeros((2, 2)), [np.arange(2.0), np.arange(2.0)], meta)
    np.testing.assert_array_equal(m.project([[1.0, 2.0, 3.0]]), [[3.0, 1.0]])
    with pytest.raises(ValueError, match="components"):
        m.project([[1.0, 2.0]])
    with pytest.raises(ValueError, match="does not record"):
        make_map(2).project([[1.0, 2.0]])


def test_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = make_map(2, seed=0).save(tmp_path / "toy.npz")
    before = path.read_bytes()

    def broken_savez(fh, **arrays):
        fh.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        make_map(2, seed=1).save(path)
    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]


def test_load_rejects_a_non_map_naming_the_file(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, something=np.zeros(3))
    with pytest.raises(EnergyMapError, match="bad.npz"):
        EnergyMap.load(bad)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, energy_map=np.zeros((2, 2)), axis_0=np.arange(2.0), axis_1=np.arange(2.0),
             metadata=np.array({"a": 1}, dtype=object))
    with pytest.raises(EnergyMapError, match="pickled.npz"):
        EnergyMap.load(pickled)


def test_minima_find_both_wells():
    x = np.linspace(-2, 2, 41)
    xx, yy = np.meshgrid(x, x, indexing="ij")
    energy = (xx**2 - 1) ** 2 + 0.3 * xx + yy**2
    m = EnergyMap(energy, [x, x], {})
    minima = m.minima(radius=2)
    assert len(minima) == 2
    np.testing.assert_allclose(minima[0].point, [-1.0, 0.0], atol=0.1)
    np.testing.assert_allclose(minima[1].point, [1.0, 0.0], atol=0.1)
    assert minima[0].energy < minima[1].energy


@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("extras", [False, True])
def test_plot_writes_a_png(tmp_path, ndim, extras):
    m = make_map(ndim)
    m.energy_map.flat[0] = np.inf
    if extras:
        m = EnergyMap(m.energy_map, m.axes, m.metadata, energy_std=np.full(m.energy_map.shape, 0.2),
                      support=np.where(m.energy_map > 5, 0.0, 10.0))
    png = plot_map(m, tmp_path / "toy.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_axis_labels_do_not_repeat_the_unit():
    assert axis_label("GHI (W/m^2)", "W/m^2") == "GHI (W/m^2)"
    assert axis_label("ghi", "W/m^2") == "ghi [W/m^2]"
    assert axis_label("pc1", "") == "pc1"


# -- grids ------------------------------------------------------------------------------------

VECTOR = StateInfo(kind="vector", shape=(3,), names=("f", "phase", "p"), units=("Hz", "rad", "W"))
VECTOR_STATS = GridStats(mean=np.array([50.0, 0.0, 10.0]), std=np.array([0.1, 1.0, 2.0]),
                         lo=np.array([49.8, -3.0, 0.0]), hi=np.array([50.3, 3.0, 100.0]))


def test_vector_grid_defaults_and_reference():
    grid = StateGrid.build(VECTOR, VECTOR_STATS, resolution=5, reference={"p": 12.5})
    assert [a.name for a in grid.axes] == ["f", "phase"] and grid.shape == (5, 5)
    # f: mean +/- 4 std = [49.6, 50.4], clipped to [49.8, 50.3] widened by 10 % of the range.
    np.testing.assert_allclose(grid.axes[0].values[[0, -1]], [49.75, 50.35])
    np.testing.assert_allclose(grid.axes[1].values[[0, -1]], [-3.6, 3.6])
    states = grid.states(0, grid.n_points)
    assert states.shape == (25, 3)
    np.testing.assert_array_equal(states[:, 2], 12.5)
    np.testing.assert_array_equal(grid.project(states), grid.points(0, 25))
    np.testing.assert_array_equal(grid.states(7, 9), states[7:9])  # chunks are slices of the whole
    assert grid.reference_metadata() == {"p": 12.5}


def test_default_limits_from_quantiles_within_the_data_and_the_bounds(caplog):
    levels = [0.001, 0.005, 0.01, 0.5, 0.99, 0.995, 0.999]
    values = np.tile(np.array([[49.9, 50.2, 5.0]]), (7, 1))
    values[-1] = [50.1, 2.9, 60.0]
    values[0] = [49.9, -2.9, 5.0]
    stats = GridStats(mean=np.array([50.0, 0.0, 10.0]), std=np.array([0.1, 1.0, 2.0]),
                      lo=np.array([49.8, -3.0, 0.0]), hi=np.array([50.3, 3.0, 100.0]),
                      quantiles={"levels": levels, "values": values})
    grid = StateGrid.build(VECTOR, stats, axes=["f", "phase", "p"], resolution=5, bounds={"p": [0, 50]})
    # f: [49.9, 50.1] +/- 10 % of 0.2; phase: [-2.9, 2.9] +/- 0.58, cut at the observed [-3, 3];
    # p: [5, 60] +/- 5.5, cut at the observed minimum 0 and the bound 50
    np.testing.assert_allclose([a.values[[0, -1]] for a in grid.axes],
                               [[49.88, 50.12], [-3.0, 3.0], [0.0, 50.0]], atol=1e-9)
    StateGrid.build(VECTOR, stats, axes=["p"], limits=[[-10.0, 40.0]], bounds={"p": [0, None]})
    assert "crosses its physical bounds [0, None]" in caplog.text


def test_grid_errors_name_the_key():
    with pytest.raises(GridError, match="export.axes.*unknown"):
        StateGrid.build(VECTOR, VECTOR_STATS, axes=["f", "nope"])
    with pytest.raises(GridError, match="export.limits"):
        StateGrid.build(VECTOR, VECTOR_STATS, axes=["f"], limits=[[60.0, 70.0]])
    with pytest.raises(GridError, match="export.limits"):
        StateGrid.build(VECTOR, VECTOR_STATS, axes=["f"], limits=[[1.0, 2.0], [3.0, 4.0]])
    with pytest.raises(GridError, match="export.reference"):
        StateGrid.build(VECTOR, VECTOR_STATS, reference={"f": 50.0})
    with pytest.raises(GridError, match="export.axes"):
        StateGrid.build(VECTOR, VECTOR_STATS, axes=["pc1"])


def test_limits_beyond_the_data_warn(caplog):
    StateGrid.build(VECTOR, VECTOR_STATS, axes=["f"], limits=[[49.0, 50.0]])
    assert "export.limits" in caplog.text


def test_pc_grid_builds_fields_from_the_basis_and_projects_back():
    state = StateInfo.field(["T"], ["K"], (4, 4))
    rng = np.random.default_rng(0)
    basis, _ = np.linalg.qr(rng.standard_normal((16, 16)))
    stats = GridStats(mean=rng.uniform(290, 310, 16), std=np.ones(16),
                      pca_components=basis.T[:5], pca_std=np.array([5.0, 3.0, 2.0, 1.0, 0.5]))
    grid = StateGrid.build(state, stats, resolution=7, reference={"pc3": 1.5})
    assert [a.name for a in grid.axes] == ["pc1", "pc2"] and grid.axes[0].unit == "K"
    np.testing.assert_allclose(grid.axes[0].values[[0, -1]], [-20.0, 20.0])
    states = grid.states(0, grid.n_points)
    assert states.shape == (49, 16)
    np.testing.assert_allclose(grid.project(states), grid.points(0, 49), atol=1e-9)
    centre = states[24]  # pc1 = pc2 = 0: the mean plus the held pc3 coefficient
    np.testing.assert_allclose(centre, stats.mean + 1.5 * stats.pca_components[2], atol=1e-9)
    assert grid.reference_metadata() == {"pc3": 1.5, "pc4": 0.0, "pc5": 0.0}


# -- histograms -------------------------------------------------------------------------------

def test_histogram_density_is_per_unit_volume_and_reports_empty_bins():
    state = StateInfo(kind="vector", shape=(2,), names=("a", "b"), units=("m", "s"))
    stats = GridStats(mean=np.zeros(2), std=np.ones(2))
    grid = StateGrid.build(state, stats, limits=[[-1.0, 1.0], [0.0, 4.0]], resolution=3)
    counts = HistogramCounts(grid)
    # Bins: a edges -1.5,-0.5,0.5,1.5 ; b edges -1,1,3,5 (volume 2); one state outside, one NaN.
    counts.add(np.array([[0.0, 0.0], [0.1, 0.2], [1.0, 4.0], [9.0, 0.0], [np.nan, 0.0]]))
    assert (counts.n_total, counts.n_outside, counts.n_nonfinite) == (4, 1, 1)
    energy = counts.energy()
    assert energy[1, 0] == pytest.approx(-np.log(2 / (4 * 2.0)))
    assert energy[2, 2] == pytest.approx(-np.log(1 / (4 * 2.0)))
    assert np.isposinf(energy[0, 0]) and counts.report()["empty_bins"] == 7


def test_histogram_lookup_finds_the_bin_each_state_was_counted_in():
    state = StateInfo(kind="vector", shape=(2,), names=("a", "b"), units=("m", "s"))
    grid = StateGrid.build(state, GridStats(mean=np.zeros(2), std=np.ones(2)),
                           limits=[[-1.0, 1.0], [0.0, 4.0]], resolution=9)
    states = np.random.default_rng(0).uniform([-1.2, -0.3], [1.2, 4.3], size=(2000, 2))
    counts = HistogramCounts(grid)
    counts.add(states)
    m = EnergyMap(counts.energy(), [a.values for a in grid.axes], {"method": "histogram"})
    looked_up = m.energy(states)
    # a state's bin holds at least that state: finite exactly for the states counted inside
    assert np.isfinite(looked_up).sum() == counts.n_total - counts.n_outside
    inside = np.isfinite(looked_up)
    density = np.exp(-looked_up[inside]) * counts.n_total * counts.bin_volume
    assert np.all(density >= 1 - 1e-6) and np.allclose(density, np.round(density), atol=1e-4)
