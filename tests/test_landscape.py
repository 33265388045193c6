"""`EnergyLandscape`: one query surface over maps and checkpoints; bad states; tampered catalogues."""

from __future__ import annotations

import json
import shutil
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from landscapes import COUNTS, PATCH, gaussian_energy, make_landscape

from ebm_vae import EnergyLandscape, EnergyModel
from ebm_vae.energy.landscape import FILENAME, LandscapeError
from ebm_vae.energy.mapfile import EnergyMapError
from ebm_vae.energy.model import CheckpointError
from ebm_vae.energy.states import NonFiniteStatesWarning, StatesError


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("landscape")
    make_landscape(root)
    return root


@pytest.fixture
def copy_root(root, tmp_path) -> Path:
    """A private copy to tamper with."""
    shutil.copytree(root, tmp_path / "land")
    return tmp_path / "land"


def test_open_lists_capsules_maps_and_models(root):
    land = EnergyLandscape.open(root / "energy_maps")
    assert land.capsules == ["counts", "patch", "toy"]
    assert land.map("toy").axis_names == ["x", "y"]
    assert land.model("toy").state_names == ("x", "y")
    assert land.entry("counts").checkpoint is None
    assert EnergyLandscape.open(root / "energy_maps" / FILENAME, root=root).capsules == land.capsules
    with pytest.raises(LandscapeError, match="has no checkpoint"):
        land.model("counts")


def test_full_states_go_to_the_checkpoint_and_axis_points_to_the_map(root):
    land = EnergyLandscape.open(root / "energy_maps")
    rng = np.random.default_rng(0)
    states = rng.normal(size=(50, 2))
    result = land.energy("toy", states, k=4)
    assert result.source == "model" and result.path.name == "last.ckpt" and result.quantity == "joint"
    direct = EnergyModel.from_checkpoint(root / "checkpoints" / "toy" / "last.ckpt").energy(states, k=4)
    np.testing.assert_allclose(np.asarray(result), direct)
    assert result.energy_std.shape == (50,) and np.all(result.energy_std >= 0)

    on_map = land.energy("toy", states, source="map")
    assert on_map.source == "map" and on_map.energy_std is None and on_map.quantity == "marginal"
    # multilinear interpolation of a quadratic: exact at grid points, above it in between
    np.testing.assert_allclose(land.energy("toy", [[0.5, -1.0]], source="map").energy, gaussian_energy(np.array([0.5, -1.0])))
    inside = np.abs(states).max(axis=1) < 3
    assert np.all(on_map.energy[inside] >= gaussian_energy(states[inside]) - 1e-12)
    assert np.all(np.isinf(on_map.energy[~inside]))


def test_a_capsule_without_checkpoint_answers_full_states_from_its_map_in_state_order(root):
    land = EnergyLandscape.open(root / "energy_maps")
    states = np.array([[0.5, -2.0], [1.0, 0.0]])  # (a, b); the map's axes are (b, a)
    result = land.energy("counts", states)
    assert result.source == "map" and result.columns == COUNTS.names
    np.testing.assert_allclose(result.energy, land.map("counts").energy(states[:, ::-1]))
    with pytest.raises(LandscapeError, match="no checkpoint"):
        land.energy("counts", states, source="model")


def test_field_states_and_principal_coefficients(root):
    land = EnergyLandscape.open(root / "energy_maps")
    fields = np.random.default_rng(1).normal(size=(3, *PATCH.shape))
    shaped = land.energy("patch", fields, k=2)
    flat = land.energy("patch", fields.reshape(3, -1), k=2)
    assert shaped.source == flat.source == "model"
    np.testing.assert_allclose(shaped.energy, flat.energy)
    coefficients = land.energy("patch", [[0.0, 0.0], [1.0, -1.0]])
    assert coefficients.source == "map" and coefficients.columns == ("pc1", "pc2")
    np.testing.assert_allclose(coefficients.energy, gaussian_energy(np.array([[0.0, 0.0], [1.0, -1.0]])))
    # asked for the map, full fields are placed on the marginal map by their principal coefficients
    placed = land.energy("patch", 300.0 + fields, source="map")
    assert placed.source == "map" and placed.quantity == "marginal"
    basis = land.map("patch").pc_vectors
    np.testing.assert_allclose(placed.energy, land.map("patch").energy(fields.reshape(3, -1) @ basis.T))


def test_full_states_are_not_placed_on_a_slice(copy_root):
    _edit(copy_root / "energy_maps" / FILENAME, lambda d: d["capsules"]["patch"].update(quantity="slice"))
    land = EnergyLandscape.open(copy_root / "energy_maps")
    with pytest.raises(StatesError, match=r"must have shape \(N, 16\) or \(N, 1, 4, 4\) full states"):
        land.energy("patch", np.zeros((2, 1, 4, 4)), source="map")


