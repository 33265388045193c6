"""Two stations of different climates, one CSV file each: the split must let the model see both.

Each file holds a year of hourly (temperature, humidity) states from a correlated Gaussian of
its own; the density of the pair of files is their mixture, known in closed form. The real
pipeline runs (crawl with statistics, `train`, `export` of the VAE map and of the histogram
map), and both maps are compared with the true energy in each station's region. Before the
split drew from every file, one whole station went to validation and the map was off by
7 nats on it (issue 14).

Stated bounds (observed in brackets, torch 2.x CPU, 1,500 steps, about 40 CPU-s): VAE (k = 16)
map MAE in each station's region < 0.8 nats [0.49, 0.49]; the histogram < 0.5 [0.24, 0.32]; one
Gaussian fitted to both stations (the linear baseline) is worse than the VAE by 1.5x at least
[1.10, 1.28]. A model that never saw a station is off by several nats there (7.1 in issue 14).
"""

from __future__ import annotations

import numpy as np
import pytest

from ebm_vae import EnergyMap
from ebm_vae.config import compose
from ebm_vae.crawl.crawl import crawl
from ebm_vae.export import export
from ebm_vae.train import train

STATION_CAPSULE = """\
name: station
match: {name: ["*station*"]}
extractor: table
variables: [temperature, humidity]
units: [degC, "%"]
"""
HOURS = 8760
# (mean, covariance) of (temperature degC, relative humidity %) per station
CLIMATES = {
    "station_cold.csv": ([4.0, 82.0], [[9.0, -6.0], [-6.0, 25.0]]),
    "station_warm.csv": ([27.0, 45.0], [[16.0, -18.0], [-18.0, 64.0]]),
}
WITHIN = 6.0  # nats above a station's own minimum energy: its region


def gaussian_energy(x: np.ndarray, mean, cov) -> np.ndarray:
    mean, cov = np.asarray(mean), np.asarray(cov)
    d = x - mean
    solved = np.linalg.solve(cov, d.T).T
    return 0.5 * np.sum(d * solved, axis=1) + 0.5 * np.log(np.linalg.det(2 * np.pi * cov))


def mixture_energy(x: np.ndarray) -> np.ndarray:
    """-log of the equal-weight mixture of the two stations' densities (equal sample counts)."""
    parts = np.stack([-gaussian_energy(x, m, c) for m, c in CLIMATES.values()])
    return -(np.logaddexp.reduce(parts, axis=0) - np.log(len(CLIMATES)))


@pytest.fixture(scope="module")
def two_stations(tmp_path_factory):
    base = tmp_path_factory.mktemp("stations")
    data, conf = base / "data", base / "conf"
    (conf / "capsule").mkdir(parents=True)
    (conf / "capsule" / "station.yaml").write_text(STATION_CAPSULE)
    data.mkdir()
    samples = []
    for k, (name, (mean, cov)) in enumerate(CLIMATES.items()):
        x = np.random.default_rng(k).multivariate_normal(mean, cov, size=HOURS)
        samples.append(x)
        (data / name).write_text("temperature,humidity\n" + "".join(f"{t:.3f},{h:.3f}\n" for t, h in x))
    overrides = [f"data.root={data}", f"paths.root={base / 'out'}"]
    crawling = ["crawl.workers=1", "crawl.progress=false"]
    crawl(compose("crawl", overrides + crawling, extra_dirs=[conf]))
    metrics = train(compose("train", [
        "capsule=station", *overrides, *crawling, "data.batch_size=512", "trainer.max_steps=1500",
        "trainer.val_check_interval=500", "trainer.limit_val_batches=4", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "model.val_k=8", "model.lr=2e-3"], extra_dirs=[conf]))
    maps = {}
    for method in ("vae", "histogram"):
        maps[method] = EnergyMap.load(export(compose("export", [
            "capsule=station", *overrides, f"export.method={method}", "export.k=16", "export.resolution=48",
            "export.limits=[[-8,42],[15,100]]", "export.plot=false", "export.progress=false",
            f"export.out={base / 'out' / f'{method}.npz'}"], extra_dirs=[conf])))
    return np.concatenate(samples), maps, metrics


def region_errors(energy_map: EnergyMap, energy_fn) -> dict[str, float]:
    """Mean |E - E_true| over each station's region of the map's grid points."""
    t, h = np.meshgrid(*energy_map.axes, indexing="ij")
    points = np.stack([t.ravel(), h.ravel()], axis=1)
    truth = mixture_energy(points)
    estimate = energy_fn(points)
    errors = {}
    for name, (mean, cov) in CLIMATES.items():
        own = gaussian_energy(points, mean, cov)
        region = (own < own.min() + WITHIN) & np.isfinite(estimate)
        assert region.sum() > 30
        errors[name] = float(np.mean(np.abs(estimate[region] - truth[region])))
    return errors


@pytest.mark.slow
def test_the_map_matches_the_truth_and_the_histogram_on_both_stations(two_stations):
    samples, maps, metrics = two_stations
    meta = maps["vae"].metadata
    vae = region_errors(maps["vae"], maps["vae"].energy)
    histogram = region_errors(maps["histogram"], maps["histogram"].energy)
    mean, cov = samples.mean(axis=0), np.cov(samples.T)
    one_gaussian = region_errors(maps["vae"], lambda x: gaussian_energy(x, mean, cov))
    print(f"MAE nats per station: VAE {vae}, histogram {histogram}, one Gaussian {one_gaussian}")
    for name in CLIMATES:
        assert vae[name] < 0.8, (name, vae)
        assert histogram[name] < 0.5, (name, histogram)
        assert one_gaussian[name] > 1.5 * vae[name], (name, one_gaussian)
    assert np.isfinite(metrics["val/iwae"])
    # the provenance says exactly what was trained on and what validated
    assert meta["training_samples"] == sum(f["train_samples"] for f in maps_split(meta))
    for row in maps_split(meta):
        assert 0.07 * HOURS < row["val_samples"] < 0.13 * HOURS
        assert row["train_samples"] + row["val_samples"] == HOURS


def maps_split(meta: dict) -> list[dict]:
    """The per-file split rows the VAE map's checkpoint recorded (its stats_meta)."""
    from ebm_vae.energy.model import load_vae

    return load_vae(meta["checkpoint"]["path"], "cpu").hparams.stats_meta["split"]["files"]
