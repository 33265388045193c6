"""How sure each energy is: honest standard errors, adaptive k in the tails, an ensemble spread
that shrinks with N and grows away from the data, and the support reservoir."""

from __future__ import annotations

import math
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch

from ebm_vae.bench.densities import make_density
from ebm_vae.data.extractors.base import StateInfo
from ebm_vae.energy.evaluate import estimate_energy
from ebm_vae.model.support import reservoir_update
from ebm_vae.model.vae import VAE

ONE = StateInfo("vector", (1,), ("x",), ("m",)).to_dict()


def linear_gaussian_vae(a: float, s: float, q_gain: float, q_logvar: float) -> VAE:
    """p(z) = N(0, 1), p(x|z) = N(a z, s^2), so p(x) = N(0, a^2 + s^2) exactly; q(z|x) =
    N(q_gain x, exp(q_logvar)), deliberately not the posterior, so the importance weights vary
    and far more in the tails. Linear networks (n_layers=0), residual heads set by hand."""
    model = VAE(ONE, n_layers=0, members=1, prior="standard", ema_decay=0.0, hidden=8)
    model.set_normalization(SimpleNamespace(mean=np.zeros(1), std=np.ones(1), pca=None))
    floor = model.hparams.min_logvar
    raw = floor + math.log(math.expm1(math.log(s * s) - floor))  # through the softplus floor
    with torch.no_grad():
        enc, dec = model.members.encoder.net[0].layer, model.members.decoder.net[0].layer
        enc.weight[:] = torch.tensor([[[q_gain - 1.0], [0.0]]])  # residual: mu = x + (gain - 1) x
        enc.bias[:] = torch.tensor([[0.0, q_logvar]])
        dec.weight[:] = torch.tensor([[[a - 1.0], [0.0]]])
        dec.bias[:] = torch.tensor([[0.0, raw]])
    return model.eval()


A, S = 1.5, 0.5
TRUE_VAR = A * A + S * S


def true_energy(x: np.ndarray) -> np.ndarray:
    return 0.5 * (math.log(2 * math.pi * TRUE_VAR) + x**2 / TRUE_VAR)


def repeated(model, points, seeds, **kw):
    return [estimate_energy(model, lambda a, b: points[a:b], len(points), seed=s, progress=False, **kw)
            for s in seeds]


def test_standard_errors_are_honest_and_adaptive_k_tames_the_tails():
    # the exact posterior has gain a / (a^2 + s^2) = 0.6 and variance s^2 / (a^2 + s^2) = 0.1;
    # q is narrower and lags behind it (the weights keep a finite variance: the delta-method
    # error is honest only then; with q narrower than half the posterior it would be too small)
    model = linear_gaussian_vae(A, S, q_gain=0.55, q_logvar=math.log(0.07))
    typical = np.array([[-1.0], [0.0], [0.8], [1.5]])
    runs = repeated(model, typical, range(40), k=16, max_k=None)
    energies = np.stack([r.energy for r in runs])
    reported = np.mean([r.stderr for r in runs], axis=0)
    observed = energies.std(axis=0)
    assert np.all((observed > 0.7 * reported) & (observed < 1.4 * reported)), (observed, reported)
    assert np.all(np.abs(energies.mean(axis=0) - true_energy(typical[:, 0])) < 0.1)  # above, and close

    far = np.array([[-7.0], [9.0]])  # > 4 sd out: q's lag leaves it far off-centre there
    fixed = np.stack([r.energy for r in repeated(model, far, range(20), k=64, max_k=None)])
    adaptive_runs = repeated(model, far, range(20), k=64, max_k=4096)
    adaptive = np.stack([r.energy for r in adaptive_runs])
    truth = true_energy(far[:, 0])
    assert np.all(adaptive_runs[0].k > 64)  # refined where unsure
    assert np.all(fixed.max(axis=0) - fixed.min(axis=0) > 0.8)  # wild at k = 64
    spread_fixed, spread_adaptive = fixed.std(axis=0), adaptive.std(axis=0)
    assert np.all(spread_adaptive < 0.5 * spread_fixed)
    assert np.all(np.abs(adaptive - truth).max(axis=0) < 0.5 * np.abs(fixed - truth).max(axis=0))
    assert np.all(adaptive.mean(axis=0) >= truth - 0.05)  # still from above, to Monte Carlo noise
    summary = adaptive_runs[0].summary()
    assert summary["k_raised_fraction"] == 1.0 and summary["k_max_used"] > 64