@pytest.mark.parametrize("capsule, states, message", [
    ("toy", np.zeros((4, 3)), r"must have shape \(N, 2\) full states"),
    ("toy", np.zeros(4), r"got \(4,\)"),
    ("patch", np.zeros((2, 2, 4, 4)), r"\(N, 16\) or \(N, 1, 4, 4\)"),
    ("toy", np.array([["1", "2"]]), "must be real numbers for capsule 'toy', got dtype <U1"),
    ("toy", np.zeros((2, 2), dtype=complex), "got dtype complex128"),
    ("toy", np.array([[1, None]], dtype=object), "got dtype object"),
    ("toy", [[1.0, 2.0], [3.0]], "rectangular array"),
])
def test_bad_states_fail_with_one_line(root, capsule, states, message):
    land = EnergyLandscape.open(root / "energy_maps")
    with pytest.raises(StatesError, match=message) as info:
        land.energy(capsule, states, k=1)
    assert "\n" not in str(info.value)


def test_energy_model_checks_states_too(root):
    model = EnergyModel.from_checkpoint(root / "checkpoints" / "toy" / "last.ckpt")
    with pytest.raises(StatesError, match=r"^states must have shape \(N, 2\) \[x, y\] for capsule 'toy', got \(3, 5\)$"):
        model.energy(np.zeros((3, 5)))
    with pytest.raises(StatesError, match="dtype <U"):
        model.energy(np.array([["a", "b"]]))
    ints = model.energy(np.array([[1, 2], [3, 4]]), k=2)
    np.testing.assert_allclose(ints, model.energy(np.array([[1.0, 2.0], [3.0, 4.0]]), k=2))
    np.testing.assert_allclose(model.energy(torch.tensor([[1.0, 2.0]]), k=2), model.energy([[1.0, 2.0]], k=2))
    assert model.energy(np.zeros((0, 2))).shape == (0,)


@pytest.mark.parametrize("source", ["model", "map"])
def test_nonfinite_states_get_nan_or_inf_and_one_warning(root, source):
    land = EnergyLandscape.open(root / "energy_maps")
    states = np.array([[0.1, 0.2], [np.nan, 0.0], [np.inf, 1.0], [np.nan, -np.inf], [0.3, 0.4]])
    before = states.copy()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = land.energy("toy", states, source=source, k=2)
    messages = [str(w.message) for w in caught if issubclass(w.category, NonFiniteStatesWarning)]
    assert messages == ["the map of 'toy': 3 of 5 states have NaN/Inf components (2 NaN -> energy nan, 1 Inf -> energy +inf)"
                        if source == "map" else
                        "capsule 'toy': 3 of 5 states have NaN/Inf components (2 NaN -> energy nan, 1 Inf -> energy +inf)"]
    assert np.isnan(result.energy[[1, 3]]).all() and result.energy[2] == np.inf
    assert np.isfinite(result.energy[[0, 4]]).all()
    np.testing.assert_array_equal(states, before)  # the caller's array is never written
    if source == "model":  # the finite rows are as if queried alone
        alone = land.energy("toy", states[[0, 4]], k=2)
        assert np.isnan(result.energy_std[[1, 2, 3]]).all()
        assert np.isfinite(alone.energy).all()


def test_unknown_capsule_names_the_known_ones(root):
    land = EnergyLandscape.open(root / "energy_maps")
    with pytest.raises(LandscapeError, match=r"^unknown capsule 'nope': the landscape in .* has counts, patch, toy$"):
        land.energy("nope", np.zeros((1, 2)))


