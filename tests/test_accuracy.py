"""Exported energies against densities known in closed form, in ABSOLUTE nats (no shift).

The real VAE is trained (Lightning, CPU) on exact samples of a density from
`ebm_vae.bench.densities`; its map is exported through the grid / evaluate / .npz code and
compared with -log p(x) where the truth is within 6 nats of the density's minimum. Beside it,
on the same samples and states: the exact histogram, one Gaussian (the linear baseline) and,
in the slow tier, the issue's reference flow (`zuko.flows.NSF`, 3,000 steps).

Stated bounds (observed values in brackets, torch 2.x CPU, one thread):
- fast tier, 2-D coupled double well (4 wells), N = 1e5, a small ensemble (2 members of width
  32, 2 flow layers), 600 steps at batch 512: IWAE (k = 64) map MAE < 0.26 nats [0.228];
  the histogram's bins with >= 100 samples < 0.15 nats [~0.06]; one Gaussian [0.88] more than 3x the VAE's.
- slow tier, the default model, N = 2e5, 3,000 steps at batch 1,024 (the issue's targets):
  D = 2 (grid-like, triple well, double well) < 0.12 nats; D = 3 slice < 0.20; 6-D mixture
  slice < 0.30; each beside the reference flow, the histogram and one Gaussian.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ebm_vae import EnergyMap, EnergyModel
from ebm_vae.bench.accuracy import cases, fit_reference_flow, gaussian_energy
from ebm_vae.bench.densities import make_density
from ebm_vae.bench.study import SparseHistogram, StudyPlan, train_vae
from ebm_vae.data.extractors.base import StateInfo
from ebm_vae.energy.evaluate import evaluate_energy
from ebm_vae.energy.grid import GridStats, StateGrid
from ebm_vae.energy.histogram import HistogramCounts
from ebm_vae.energy.model import load_vae

N_SAMPLES = 100_000
WITHIN = 6.0  # nats above the true minimum: the region every accuracy figure is taken over
FAST_PLAN = StudyPlan(steps=600, batch_size=512, model=(("members", 2), ("hidden", 32), ("prior_transforms", 2)))
TARGET_PLAN = StudyPlan(steps=3000, batch_size=1024)


class SampleStats:
    """Mean/std of the samples, shaped like the crawl's `Stats` for `VAE.set_normalization`."""

    def __init__(self, samples: np.ndarray):
        self.mean, self.std = samples.mean(axis=0), samples.std(axis=0)
        self.min, self.max = samples.min(axis=0), samples.max(axis=0)
        self.pca = None


def vector_state(dim: int) -> StateInfo:
    return StateInfo(kind="vector", shape=(dim,), names=tuple(f"x{i}" for i in range(dim)),
                     units=("1",) * dim)


def fitted(samples: np.ndarray, plan: StudyPlan, ckpt_path):
    """The project's VAE fitted by Lightning on the samples (the study's trainer), saved with what
    a checkpoint holds for `load_vae`: plain hyper-parameters and the state dict."""
    vae = train_vae(samples, plan, seed=0, name="toy")
    torch.save({"hyper_parameters": dict(vae.hparams), "state_dict": vae.state_dict()}, ckpt_path)
    return vae


@pytest.fixture(scope="module")
def double_well_2d(tmp_path_factory):
    density = make_density("boltzmann", 2, seed=0)
    samples = density.sample(N_SAMPLES, np.random.default_rng(0))
    ckpt = tmp_path_factory.mktemp("boltzmann2") / "toy.ckpt"
    return density, samples, fitted(samples, FAST_PLAN, ckpt), ckpt


def map_grid(samples: np.ndarray, resolution: int) -> StateGrid:
    dim = samples.shape[1]
    return StateGrid.build(vector_state(dim), GridStats.from_stats(SampleStats(samples)),
                           axes=["x0", "x1"], resolution=resolution)


