"""Physical bounds: log / logit coordinates with the exact Jacobian, E = +inf outside, a proper
density inside, and the statistics pass's report of point masses at (and away from) bounds."""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ebm_vae.capsules import visible_capsules
from ebm_vae.config import compose
from ebm_vae.crawl.crawl import crawl
from ebm_vae.data.extractors.base import StateInfo
from ebm_vae.data.stats import PartialStats, Stats, merge_stats, run_stats_pass
from ebm_vae.data.support import PointMasses, Support, support_inverse, support_map
from ebm_vae.energy.model import EnergyModel
from ebm_vae.model.transforms import Bounded, build_transform
from ebm_vae.train import train

WEATHER = """\
name: weather
match: {name: ["*weather*"]}
extractor: table
variables: [humidity, irradiance, temperature]
units: ["%", W/m^2, degC]
bounds: {humidity: [0, 100], irradiance: [0, null]}
"""
STATE = StateInfo("vector", (3,), ("humidity", "irradiance", "temperature"), ("%", "W/m^2", "degC"))
LOWER, UPPER = np.array([0.0, 0.0, np.nan]), np.array([100.0, np.nan, np.nan])
NIGHT = 0.47  # share of irradiance values exactly 0


def weather(n: int, seed: int = 0) -> np.ndarray:
    """Humidity logit-normal in (0, 100) with a few readings of exactly 100 and a few above (a
    sensor's overshoot); irradiance 0 at night (47 %), lognormal by day; temperature normal."""
    rng = np.random.default_rng(seed)
    humidity = 100.0 / (1.0 + np.exp(-rng.normal(1.0, 0.8, n)))
    humidity[rng.random(n) < 0.01] = 100.0
    humidity[rng.random(n) < 0.005] = 103.0
    irradiance = np.where(rng.random(n) < NIGHT, 0.0, np.exp(rng.normal(5.0, 0.7, n)))
    temperature = 15.0 + 0.05 * irradiance + rng.normal(0, 4.0, n)
    return np.stack([humidity, irradiance, temperature], axis=1)


def support_of(x: np.ndarray) -> Support:
    support = Support.empty(LOWER, UPPER)
    support.add(x)
    return support


def test_support_map_inverts_and_its_jacobian_is_the_derivative():
    x = np.array([[37.0, 12.5, -3.0], [99.5, 1e-4, 40.0], [0.25, 900.0, 0.0]])
    y, log_jacobian, inside = support_map(x, LOWER, UPPER)
    assert inside.all()
    np.testing.assert_allclose(support_inverse(y, LOWER, UPPER), x, rtol=1e-12)
    np.testing.assert_array_equal(y[:, 2], x[:, 2])  # unbounded: the identity
    step = 1e-7 * np.maximum(np.abs(x), 1e-3)  # relative: the log varies on the scale of x
    for i in range(3):
        shift = np.zeros(3)
        shift[i] = 1.0
        numeric = (support_map(x + step * shift, LOWER, UPPER)[0] - support_map(x - step * shift, LOWER, UPPER)[0])
        np.testing.assert_allclose(log_jacobian[:, i], np.log(numeric[:, i] / (2 * step[:, i])), atol=1e-6)
    same = [v.numpy() for v in support_map(*map(torch.as_tensor, (x, LOWER, UPPER)), xp=torch)]
    for ours, theirs in zip(same, (y, log_jacobian, inside), strict=True):
        np.testing.assert_allclose(ours, theirs)


def bounded(mean, std, excluded: float = 0.0, state: StateInfo = STATE, lower=LOWER, upper=UPPER) -> Bounded:
    """The transform with given moments of y and a share `excluded` at or beyond the bounds."""
    transform = Bounded(state, np.asarray(lower, dtype=float), np.asarray(upper, dtype=float))
    counts = SimpleNamespace(excluded_fraction=excluded)
    transform.set_statistics(SimpleNamespace(support=SimpleNamespace(
        mapped=SimpleNamespace(mean=np.asarray(mean, dtype=float)), std=np.asarray(std, dtype=float),
        counts=counts)))
    return transform


def standard_normal_log_prob(transform: Bounded, x: np.ndarray) -> np.ndarray:
    u, log_det = transform(torch.as_tensor(x, dtype=torch.float32))
    assert torch.isfinite(u).all()  # the core never sees a NaN or an inf
    return (-0.5 * (u.double().square() + math.log(2 * math.pi)).sum(1) + log_det).numpy()


