"""The study's test densities are exact, its histogram is the plain count, its harness runs."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from ebm_vae.bench.densities import CoupledDoubleWell, GaussianMixture, make_density
from ebm_vae.bench.study import (
    SparseHistogram,
    StudyPlan,
    markdown_table,
    plot,
    run_study,
    summarize,
)

FAMILIES = ["boltzmann", "mixture"]


def grid_points(dim: int, half: float, n: int) -> tuple[np.ndarray, float]:
    ticks = np.linspace(-half, half, n)
    mesh = np.meshgrid(*[ticks] * dim, indexing="ij")
    return np.stack([m.ravel() for m in mesh], axis=1), (ticks[1] - ticks[0]) ** dim


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize(("dim", "n"), [(2, 601), (3, 61)])
def test_density_integrates_to_one(name, dim, n):
    density = make_density(name, dim)
    points, cell = grid_points(dim, 7.5, n)
    total = np.exp(density.log_prob(points)).sum() * cell
    assert total == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_mode_is_the_lowest_energy(name):
    density = make_density(name, 2)
    points, _ = grid_points(2, 7.5, 401)
    assert density.min_energy <= density.energy(points).min() + 1e-9
    samples = density.sample(20_000, np.random.default_rng(0))
    assert density.min_energy <= density.energy(samples).min()


def analytic_moments(density) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance from the parameters (quadrature per rotated axis for the wells)."""
    if isinstance(density, GaussianMixture):
        covs = np.einsum("kde,ke,kfe->kdf", density.rotations, density.scales**2, density.rotations)
        mean = density.weights @ density.means
        second = np.einsum("k,kdf->df", density.weights,
                           covs + np.einsum("kd,kf->kdf", density.means, density.means))
        return mean, second - np.outer(mean, mean)
    assert isinstance(density, CoupledDoubleWell)
    y = np.linspace(-3, 3, 20001)[:, None] * density.widths
    weight = np.exp(-density.axis_potential(y))
    weight /= weight.sum(axis=0)
    y_mean = (weight * y).sum(axis=0)
    y_var = (weight * y**2).sum(axis=0) - y_mean**2
    rot = density.rotation
    return rot @ y_mean, rot @ np.diag(y_var) @ rot.T


@pytest.mark.parametrize("name", FAMILIES)
def test_samples_match_the_density_moments(name):
    density = make_density(name, 6)
    n = 200_000
    x = density.sample(n, np.random.default_rng(3))
    mean, cov = analytic_moments(density)
    sd = np.sqrt(np.diag(cov))
    assert np.all(np.abs(x.mean(axis=0) - mean) < 5 * sd / np.sqrt(n))
    assert np.allclose(np.cov(x, rowvar=False), cov, atol=0.02 * sd.max() ** 2)


def test_double_well_log_prob_is_exact_in_one_dimension():
    density = CoupledDoubleWell(barriers=[2.0], tilts=[0.3], widths=[1.1], rotation=[[1.0]])
    y = np.linspace(-4, 4, 200001)
    dens = np.exp(-(2.0 * ((y / 1.1) ** 2 - 1) ** 2 + 0.3 * y / 1.1))
    log_z = np.log(np.trapezoid(dens, y))
    x = np.array([[-1.0], [0.0], [0.7]])
    expected = -(2.0 * ((x[:, 0] / 1.1) ** 2 - 1) ** 2 + 0.3 * x[:, 0] / 1.1) - log_z
    assert np.allclose(density.log_prob(x), expected, atol=1e-8)


@pytest.mark.parametrize("rule", ["scott", "fd"])
def test_histogram_energy_is_minus_log_count_over_n_volume(rule):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3000, 3))
    hist = SparseHistogram.fit(x, rule)
    queries = np.concatenate([x[:200], rng.standard_normal((200, 3)) * 2.0])
    edges = [hist.lower[d] + hist.width[d] * np.arange(hist.bins[d] + 1) for d in range(3)]
    counts, _ = np.histogramdd(x, bins=edges)  # its last bin is closed on the right, as ours
    volume = np.prod(hist.width)
    for q, energy in zip(queries, hist.energy(queries), strict=True):
        inside = np.all((q >= hist.lower) & (q <= hist.upper))
        index = tuple(min(np.searchsorted(edges[d], q[d], side="right") - 1, hist.bins[d] - 1)
                      for d in range(3))
        count = counts[index] if inside else 0
        expected = -np.log(count / (len(x) * volume)) if count else np.inf
        assert energy == pytest.approx(expected)
    assert np.all(np.isfinite(hist.energy(x)))  # every sample's own bin is non-empty
    assert hist.dense_bytes == np.prod(hist.bins) * 8
    # exp(-E) is a density: it integrates to one over the bins
    centres = hist.lower + (np.stack(np.unravel_index(hist.keys, hist.bins), axis=1) + 0.5) * hist.width
    assert np.sum(np.exp(-hist.energy(centres))) * volume == pytest.approx(1.0)