def exported_map(vae, samples, k, tmp_path, resolution) -> tuple[EnergyMap, StateGrid]:
    """Through the export code: grid, chunked evaluation, .npz written and read back."""
    grid = map_grid(samples, resolution)
    energy = evaluate_energy(vae, grid.states, grid.n_points, k=k, seed=0, device="cpu",
                             chunk_points=512, progress=False)
    path = EnergyMap(energy.reshape(grid.shape), [a.values for a in grid.axes],
                     {"method": f"k={k}"}).save(tmp_path / f"k{k}.npz")
    return EnergyMap.load(path), grid


def region_of(density, grid: StateGrid) -> tuple[np.ndarray, np.ndarray]:
    """(states, true energies) of the grid points within WITHIN of the density's true minimum."""
    states = grid.states(0, grid.n_points)
    truth = density.energy(states)
    keep = truth <= density.min_energy + WITHIN  # +inf (outside a support) is never kept
    return states[keep], truth[keep]


def map_error(energy_map: EnergyMap, density, grid: StateGrid) -> tuple[float, int]:
    """(mean |E_map - E_true| in nats, points) over the grid points within WITHIN of the minimum."""
    truth = density.energy(grid.states(0, grid.n_points))
    region = truth <= density.min_energy + WITHIN
    error = energy_map.energy(grid.points(0, grid.n_points))[region] - truth[region]
    return float(np.mean(np.abs(error))), int(region.sum())


def test_vae_map_matches_a_2d_double_well(double_well_2d, tmp_path):
    density, samples, vae, _ = double_well_2d
    iwae_map, grid = exported_map(vae, samples, 64, tmp_path, resolution=48)
    elbo_map, _ = exported_map(vae, samples, 1, tmp_path, resolution=48)
    iwae_error, n_points = map_error(iwae_map, density, grid)
    elbo_error, _ = map_error(elbo_map, density, grid)
    states, truth = region_of(density, grid)
    gaussian_error = float(np.mean(np.abs(gaussian_energy(samples, states) - truth)))
    assert n_points > 200  # the grid covers the low-energy region well
    assert iwae_error < 0.26, f"IWAE map MAE {iwae_error:.3f} nats"
    assert iwae_error < elbo_error + 0.02, f"IWAE {iwae_error:.3f} vs ELBO {elbo_error:.3f} nats"
    assert gaussian_error > 3 * iwae_error, f"one Gaussian {gaussian_error:.3f} nats"


def test_histogram_matches_a_2d_double_well(double_well_2d):
    density, samples, _, _ = double_well_2d
    grid = map_grid(samples, 48)
    counts = HistogramCounts(grid)
    for chunk in np.array_split(samples, 7):  # streamed: the sum of chunks is the whole
        counts.add(chunk)
    assert counts.n_total == len(samples)
    full = counts.counts >= 100
    truth = density.energy(grid.states(0, grid.n_points))
    error = np.abs(counts.energy().ravel()[full] - truth[full])
    assert full.sum() > 50
    assert error.mean() < 0.15, f"histogram MAE {error.mean():.3f} nats"