def test_a_standard_normal_core_gives_logit_normal_and_lognormal_densities():
    m, s = np.array([0.3, 4.0, 10.0]), np.array([0.7, 0.5, 3.0])
    transform = bounded(m, s)
    x = np.array([[20.0, 50.0, 11.0], [80.0, 80.0, 4.0], [50.0, 3.0, 10.0]], dtype=np.float32).astype(np.float64)
    t = x[:, 0] / 100.0
    logit = np.log(t / (1 - t))
    humidity = -0.5 * ((logit - m[0]) / s[0]) ** 2 - np.log(s[0] * np.sqrt(2 * np.pi)) - np.log(100.0 * t * (1 - t))
    irradiance = -0.5 * ((np.log(x[:, 1]) - m[1]) / s[1]) ** 2 - np.log(s[1] * np.sqrt(2 * np.pi) * x[:, 1])
    temperature = -0.5 * ((x[:, 2] - m[2]) / s[2]) ** 2 - np.log(s[2] * np.sqrt(2 * np.pi))
    np.testing.assert_allclose(standard_normal_log_prob(transform, x), humidity + irradiance + temperature,
                               rtol=0, atol=1e-5)


def test_energy_is_infinite_at_and_beyond_a_bound_and_the_core_sees_finite_inputs():
    transform = bounded(np.zeros(3), np.ones(3), excluded=0.4)
    x = np.array([[50.0, 10.0, 0.0], [0.0, 10.0, 0.0], [100.0, 10.0, 0.0], [101.0, 10.0, 0.0],
                  [-1e30, 10.0, 0.0], [50.0, 0.0, 0.0], [50.0, -5.0, 1e30]])
    log_p = standard_normal_log_prob(transform, x)
    assert np.isfinite(log_p[0]) and np.all(log_p[1:] == -np.inf)
    assert transform.describe()["bounds"] == {"humidity": [0.0, 100.0], "irradiance": [0.0, None]}
    assert transform.describe()["excluded_fraction"] == pytest.approx(0.4)


@pytest.mark.parametrize("lower, upper, grid", [
    (0.0, 100.0, 100.0 / (1.0 + np.exp(-np.linspace(-14, 14, 40001)))),  # logit spacing: both ends
    (0.0, np.nan, np.exp(np.linspace(-10, 12, 40001))),  # geometric spacing towards the bound
    (np.nan, 5.0, 5.0 - np.exp(np.linspace(12, -10, 40001))),
])
@pytest.mark.parametrize("excluded", [0.0, 0.47])
def test_density_integrates_to_the_share_strictly_inside(lower, upper, grid, excluded):
    state = StateInfo("vector", (1,), ("x",), ("m",))
    transform = bounded([0.4], [1.3], excluded, state, [lower], [upper])
    density = np.exp(standard_normal_log_prob(transform, grid[:, None]))
    assert np.trapezoid(density, grid) == pytest.approx(1.0 - excluded, rel=1e-5)


def test_support_counts_and_mapped_moments_merge_exactly_and_match_numpy():
    x = weather(20_000)
    whole = support_of(x)
    left, right = support_of(x[:7001]), support_of(x[7001:])
    merged = left.merge(right)
    inside = (x[:, 0] > 0) & (x[:, 0] < 100) & (x[:, 1] > 0)
    y = np.stack([np.log(x[inside, 0] / (100 - x[inside, 0])), np.log(x[inside, 1]), x[inside, 2]], axis=1)
    for s in (whole, merged):
        assert s.counts.at_lower.tolist() == [int((x[:, 0] == 0).sum()), int((x[:, 1] == 0).sum()), 0]
        assert s.counts.at_upper.tolist() == [int((x[:, 0] == 100).sum()), 0, 0]
        assert s.counts.above.tolist() == [int((x[:, 0] > 100).sum()), 0, 0]
        assert s.counts.inside_rows == int(inside.sum())
        np.testing.assert_allclose(s.mapped.mean, y.mean(0), rtol=1e-10)
        np.testing.assert_allclose(s.mapped.raw_std, y.std(0), rtol=1e-8)
    restored = Support.from_dict(whole.to_dict())
    np.testing.assert_allclose(restored.std, whole.std)
    assert restored.counts.excluded_fraction == pytest.approx(1 - inside.mean())


def test_point_masses_are_found_anywhere_and_merge():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50_000, 2))
    x[rng.random(50_000) < 0.08, 1] = -999.0  # a fill value
    halves = PointMasses.of(x[:20_000]).merge(PointMasses.of(x[20_000:]))
    large = halves.large(0.05)
    assert [(i, v) for i, v, _ in large] == [(1, -999.0)]
    assert large[0][2] == pytest.approx(0.08, abs=0.035)  # a lower bound, low by at most n / 33
    assert PointMasses.from_dict(halves.to_dict()).large(0.05) == large


def write_weather(root, n: int = 6000) -> np.ndarray:
    x = weather(n)
    root.mkdir(parents=True, exist_ok=True)
    for i, part in enumerate(np.array_split(x, 2)):
        lines = "".join(",".join(repr(float(v)) for v in row) + "\n" for row in part)
        (root / f"weather_{i}.csv").write_text("humidity,irradiance,temperature\n" + lines)
    return x