def _edit(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


TAMPERING = {
    "absolute map path": (lambda d: d["capsules"]["toy"].update(map="/etc/passwd"), "must be relative"),
    "climbing map path": (lambda d: d["capsules"]["toy"].update(map="../outside.npz"), "without '..'"),
    "climbing checkpoint": (lambda d: d["capsules"]["toy"].update(checkpoint="checkpoints/../../x.ckpt"), "without '..'"),
    "map is a number": (lambda d: d["capsules"]["toy"].update(map=5), r"'toy'.map must be str, got int"),
    "count is text": (lambda d: d["capsules"]["toy"]["data"].update(files="3"), "data.files must be an integer"),
    "unknown key": (lambda d: d["capsules"]["toy"].update(exec="import os"), "unknown key 'exec'"),
    "name mismatch": (lambda d: d["capsules"]["toy"].update(capsule="counts"), "describes capsule 'counts'"),
    "bad state": (lambda d: d["capsules"]["toy"]["state"].update(shape=[-1]), "not a state description"),
    "not ours": (lambda d: d.update(format="other"), "not an ebm-vae landscape"),
    "newer version": (lambda d: d.update(version=99), "version 99"),
    "maps_dir elsewhere": (lambda d: d.update(maps_dir="../elsewhere"), "without '..'"),
    "maps_dir moved": (lambda d: d.update(maps_dir="other"), "written for maps in <root>/other"),
    "entries not a mapping": (lambda d: d.update(capsules=[1, 2]), "'capsules' an object"),
    "bool as number": (lambda d: d["capsules"]["toy"]["quality"].update(x=True), "must be a number or null"),
}


@pytest.mark.parametrize("case", sorted(TAMPERING))
def test_a_tampered_catalogue_is_refused_with_one_line(copy_root, case):
    change, message = TAMPERING[case]
    _edit(copy_root / "energy_maps" / FILENAME, change)
    with pytest.raises(LandscapeError, match=message) as info:
        EnergyLandscape.open(copy_root / "energy_maps")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("text, message", [
    ('{"format": "ebm-vae-landscape", "version": 1, "maps_dir": "energy_maps", "capsules": {}, "x": NaN}',
     "non-standard JSON constant NaN"),
    ('{"format": "ebm-vae-lands', "not a readable landscape catalogue"),
    ("!!python/object:os.system {}", "not a readable landscape catalogue"),
    ("[1, 2]", "not an ebm-vae landscape"),
])
def test_a_catalogue_that_is_not_json_of_ours_is_refused(copy_root, text, message):
    (copy_root / "energy_maps" / FILENAME).write_text(text)
    with pytest.raises(LandscapeError, match=message):
        EnergyLandscape.open(copy_root / "energy_maps")


def test_symlinks_out_of_the_root_are_refused(copy_root, tmp_path):
    outside = tmp_path / "outside.npz"
    shutil.copy(copy_root / "energy_maps" / "toy.npz", outside)
    (copy_root / "energy_maps" / "link.npz").symlink_to(outside)
    _edit(copy_root / "energy_maps" / FILENAME, lambda d: d["capsules"]["toy"].update(map="energy_maps/link.npz"))
    with pytest.raises(LandscapeError, match="leads outside the landscape's root"):
        EnergyLandscape.open(copy_root / "energy_maps")
    with pytest.raises(LandscapeError, match="open it with root=<the build's paths.root>"):
        EnergyLandscape.open(copy_root / "energy_maps", root=tmp_path)  # a root the catalogue was not written for


def test_a_missing_catalogue_says_how_to_build_one(tmp_path):
    with pytest.raises(LandscapeError, match="ebm-vae-build data.root=DIR"):
        EnergyLandscape.open(tmp_path)


class _Payload:
    """Unpickling this touches a file: loading must never do it."""

    marker: Path = Path()

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_loading_runs_no_code(copy_root, tmp_path):
    _Payload.marker = tmp_path / "ran"
    np.savez(copy_root / "energy_maps" / "toy.npz", energy_map=np.array([_Payload()], dtype=object),
             axis_0=np.arange(2.0), metadata=np.array("{}"))
    torch.save({"hyper_parameters": {"state": {}}, "state_dict": {}, "evil": _Payload()},
               copy_root / "checkpoints" / "toy" / "last.ckpt")
    land = EnergyLandscape.open(copy_root / "energy_maps")
    with pytest.raises(EnergyMapError):
        land.map("toy")
    with pytest.raises(CheckpointError, match="weights_only"):
        land.model("toy")
    assert not _Payload.marker.exists()


def test_many_map_points_in_bounded_chunks(root):
    land = EnergyLandscape.open(root / "energy_maps")
    points = np.random.default_rng(3).uniform(-2.9, 2.9, size=(1_000_000, 2))
    tracemalloc.start()
    result = land.energy("toy", points, source="map")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    np.testing.assert_allclose(result.energy[:1000], land.map("toy").energy(points[:1000]))
    # the (N,) result and flags (~10 MB) plus chunks; the unchunked interpolation holds ~15 N-sized arrays
    assert peak < 40e6, peak


@pytest.mark.slow
def test_ten_million_states_through_the_model_in_bounded_memory(root):
    model = EnergyModel.from_checkpoint(root / "checkpoints" / "toy" / "last.ckpt", device="cpu")
    states = np.random.default_rng(4).normal(size=(10_000_000, 2)).astype(np.float32)
    states[::1_000_000] = np.nan
    tracemalloc.start()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonFiniteStatesWarning)
        energy = model.energy(states, k=1)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert energy.shape == (10_000_000,) and np.isnan(energy[::1_000_000]).all()
    assert np.isfinite(np.delete(energy, np.s_[::1_000_000])).all()
    # result 80 MB + flags 20 MB + one chunk; a float64 copy of the input alone would be 160 MB
    assert peak < 150e6, peak