def test_energy_model_matches_the_map(double_well_2d, tmp_path):
    """The checkpoint query answers the map's values at grid points (same seed, same chunks),
    with an uncertainty for each, and the support reservoir of its training states."""
    _, samples, vae, ckpt = double_well_2d
    iwae_map, grid = exported_map(vae, samples, 64, tmp_path, resolution=8)
    model = EnergyModel.from_checkpoint(ckpt, device="cpu")
    assert model.state_names == ("x0", "x1") and model.state_units == ("1", "1")
    assert model.state_shape == (2,)
    energy = model.energy(grid.states(0, grid.n_points), k=64, seed=0, chunk_points=512)
    assert energy.dtype == np.float64 and energy.shape == (64,)
    np.testing.assert_allclose(energy, iwae_map.energy_map.ravel(), rtol=1e-6)
    # reproducible for a seed; another seed differs only by Monte Carlo noise
    np.testing.assert_array_equal(model.energy(samples[:10], seed=3), model.energy(samples[:10], seed=3))
    np.testing.assert_allclose(model.energy(samples[:10], seed=4), model.energy(samples[:10], seed=3), atol=0.2)
    energy, std = model.energy(samples[:10], return_std=True)
    assert std.shape == (10,) and np.all(std > 0) and np.all(std < 1.0)
    estimate = model.estimate(samples[:10])
    assert np.all(estimate.k >= 64) and np.all(np.isfinite(estimate.stderr))
    support = model.vae.support_states.numpy()
    assert support.shape == (model.vae.hparams.support_size, 2)
    assert model.vae.support_samples == len(samples)  # 600 x 512 draws, capped at the data
    assert np.allclose(support.mean(axis=0), samples.mean(axis=0), atol=0.1 * samples.std(axis=0).max())


def test_physical_units_jacobian_shifts_energy_by_log_scale(double_well_2d, tmp_path):
    """The same data in units 1000x smaller: z-scored states are identical, so the model is the
    same, and E = -log p of the physical density rises by exactly D * log(1000)."""
    _, samples, _, ckpt = double_well_2d
    scaled = 1000.0 * samples
    energies = []
    for data in (samples, scaled):
        vae = load_vae(ckpt, "cpu").set_normalization(SampleStats(data))
        grid = StateGrid.build(vector_state(2), GridStats.from_stats(SampleStats(data)), resolution=16)
        energies.append(evaluate_energy(vae, grid.states, grid.n_points, k=8, seed=0, device="cpu",
                                        progress=False, max_k=None))
    np.testing.assert_allclose(energies[1] - energies[0], 2 * math.log(1000.0), atol=1e-3)


@pytest.mark.gpu
def test_gpu_energies_agree_with_cpu(double_well_2d):
    """Other device, other random stream: the IWAE estimates agree to Monte Carlo noise."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    _, samples, _, ckpt = double_well_2d
    cpu = EnergyModel.from_checkpoint(ckpt, device="cpu").energy(samples[:2000], k=64)
    gpu = EnergyModel.from_checkpoint(ckpt, device="cuda").energy(samples[:2000], k=64)
    assert gpu.dtype == np.float64 and np.all(np.isfinite(gpu))
    assert np.mean(np.abs(gpu - cpu)) < 0.1


TARGETS = {"grid_like": 0.12, "triple_well": 0.12, "double_well_2d": 0.12, "double_well_3d": 0.20,
           "mixture_6d": 0.30}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(TARGETS))
def test_issue_targets_beside_the_reference_flow(case, tmp_path):
    """N = 2e5, the default model, 3,000 steps: the issue's targets on the 128 x 128 map (the
    slice through the mean for D > 2), with the reference flow, the histogram and one Gaussian
    measured on the same states."""
    density = cases()[case].density
    samples = density.sample(200_000, np.random.default_rng([0, density.dim]))
    vae = train_vae(samples, TARGET_PLAN, seed=0, name=case)
    grid = map_grid(samples, 128)
    states, truth = region_of(density, grid)
    vae_energy = evaluate_energy(vae, lambda a, b: states[a:b], len(states), k=256, progress=False)
    flow_energy, _ = fit_reference_flow(samples)
    errors = {"vae": vae_energy, "flow": flow_energy(states), "gaussian": gaussian_energy(samples, states),
              "histogram": SparseHistogram.fit(samples, "scott").energy(states)}
    mae = {}
    for name, energy in errors.items():
        finite = np.isfinite(energy)
        mae[name] = float(np.mean(np.abs(energy[finite] - truth[finite])))
    print(case, {k: round(v, 3) for k, v in mae.items()})
    assert mae["vae"] < TARGETS[case], mae
    assert mae["vae"] < mae["gaussian"] and mae["vae"] < mae["histogram"], mae