def test_stats_pass_reports_the_point_masses_at_the_bounds(tmp_path, caplog):
    conf = tmp_path / "conf"
    (conf / "capsule").mkdir(parents=True)
    (conf / "capsule" / "weather.yaml").write_text(WEATHER)
    x = write_weather(tmp_path / "data")
    cfg = compose("crawl", [f"data.root={tmp_path / 'data'}", f"paths.root={tmp_path / 'out'}",
                            "crawl.workers=1", "crawl.progress=false", "crawl.stats=false"],
                  extra_dirs=[conf])
    manifest = crawl(cfg)
    with caplog.at_level(logging.WARNING):
        stats = run_stats_pass(manifest, visible_capsules([conf])["weather"], cfg.paths.index, cfg)
    night = float((x[:, 1] == 0).mean())
    assert stats.support.counts.at_lower[1] / stats.count == pytest.approx(night)
    assert f"{100 * night:.3g}% of irradiance values are exactly at its bound 0" in caplog.text
    assert "of humidity values are above its bound 100" in caplog.text
    assert "or more of the irradiance values are exactly 0: a point mass" in caplog.text
    saved = Stats.load(tmp_path / "out" / "index" / "weather" / "stats.json")
    assert saved.support.counts.at_lower.tolist() == stats.support.counts.at_lower.tolist()
    # partial statistics of files merge into the whole's
    capsule = visible_capsules([conf])["weather"]
    parts = []
    for rows in np.array_split(x, 3):
        part = PartialStats.empty(STATE, capsule, cfg, seed=0)
        part.add(rows.astype(np.float32))
        parts.append(part.finish("weather", 4, []))
    merged = merge_stats(merge_stats(parts[0], parts[1]), parts[2])
    assert merged.support.counts.at_lower.tolist() == stats.support.counts.at_lower.tolist()
    np.testing.assert_allclose(merged.support.mapped.mean, stats.support.mapped.mean, rtol=1e-6)


def test_trained_bounded_capsule_energies_are_infinite_outside_and_normalised_inside(tmp_path):
    conf = tmp_path / "conf"
    (conf / "capsule").mkdir(parents=True)
    (conf / "capsule" / "weather.yaml").write_text(WEATHER.replace(", temperature]", "]")
                                                    .replace(', degC]', ']'))
    x = write_weather(tmp_path / "data", n=20_000)[:, :2]
    for i, part in enumerate(np.array_split(x, 2)):  # a two-variable capsule: humidity, irradiance
        lines = "".join(",".join(repr(float(v)) for v in row) + "\n" for row in part)
        (tmp_path / "data" / f"weather_{i}.csv").write_text("humidity,irradiance\n" + lines)
    cfg = compose("train", ["capsule=weather", f"data.root={tmp_path / 'data'}", f"paths.root={tmp_path / 'out'}",
                            "trainer.max_steps=400", "trainer.val_check_interval=200", "data.batch_size=512",
                            "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
                            "crawl.workers=1", "crawl.progress=false"], extra_dirs=[conf])
    train(cfg)
    model = EnergyModel.from_checkpoint(tmp_path / "out" / "checkpoints" / "weather" / "last.ckpt", device="cpu")
    assert model.vae.hparams.capsule["bounds"] == {"humidity": [0, 100], "irradiance": [0, None]}
    seen = []
    model.vae.encoder.register_forward_pre_hook(lambda _m, args: seen.append(bool(torch.isfinite(args[0]).all())))
    outside = model.energy(np.array([[105.0, 100.0], [-1.0, 100.0], [50.0, -3.0], [50.0, 0.0], [100.0, 5.0]]), k=16)
    assert np.all(outside == np.inf) and all(seen)
    # inside: exp(-E) integrates to the share strictly inside (IWAE, k = 128: nearly tight)
    hum = 100.0 / (1.0 + np.exp(-np.linspace(-9, 9, 121)))
    irr = np.exp(np.linspace(-2, 9.5, 121))
    grid = np.stack(np.meshgrid(hum, irr, indexing="ij"), axis=-1).reshape(-1, 2)
    density = np.exp(-model.energy(grid, k=128)).reshape(len(hum), len(irr))
    mass = np.trapezoid(np.trapezoid(density, irr, axis=1), hum)
    kept = float(((x[:, 0] > 0) & (x[:, 0] < 100) & (x[:, 1] > 0)).mean())
    assert mass == pytest.approx(kept, rel=0.08)
    assert model.vae.transform.describe()["excluded_fraction"] == pytest.approx(1 - kept)
    assert isinstance(build_transform(model.vae.state_info, model.vae.hparams.capsule), Bounded)