def test_elbo_energies_are_never_refined_and_carry_no_standard_error():
    model = linear_gaussian_vae(A, S, q_gain=0.55, q_logvar=math.log(0.07))
    points = np.array([[0.0], [9.0]])
    estimate = estimate_energy(model, lambda a, b: points[a:b], 2, k=1, progress=False)
    assert np.all(estimate.k == 1) and np.all(np.isnan(estimate.stderr))
    assert np.all(estimate.std == estimate.spread)


def fit_ensemble(samples: np.ndarray, steps: int, seed: int = 0) -> VAE:
    """A small ensemble (4 members) trained by Lightning on the samples."""
    L.seed_everything(seed, workers=False, verbose=False)
    dim = samples.shape[1]
    state = StateInfo("vector", (dim,), tuple(f"x{i}" for i in range(dim)), ("m",) * dim).to_dict()
    model = VAE(state, stats_meta={"count": len(samples)}, members=4, hidden=32, prior_transforms=2,
                lr=3e-3, warmup_steps=20, val_k=4)
    model.set_normalization(SimpleNamespace(mean=samples.mean(0), std=samples.std(0), pca=None))
    x = torch.as_tensor(samples, dtype=torch.float32)
    index = torch.randint(len(x), (steps * 256,), generator=torch.Generator().manual_seed(seed))
    loader = torch.utils.data.DataLoader(x[index], batch_size=256)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, loader)
    return model.eval()


@pytest.fixture(scope="module")
def spreads():
    """Median spread (nats) in the wells and far from the samples, for two sample counts."""
    density = make_density("boltzmann", 2, seed=0)
    out = {}
    for n in (300, 30_000):
        samples = density.sample(n, np.random.default_rng(n))
        model = fit_ensemble(samples, steps=300)
        wells = density.sample(2000, np.random.default_rng(7))
        wells = wells[density.energy(wells) < density.min_energy + 3.0]
        angle = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        radius = 5.0 * samples.std(axis=0).max()
        far = samples.mean(axis=0) + radius * np.stack([np.cos(angle), np.sin(angle)], axis=1)
        estimates = [estimate_energy(model, lambda a, b, p=p: p[a:b], len(p), k=16, progress=False)
                     for p in (wells, far)]
        out[n] = {"wells": float(np.median(estimates[0].std)), "far": float(np.median(estimates[1].std)),
                  "spread_wells": float(np.median(estimates[0].spread))}
    return out


def test_ensemble_spread_shrinks_as_the_data_grow(spreads):
    """100x the data: the members' bootstrap spread falls (by ~sqrt(100) where sampling dominates)."""
    assert spreads[30_000]["spread_wells"] < 0.5 * spreads[300]["spread_wells"], spreads
    assert spreads[30_000]["wells"] < spreads[300]["wells"], spreads


def test_uncertainty_is_larger_where_data_are_thin(spreads):
    for n in spreads:
        assert spreads[n]["far"] > 3.0 * spreads[n]["wells"], spreads


def test_reservoir_is_a_uniform_reproducible_sample_of_the_stream():
    capacity, n, batch = 100, 5000, 64
    stream = torch.arange(n, dtype=torch.float32)[:, None]
    hits = np.zeros(n)
    for seed in range(60):
        generator = torch.Generator().manual_seed(seed)
        states = torch.zeros(0, 1)
        for start in range(0, n, batch):
            states = reservoir_update(states, start, stream[start:start + batch], capacity, generator)
        assert states.shape == (capacity, 1) and len(torch.unique(states)) == capacity
        hits[states[:, 0].long().numpy()] += 1
    # every draw is kept with probability capacity / n: equal counts across the stream's deciles
    deciles = hits.reshape(10, -1).sum(axis=1)
    expected = 60 * capacity / 10
    assert np.all(np.abs(deciles - expected) < 5 * math.sqrt(expected)), deciles
    again = torch.zeros(0, 1)
    generator = torch.Generator().manual_seed(59)
    for start in range(0, n, batch):
        again = reservoir_update(again, start, stream[start:start + batch], capacity, generator)
    assert torch.equal(again, states)