def test_histogram_of_many_dimensions_stays_sparse():
    x = np.random.default_rng(2).standard_normal((5000, 8))
    hist = SparseHistogram.fit(x, "fd")
    assert hist.dense_bytes > 1e12  # a grid that could never be allocated
    assert len(hist.keys) <= len(x)
    assert hist.sparse_bytes == 16 * len(hist.keys)
    assert not hist.capped
    x[0, 0] = 1e6  # one outlier asks for millions of bins along axis 0: capped, and said so
    wide = SparseHistogram.fit(x, "fd")
    assert wide.capped and wide.bins[0] == int(2 ** (62 / 8)) and wide.dense_bytes < 2**63


def test_study_harness_smoke(tmp_path):
    plan = StudyPlan(densities=("boltzmann",), dims=(2,), sizes=(2000,), steps=5, batch_size=64,
                     model=(("hidden", 16), ("members", 2), ("prior_transforms", 1)), k=4, n_eval=200,
                     slice_resolution=8)
    cases = run_study(plan, progress=False)
    case = cases["boltzmann_D2_N2000"]
    for key in ["vae_mae_nats", "vae_slice_mae_nats", "hist_mae_nats", "hist_empty_fraction",
                "hist_slice_mae_nats", "hist_memory_bytes", "hist_bins", "vae_params",
                "vae_train_s", "vae_eval_s", "ratio", "baseline"]:
        assert key in case
    for key in ["vae_mae_nats", "hist_mae_nats", "ratio"]:
        assert np.isfinite(case[key]) and case[key] > 0
    assert 0.0 <= case["hist_empty_fraction"] <= 1.0
    assert case["eval_states"] > 0 and case["slice_states"] > 0
    summary = summarize(cases)
    assert set(summary["boltzmann"]["N2000"]) == {"crossover_dim"}
    assert "boltzmann" in markdown_table(cases)
    assert plot(cases, tmp_path / "study.png").stat().st_size > 0


def test_summary_crossover_needs_every_larger_dimension():
    ratios = {2: 0.5, 3: 1.2, 4: 0.9, 6: 1.5, 8: 3.0}
    cases = {f"c{d}": {"density": "m", "n_samples": 10, "dim": d, "ratio": r} for d, r in ratios.items()}
    entry = summarize(cases)["m"]["N10"]
    assert entry == {"crossover_dim": 6, "ratio_D6": 1.5, "ratio_D8": 3.0}


def test_densities_are_reproducible():
    for name, dim in itertools.product(FAMILIES, [2, 4]):
        a, b = make_density(name, dim), make_density(name, dim)
        x = a.sample(10, np.random.default_rng(0))
        assert np.array_equal(x, b.sample(10, np.random.default_rng(0)))
        assert np.array_equal(a.log_prob(x), b.log_prob(x))


def test_scaling_epoch_streams_the_training_states(tmp_path):
    from ebm_vae import demo
    from ebm_vae.bench.scaling import crawl_tree, one_epoch, train_overrides
    from ebm_vae.config import compose
    from ebm_vae.data.datamodule import datamodule_from_config

    root = tmp_path / "tree"
    for i in range(2):
        demo.write_grid_parquet(root / f"grid_frequency_{i}.parquet", n_rows=3000, seed=i)
    overrides = train_overrides("grid", root, tmp_path / "out",
                                ("data.batch_size=256", "data.unit_samples=1000"))
    crawl_tree(overrides)
    epoch = one_epoch(overrides)
    train_units = datamodule_from_config(compose("train", overrides)).train_units
    train_states = sum(unit.n_samples for unit in train_units)
    assert 0 < train_states < 6000  # 6 units of 1,000 rows, some held out for validation
    assert epoch["samples"] == train_states // 256 * 256  # whole batches, every epoch
    assert epoch["peak_rss_mb"] >= epoch["rss_before_epochs_mb"] > 0


def test_scaling_ratios_are_against_the_smallest_tree():
    from ebm_vae.bench.scaling import add_ratios

    entries = {f"g_{s}x": {"files": 4 * s, "bytes": 100 * s, "samples": 1000 * s,
                           "seconds": 0.5 * s, "cpu_seconds": 0.4 * s, "peak_rss_mb": 500.0 + s}
               for s in (1, 10)}
    add_ratios(entries, "g_1x")
    big = entries["g_10x"]
    assert big["samples_ratio"] == 10 and big["seconds_per_sample_ratio"] == pytest.approx(1.0)
    assert big["peak_rss_ratio"] == pytest.approx(510 / 501) and big["baseline"] == "g_1x"