def test_support_states_travel_in_the_checkpoint(tmp_path):
    samples = make_density("mixture", 2, seed=0).sample(3000, np.random.default_rng(0))
    model = VAE(StateInfo("vector", (2,), ("a", "b"), ("m", "m")).to_dict(), stats_meta={"count": 3000},
                hidden=16, members=2, support_size=500)
    model.set_normalization(SimpleNamespace(mean=samples.mean(0), std=samples.std(0), pca=None))
    for chunk in np.array_split(samples, 10):
        model.record_support(torch.as_tensor(chunk, dtype=torch.float32))
    assert model.support_states.shape == (500, 2) and int(model.support_seen) == 3000
    assert model.support_samples == 3000
    kept = {tuple(row) for row in model.support_states.numpy().round(4)}
    assert kept <= {tuple(row) for row in samples.astype(np.float32).round(4)}  # physical training states
    torch.save({"state_dict": model.state_dict()}, tmp_path / "m.pt")
    fresh = VAE(model.hparams.state, stats_meta={"count": 3000}, hidden=16, members=2, support_size=500)
    fresh.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True)["state_dict"])
    assert torch.equal(fresh.support_states, model.support_states) and fresh.support_samples == 3000


def test_field_support_keeps_principal_coefficients():
    state = StateInfo.field(["T"], ["K"], (4, 4))
    model = VAE(state.to_dict(), channels=4, members=1, support_size=10)
    rng = np.random.default_rng(0)
    components = np.linalg.qr(rng.standard_normal((16, 3)))[0].T  # (3, 16) orthonormal rows
    mean = rng.standard_normal(16)
    model.set_normalization(SimpleNamespace(mean=mean, std=np.ones(16),
                                            pca={"components": components, "std": np.ones(3)}))
    x = rng.standard_normal((6, 1, 4, 4))
    model.record_support(torch.as_tensor(x, dtype=torch.float32))
    expected = (x.reshape(6, 16) - mean) @ components.T
    np.testing.assert_allclose(model.support_states.numpy(), expected, atol=1e-5)


def test_samples_follow_the_members_mixture():
    """sample(): p(z) draws decoded and mapped back to physical units; the mixture picks each
    member equally. Two linear members N(-6 + 1.5 z, 0.5^2) and N(6 + 1.5 z, 0.5^2), x in km."""
    model = VAE(ONE, n_layers=0, members=2, prior="standard", ema_decay=0.0, hidden=8)
    model.set_normalization(SimpleNamespace(mean=np.full(1, 10.0), std=np.full(1, 2.0), pca=None))
    floor = model.hparams.min_logvar
    raw = floor + math.log(math.expm1(math.log(S * S) - floor))
    with torch.no_grad():
        dec = model.members.decoder.net[0].layer
        dec.weight[:] = torch.tensor([[[A - 1.0], [0.0]], [[A - 1.0], [0.0]]])
        dec.bias[:] = torch.tensor([[-6.0, raw], [6.0, raw]])
    x = model.sample(20_000, torch.Generator().manual_seed(0)).numpy()[:, 0]
    u = (x - 10.0) / 2.0  # back to model units
    left, right = u[u < 0], u[u >= 0]
    assert abs(len(left) / len(u) - 0.5) < 0.02
    for part, centre in ((left, -6.0), (right, 6.0)):  # apart: the halves barely overlap
        assert abs(part.mean() - centre) < 0.05 and abs(part.var() - TRUE_VAR) < 0.1
    again = model.sample(5, torch.Generator().manual_seed(0))
    assert torch.equal(again, model.sample(5, torch.Generator().manual_seed(0)))
